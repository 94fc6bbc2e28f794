"""Win rates of a model against a reference from judged pairs, as pure functions: raw, per category, and
length-controlled.

A judged pair (`PairScores`: reference = teacher_score, model = student_score, each the mean over both
presentation orders) becomes one preference: 1 win, 0.5 tie, 0 loss. The length-controlled rate follows
AlpacaEval 2.0's LC in spirit: a logistic regression of the preference on the length difference, read at a
difference of zero, so that a judge's taste for longer answers does not count as quality.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

UNLABELLED = "unlabelled"
# Keeps the fit finite when every preference is 0 or 1 (or the length separates wins from losses perfectly),
# where the unpenalised likelihood has no maximum; small enough to move an ordinary fit by far less than its
# standard error.
_L2_PENALTY = 1e-6
_MAX_NEWTON_STEPS = 100
_CONVERGED = 1e-10


@dataclass(frozen=True)
class WinRate:
    rate: float                 # mean preference: (wins + ties / 2) / n
    standard_error: float       # sample std (n - 1) / sqrt(n); 0 when n < 2
    n: int
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class LengthControlledWinRate:
    rate: float                 # predicted preference at equal lengths: sigmoid(intercept)
    standard_error: float       # delta method: rate (1 - rate) · se(intercept)
    n: int
    length_slope: float         # log-odds per unit of the length feature; > 0: the judge favours longer answers
    length_scale: float         # std of (model length - reference length), the feature's unit


def preference(model_score: float, reference_score: float) -> float:
    """1.0 when the model scored higher, 0.5 on a tie, 0.0 when the reference scored higher."""
    if math.isnan(model_score) or math.isnan(reference_score):
        raise ValueError(f"a score is NaN: model {model_score}, reference {reference_score}")
    return 1.0 if model_score > reference_score else 0.5 if model_score == reference_score else 0.0


def win_rate(preferences: Sequence[float]) -> WinRate:
    """The mean preference (ties count half) and its standard error."""
    values = _checked_preferences(preferences)
    rate, error = mean_and_error(values)
    return WinRate(rate=rate, standard_error=error, n=len(values), wins=int((values > 0.5).sum()),
                   ties=int((values == 0.5).sum()), losses=int((values < 0.5).sum()))


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """The mean of at least one value and its standard error: sample std (n - 1) / sqrt(n), 0 when n < 2."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def by_category(preferences: Sequence[float], categories: Sequence[Optional[str]]) -> dict[str, WinRate]:
    """The win rate of each category (sorted by name); rows without one are counted under 'unlabelled'."""
    if len(preferences) != len(categories):
        raise ValueError(f"{len(preferences)} preferences but {len(categories)} categories")
    grouped: dict[str, list[float]] = defaultdict(list)
    for value, category in zip(preferences, categories):
        grouped[category or UNLABELLED].append(value)
    return {name: win_rate(grouped[name]) for name in sorted(grouped)}


def length_controlled_win_rate(preferences: Sequence[float], model_lengths: Sequence[float],
                               reference_lengths: Sequence[float]) -> LengthControlledWinRate:
    """The win rate the judge would give at equal lengths.

    Fits logit P(model preferred) = intercept + slope · tanh(Δ / std(Δ)), Δ = model length - reference length,
    with ties as fractional outcomes (0.5), by penalised Newton steps; the tanh bounds the pull of a few very
    long answers. Lengths may be in any unit (characters, tokens): the feature is scaled by std(Δ), and is 0
    for every row when std(Δ) is 0, which leaves the rate at the raw mean preference.
    """
    outcomes = _checked_preferences(preferences)
    if not len(outcomes) == len(model_lengths) == len(reference_lengths):
        raise ValueError(f"{len(outcomes)} preferences but {len(model_lengths)} model lengths and "
                         f"{len(reference_lengths)} reference lengths")
    difference = np.asarray(model_lengths, dtype=float) - np.asarray(reference_lengths, dtype=float)
    if not np.isfinite(difference).all():
        raise ValueError("a length is not a finite number")
    scale = float(difference.std())
    feature = np.tanh(difference / scale) if scale > 0 else np.zeros_like(difference)
    design = np.column_stack([np.ones_like(feature), feature])          # (n, 2): intercept, length
    coefficients, information = _fit_logistic(design, outcomes)
    rate = _sigmoid(coefficients[0])
    intercept_error = math.sqrt(np.linalg.inv(information)[0, 0])
    return LengthControlledWinRate(rate=rate, standard_error=rate * (1 - rate) * intercept_error, n=len(outcomes),
                                   length_slope=float(coefficients[1]), length_scale=scale)


def _fit_logistic(design: np.ndarray, outcomes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients maximising the L2-penalised Bernoulli log-likelihood (outcomes in [0, 1]), and the
    penalised Fisher information at them. Newton steps, halved while they do not improve the objective."""
    penalty = _L2_PENALTY * np.eye(design.shape[1])

    def loss(beta: np.ndarray) -> float:
        logits = design @ beta
        # -log-likelihood written with logaddexp so that large logits do not overflow
        return float(np.sum(np.logaddexp(0, logits) - outcomes * logits) + 0.5 * beta @ penalty @ beta)

    beta = np.zeros(design.shape[1])
    for _ in range(_MAX_NEWTON_STEPS):
        p = _sigmoid_array(design @ beta)
        gradient = design.T @ (p - outcomes) + penalty @ beta
        information = design.T @ (design * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(information, gradient)
        size, current = 1.0, loss(beta)
        while loss(beta - size * step) > current and size > 1e-8:
            size /= 2
        beta = beta - size * step
        if np.abs(size * step).max() < _CONVERGED:
            break
    p = _sigmoid_array(design @ beta)
    return beta, design.T @ (design * (p * (1 - p))[:, None]) + penalty


def _checked_preferences(preferences: Sequence[float]) -> np.ndarray:
    values = np.asarray(preferences, dtype=float)
    if values.size == 0:
        raise ValueError("no preferences: a win rate needs at least one judged pair")
    if not ((values >= 0) & (values <= 1)).all():              # also false for NaN
        raise ValueError("preferences must lie in 0..1 (1 win, 0.5 tie, 0 loss)")
    return values


def _sigmoid(x: float) -> float:
    return float(_sigmoid_array(np.asarray(x, dtype=float)))


def _sigmoid_array(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -x))


@dataclass(frozen=True)
class PairedDifference:
    difference: float           # mean over the shared rows of (model's value - baseline's value)
    standard_error: float       # sample std of the differences (n - 1) / sqrt(n); 0 when n < 2
    n: int                      # rows both were judged on


def paired_difference(model: dict[str, float], baseline: dict[str, float]) -> Optional[PairedDifference]:
    """How much higher a model's value is than a baseline's on the same rows (row id → value: a preference
    against the reference, or a loss on it), over the rows both have one for. Pairing by row removes the rows'
    own difficulty from the error, so it is smaller than the two means' errors combined. None when no row has
    both."""
    shared = sorted(model.keys() & baseline.keys())
    if not shared:
        return None
    difference, error = mean_and_error([model[row] - baseline[row] for row in shared])
    return PairedDifference(difference=difference, standard_error=error, n=len(shared))
