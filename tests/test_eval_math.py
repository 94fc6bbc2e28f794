"""Win-rate math without a model: preferences, raw and per-category rates, and the length-controlled rate."""
import math

import numpy as np
import pytest

from pipeline.evaluation.winrate import (
    WinRate,
    by_category,
    length_controlled_win_rate,
    mean_and_error,
    paired_difference,
    preference,
    win_rate,
)


def test_a_pair_is_a_win_a_tie_or_a_loss_for_the_model():
    assert preference(8.5, 7.0) == 1.0
    assert preference(6.5, 6.5) == 0.5
    assert preference(3.0, 9.0) == 0.0
    with pytest.raises(ValueError):
        preference(float("nan"), 5.0)


def test_ties_count_half_and_the_standard_error_is_the_sample_std_over_root_n():
    result = win_rate([1.0, 0.5, 0.0, 1.0])
    # mean 0.625; squared deviations .140625 + .015625 + .390625 + .140625 = .6875, / (n - 1) = .229167
    assert result.rate == pytest.approx(0.625)
    assert result.standard_error == pytest.approx(math.sqrt(0.6875 / 3) / 2)
    assert (result.n, result.wins, result.ties, result.losses) == (4, 2, 1, 1)


def test_a_single_pair_has_no_standard_error():
    assert win_rate([0.5]) == WinRate(rate=0.5, standard_error=0.0, n=1, wins=0, ties=1, losses=0)


def test_no_preferences_or_values_outside_zero_to_one_are_an_error():
    with pytest.raises(ValueError, match="no preferences"):
        win_rate([])
    with pytest.raises(ValueError, match="no preferences"):
        length_controlled_win_rate([], [], [])
    with pytest.raises(ValueError, match="0..1"):
        win_rate([1.0, 7.0])
    with pytest.raises(ValueError, match="0..1"):
        win_rate([1.0, float("nan")])


def test_categories_are_rated_apart_and_rows_without_one_are_unlabelled():
    rates = by_category([1.0, 0.0, 1.0, 0.5, 0.0], ["math", "writing", "math", None, ""])
    assert list(rates) == ["math", "unlabelled", "writing"]
    assert (rates["math"].rate, rates["math"].n) == (1.0, 2)
    assert (rates["writing"].rate, rates["writing"].losses) == (0.0, 1)
    assert (rates["unlabelled"].n, rates["unlabelled"].rate) == (2, 0.25)
    with pytest.raises(ValueError, match="categories"):
        by_category([1.0], ["math", "writing"])


def test_a_judge_that_only_rewards_length_gets_a_length_controlled_rate_near_a_coin_flip():
    # The model is usually the longer one, and the judge prefers the longer answer: the more so the larger the
    # gap, a coin flip at equal lengths. The raw rate credits the model for its length; the LC rate does not.
    rng = np.random.default_rng(7)
    reference_lengths = rng.normal(400, 50, 2000)
    difference = rng.normal(150, 200, 2000)
    preferences = (rng.random(2000) < 1 / (1 + np.exp(-difference / 100))).astype(float)
    raw = win_rate(preferences)
    controlled = length_controlled_win_rate(preferences, reference_lengths + difference, reference_lengths)
    assert raw.rate > 0.65
    assert abs(controlled.rate - 0.5) < 0.06
    assert controlled.length_slope > 1.0                     # the judge's taste for length is visible
    assert 0 < controlled.standard_error < 0.05


def test_when_length_does_not_sway_the_judge_the_length_controlled_rate_is_the_raw_rate():
    rng = np.random.default_rng(11)
    model_lengths = rng.normal(500, 150, 2000)
    reference_lengths = rng.normal(400, 150, 2000)
    preferences = rng.choice([0.0, 0.5, 1.0], size=2000, p=[0.25, 0.1, 0.65])
    raw = win_rate(preferences)
    controlled = length_controlled_win_rate(preferences, model_lengths, reference_lengths)
    assert controlled.rate == pytest.approx(raw.rate, abs=0.02)
    assert abs(controlled.length_slope) < 0.3
    assert controlled.standard_error == pytest.approx(raw.standard_error, rel=0.25)


def test_equal_lengths_give_the_raw_rate_with_a_binomial_standard_error():
    preferences = [1.0, 0.5, 0.0, 1.0]
    controlled = length_controlled_win_rate(preferences, [120] * 4, [120] * 4)
    # no length feature at all: sigmoid(intercept) is the mean, se = sqrt(p (1 - p) / n) by the delta method
    assert controlled.rate == pytest.approx(0.625, abs=1e-5)
    assert controlled.standard_error == pytest.approx(math.sqrt(0.625 * 0.375 / 4), rel=1e-4)
    assert (controlled.length_slope, controlled.length_scale) == (0.0, 0.0)


def test_a_model_that_wins_every_pair_still_gets_a_finite_length_controlled_rate():
    controlled = length_controlled_win_rate([1.0] * 5, [300, 310, 290, 800, 50], [300] * 5)
    assert 0.999 < controlled.rate <= 1.0
    assert math.isfinite(controlled.length_slope) and math.isfinite(controlled.standard_error)


def test_lengths_must_match_the_preferences():
    with pytest.raises(ValueError, match="3 model lengths"):
        length_controlled_win_rate([1.0, 0.0], [1, 2, 3], [1, 2])


def test_the_paired_difference_to_a_baseline_is_over_the_rows_both_were_judged_on():
    model = {"a": 1.0, "b": 0.5, "c": 1.0, "d": 0.0}
    baseline = {"a": 0.0, "b": 0.5, "c": 0.5, "e": 1.0}
    paired = paired_difference(model, baseline)
    differences = [1.0, 0.0, 0.5]                             # a, b, c: d and e were judged for one only
    assert paired.n == 3 and paired.difference == pytest.approx(0.5)
    assert paired.standard_error == pytest.approx(np.std(differences, ddof=1) / math.sqrt(3))
    assert paired_difference(model, {"x": 1.0}) is None


def test_pairing_by_row_takes_the_rows_own_difficulty_out_of_the_error():
    rng = np.random.default_rng(5)
    hard = rng.random(400) < 0.5                               # on hard rows both models mostly lose
    baseline = np.where(hard, rng.random(400) < 0.15, rng.random(400) < 0.85).astype(float)
    better = np.where(rng.random(400) < 0.1, 1.0, baseline)    # the baseline, winning 10 % more rows
    ids = [str(i) for i in range(400)]
    paired = paired_difference(dict(zip(ids, better)), dict(zip(ids, baseline)))
    unpaired = math.hypot(win_rate(better).standard_error, win_rate(baseline).standard_error)
    assert paired.difference == pytest.approx(better.mean() - baseline.mean())
    assert paired.standard_error < unpaired / 2


def test_the_paired_loss_difference_sees_a_shift_far_smaller_than_the_rows_spread():
    # reference losses spread over rows (some answers are hard for every model); the model is 0.01 nats lower on
    # each row, up to a little noise: paired, the shift stands out; the two means' errors alone would hide it
    rng = np.random.default_rng(7)
    baseline = 1.5 + 0.5 * rng.standard_normal(200)
    model = baseline - 0.01 + 0.002 * rng.standard_normal(200)
    ids = [f"r{i}" for i in range(200)]
    paired = paired_difference(dict(zip(ids, model)), dict(zip(ids, baseline)))
    differences = model - baseline
    assert paired.n == 200 and paired.difference == pytest.approx(differences.mean())
    assert paired.standard_error == pytest.approx(differences.std(ddof=1) / math.sqrt(200))
    assert abs(paired.difference + 0.01) < 3 * paired.standard_error and paired.standard_error < 0.0005
    unpaired = math.hypot(*(mean_and_error(values)[1] for values in (model, baseline)))
    assert unpaired > 0.04 and abs(paired.difference) < unpaired


def test_a_mean_of_one_value_has_no_error():
    assert mean_and_error([1.25]) == (1.25, 0.0)
    assert mean_and_error([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1.0 / math.sqrt(3)))
