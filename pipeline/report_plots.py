"""The run report's plots (`tapir report`): one function per plot. Each takes plain numbers already read from
the run directory (pipeline/report.py gathers them), writes one PNG and returns its path. matplotlib with the
Agg backend, so no display is needed."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

_DPI = 110
_COLORS = {"scored pool": "tab:gray", "planned": "tab:blue", "target": "tab:orange", "target α": "tab:orange",
           "training set": "tab:green"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _grouped_bars(ax, groups: list[str], series: dict[str, dict[str, Optional[float]]],
                  colors: Optional[dict[str, str]] = None, label_values: bool = False,
                  horizontal: bool = False) -> None:
    """One bar per series in each group, side by side (top to bottom when horizontal); a missing value draws
    no bar."""
    width = 0.8 / max(1, len(series))
    for offset, (name, values) in enumerate(series.items()):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [values.get(group) for group in groups]
        draw = ax.barh if horizontal else ax.bar
        draw(xs, [0.0 if h is None else h for h in heights], width, label=name, color=(colors or {}).get(name))
        if label_values:
            for x, h in zip(xs, heights):
                ax.annotate("n/a" if h is None else f"{h:.2f}", (x, h or 0.0), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 2), textcoords="offset points")
    if horizontal:
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(range(len(groups)), groups)
        ax.grid(axis="y", alpha=0.3)


def _bin_bounds(label: str) -> tuple[float, float]:
    """'(-0.5, 0]' → (-0.5, 0.0): the bins of difficulty.distribution, whose order JSON does not keep."""
    low, high = re.fullmatch(r"\((\S+), (\S+)\]", label).groups()
    return float(low), float(high)


_AXIS = {"mfd": "MFD (teacher score − student score) bin", "ifd": "IFD (loss with the instruction ÷ without) bin"}


def difficulty_histogram(histograms: dict[int, dict[str, int]], measure: str, threshold: Optional[float],
                         path: Path) -> Path:
    """Rows per difficulty bin (MFD or IFD), one bar per round in each bin; bins above a fixed hard threshold
    (the judge's δ) shaded."""
    bins = sorted({label for histogram in histograms.values() for label in histogram}, key=_bin_bounds)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(bins) + 2), 4.2))
    _grouped_bars(ax, bins, {f"round {r} ({sum(histogram.values())} rows)": histogram
                             for r, histogram in sorted(histograms.items())})
    if threshold is not None:
        hard = [i for i, label in enumerate(bins) if _bin_bounds(label)[0] >= threshold]
        if hard:
            ax.axvspan(hard[0] - 0.5, len(bins) - 0.5, color="tab:red", alpha=0.08,
                       label=f"hard: {measure.upper()} ≥ δ = {threshold:g}")
    ax.set_xlabel(_AXIS[measure])
    ax.set_ylabel("scored instructions")
    ax.set_title(f"{measure.upper()} of the scored pool, per round")
    ax.legend()
    return _save(fig, path)


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {task: n / total for task, n in counts.items()} if total else {}


def task_mix(mixes: dict[int, dict], path: Path) -> Path:
    """Per round, the share of each task before resampling (scored pool), after it (planned) and the target.

    `mixes[r]`: {"scored": counts, "planned": counts, "target": shares or None, "tv_scored", "tv_planned"}.
    Tasks sorted by target share, then by name; one horizontal bar group per task."""
    targets = {task: share for mix in mixes.values() for task, share in (mix.get("target") or {}).items()}
    tasks = sorted({task for mix in mixes.values() for task in (*mix["scored"], *mix["planned"])} | set(targets),
                   key=lambda task: (-targets.get(task, 0.0), task))
    fig, axes = plt.subplots(1, len(mixes), figsize=(4.2 * len(mixes) + 1.5, 0.28 * len(tasks) + 2),
                             sharey=True, squeeze=False)
    for ax, (round_index, mix) in zip(axes[0], sorted(mixes.items())):
        series = {"scored pool": _shares(mix["scored"]), "planned": _shares(mix["planned"])}
        if mix.get("target"):
            series["target"] = mix["target"]
        _grouped_bars(ax, tasks, series, colors=_COLORS, horizontal=True)
        ax.set_title(f"round {round_index}: total variation\nscored {mix['tv_scored']:.3f} → "
                     f"planned {mix['tv_planned']:.3f}", fontsize=10)
        ax.set_xlabel("share of rows")
    axes[0][0].invert_yaxis()
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Task mix before and after task resampling, against the target")
    return _save(fig, path)


def hard_share(shares: dict[int, dict[str, Optional[float]]], path: Path) -> Path:
    """Share of hard rows (MFD ≥ δ) per round: the curriculum's target α_r, the plan, the training set."""
    rounds = sorted(shares)
    groups = [f"round {r}" for r in rounds]
    series = {label: {group: shares[r].get(key) for group, r in zip(groups, rounds)} for key, label in
              (("target", "target α"), ("planned", "planned"), ("training_set", "training set"))}
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(rounds) + 2), 4))
    _grouped_bars(ax, groups, series, colors=_COLORS, label_values=True)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of hard rows")
    ax.set_title("Hard share per round")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def training_loss(losses: dict[int, list[tuple[int, float]]], path: Path) -> Path:
    """Training loss against the optimizer step, one line per round."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for round_index, points in sorted(losses.items()):
        ax.plot([step for step, _ in points], [loss for _, loss in points], marker=".", label=f"round {round_index}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_title("Student training loss per round")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _per_stage(ax, values: dict[int, dict[str, float]], ylabel: str, title: str) -> None:
    stages = list(dict.fromkeys(stage for per_stage in values.values() for stage in per_stage))
    _grouped_bars(ax, stages, {f"round {r}": per_stage for r, per_stage in sorted(values.items())})
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def stage_usage(tokens: dict[int, dict[str, int]], cost_usd: dict[int, dict[str, float]],
                wall_s: dict[int, dict[str, float]], path: Path) -> Path:
    """Tokens, cost and wall time per stage, one bar per round (from each round's summary.json)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _per_stage(axes[0], tokens, "tokens (prompt + completion)", "Tokens per stage")
    _per_stage(axes[1], cost_usd, "US dollars", "Teacher/judge cost per stage")
    if not any(cost for per_stage in cost_usd.values() for cost in per_stage.values()):
        # a free endpoint (the local teacher): say so rather than leave an empty axis around zero
        axes[1].set_ylim(0, 1)
        axes[1].text(0.5, 0.5, "no paid calls (price 0)", ha="center", va="center", transform=axes[1].transAxes)
    _per_stage(axes[2], wall_s, "seconds", "Wall time per stage")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def win_rates(models: list[dict], path: Path) -> Path:
    """Each model's win rate against the held-out references (a share: wins + ties / 2 over pairs) with its
    standard error, the length-controlled win rate, and the plain-distillation baseline's rate as a line to
    beat. `models`: rows of eval/compare.parquet in display order."""
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(models) + 2), 4.2))
    xs = range(len(models))
    ax.bar(xs, [m["win_rate"] for m in models], 0.6, yerr=[m["standard_error"] or 0.0 for m in models],
           capsize=4, color=["tab:gray" if m["round"] is None else "tab:blue" for m in models],
           label="win rate ± standard error (gray: not a round's student)")
    controlled = [(x, m["lc_win_rate"]) for x, m in zip(xs, models) if m["lc_win_rate"] is not None]
    if controlled:
        ax.scatter(*zip(*controlled), color="tab:orange", zorder=3, marker="D", label="length-controlled win rate")
    baselines = _baselines(models, "win_rate")
    if baselines:
        ax.axhline(sum(baselines) / len(baselines), color="tab:red", linestyle="--", linewidth=1,
                   label=_baseline_label(baselines))
    ax.set_xticks(list(xs), [m["model"] for m in models])
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate against the references")
    ax.set_title("Win rate per model on the same held-out rows")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def reference_losses(models: list[dict], path: Path) -> Path:
    """Left: each model's mean reference loss (nats per token of the held-out reference answers) ± standard
    error, the baseline's as a dashed line. Right: each model's paired difference to the baseline ± its
    standard error, below zero where the model is closer to the references. `models`: rows of
    eval/compare.parquet in display order; a model without a loss is left out."""
    scored = [m for m in models if m.get("reference_loss") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(scored) + 3), 4.2))
    xs = range(len(scored))
    colors = ["tab:gray" if m["round"] is None else "tab:blue" for m in scored]
    axes[0].bar(xs, [m["reference_loss"] for m in scored], 0.6, capsize=4, color=colors,
                yerr=[m["reference_loss_standard_error"] or 0.0 for m in scored],
                label="mean loss ± standard error (gray: not a round's student)")
    baselines = _baselines(scored, "reference_loss")
    if baselines:
        axes[0].axhline(sum(baselines) / len(baselines), color="tab:red", linestyle="--", linewidth=1,
                        label=_baseline_label(baselines))
    axes[0].set_ylabel("nats per token of the references")
    axes[0].set_title("Reference loss per model")
    axes[0].legend(fontsize=8, loc="lower left")
    paired = [m for m in scored if m.get("loss_difference_to_baseline") is not None]
    axes[1].bar(range(len(paired)), [m["loss_difference_to_baseline"] for m in paired], 0.6, capsize=4,
                yerr=[m["loss_difference_standard_error"] or 0.0 for m in paired],
                color=["tab:gray" if m["round"] is None else "tab:blue" for m in paired])
    axes[1].axhline(0.0, color="tab:red", linestyle="--", linewidth=1)
    axes[1].set_xticks(list(range(len(paired))), [m["model"] for m in paired])
    axes[1].set_ylabel("nats per token, model − baseline")
    axes[1].set_title("Paired difference to the baseline (below 0: closer)")
    axes[0].set_xticks(list(xs), [m["model"] for m in scored])
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _baselines(models: list[dict], column: str) -> list[float]:
    """`column` of each plain-distillation baseline (eval compare names them baseline, baseline_1, …)."""
    return [m[column] for m in models if m["round"] is None and (m["model"] == "baseline"
                                                                 or m["model"].startswith("baseline_"))]


def _baseline_label(values: list[float]) -> str:
    return "plain-distillation baseline" + (f" (mean of {len(values)} seeds)" if len(values) > 1 else "")


def category_scores(scores: dict[str, dict[str, float]], path: Path) -> Path:
    """Score per category, one bar per model. `scores[model][category]`, models in display order."""
    categories = sorted({category for per_model in scores.values() for category in per_model})
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(categories) * max(1, len(scores)) + 2), 4.5))
    _grouped_bars(ax, categories, scores)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_title("Evaluation score per category and model")
    ax.legend(fontsize=8)
    return _save(fig, path)
