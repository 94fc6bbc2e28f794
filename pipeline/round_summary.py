"""The summary of one round, from its stages' summaries: rows through each stage, hard share, task mix before
and after against the target, the difficulty distribution (MFD or IFD), tokens and cost. Saved as
`round_R/summary.json` and `summary.txt`, and printed."""
from __future__ import annotations

import textwrap

from pipeline.config import RunConfig
from pipeline.difficulty import format_distribution, method

_TOP_TASKS = 6


def round_summary(config: RunConfig, round_index: int, stages: dict[str, dict]) -> dict:
    score, plan, expand = stages["score"], stages["plan"], stages["expand"]
    respond, train_set, train = stages["respond"], stages["train_set"], stages["train"]
    cost = {"score": score["cost_usd"]["total"], "expand": expand["cost_usd"], "respond": respond["cost_usd"]}
    return {
        "round": round_index,
        "rows": {"pool": score["rows_in"], "scored_ok": score["rows_ok"], "score_failed": score["failed"],
                 "planned": plan["rows_planned"], "planned_distinct": plan["distinct_rows"],
                 "expansion_requests": expand["requests"], "expansion_kept": expand["rows_kept"],
                 "expansion_dropped": expand["dropped"], "answered": respond["rows_ok"],
                 "answer_failed": respond["failed"], "answers_cut_off": respond["cut_off"],
                 "training_set": train_set["rows"], "trained": train["data"]["rows_trainable"]["train"]},
        "hard_share": {"target": plan["hard_share_target"], "planned": plan["hard_share_planned"],
                       "training_set": train_set["hard_share"], "hard_rows_available": plan["hard_rows_available"],
                       "rule": hard_rule(config),
                       # δ shades the report's histogram where MFD alone decides; IFD's boundary moves each round
                       "threshold": config.curriculum.mfd_threshold if method(config) == "judge" else None},
        "plan_warnings": plan.get("warnings", []),          # absent from plans written before there were any
        "task_mix": {"target": {k: round(v, 4) for k, v in config.curriculum.task_targets.items()},
                     "scored": plan["task_mix_scored"], "training_set": train_set["task_mix"],
                     "tv_scored": plan["task_tv_scored"], "tv_planned": plan["task_tv_planned"],
                     "tv_training_set": train_set["task_tv"]},
        "difficulty": plan["difficulty"],
        "judge_requests_per_row": score["judge_requests_per_row"],
        "tokens": {"student": score["tokens"]["student_completion"], "teacher_score": score["tokens"]["teacher"],
                   "judge": score["tokens"]["judge"], "expand": expand["tokens"], "respond": respond["tokens"],
                   "trained": train["training"]["tokens_trained"]},
        "cost_usd": {**cost, "total": round(sum(cost.values()), 6)},
        "training": {"final_loss": train["training"]["final_loss"], "first_loss": train["training"]["first_loss"],
                     "model": train["model"]},
        "wall_s": {name: stages[name].get("wall_s") for name in ("score", "expand", "respond", "train")},
        # what round 0's scoring found the task labels and the judge worth (absent from older manifests)
        "classifier": score.get("classifier"), "judge_calibration": score.get("judge_calibration"),
    }


def hard_rule(config: RunConfig) -> str:
    """How the run calls a row hard, in words."""
    curriculum = config.curriculum
    ifd = f"IFD in the top {curriculum.ifd_hard_share:.0%} of the round"
    rule = {"judge": f"MFD ≥ {curriculum.mfd_threshold:g}",
            "ifd": ifd, "hybrid": f"{ifd}; MFD ≥ {curriculum.mfd_threshold:g} in the {curriculum.hybrid_band:.0%} "
                                  "band around its boundary"}[method(config)]
    return rule + (", chosen by the judge's calibration (auto)" if curriculum.difficulty == "auto" else "")


def _top(mix: dict, total: int) -> str:
    top = sorted(mix.items(), key=lambda item: -item[1])[:_TOP_TASKS]
    return ", ".join(f"{task} {count / total:.0%}" for task, count in top) if total else "-"


def format_round_summary(summary: dict) -> str:
    rows, hard, mix = summary["rows"], summary["hard_share"], summary["task_mix"]
    dropped = ", ".join(f"{k} {v}" for k, v in rows["expansion_dropped"].items()) or "none"
    tokens = summary["tokens"]
    lines = [
        f"== round {summary['round']} ==",
        f"  rows: pool {rows['pool']} → scored {rows['scored_ok']} → planned {rows['planned']} "
        f"({rows['planned_distinct']} distinct) + new {rows['expansion_kept']} of {rows['expansion_requests']} "
        f"(dropped: {dropped}) → answered {rows['answered']} → training set {rows['training_set']} → trained "
        f"{rows['trained']}",
        f"  hard share ({hard['rule']}): target {hard['target']:.2f}, planned {hard['planned']}, "
        f"training set {hard['training_set']} ({hard['hard_rows_available']} hard rows available)",
        f"  task mix, total variation from the target: scored pool {mix['tv_scored']:.3f} → planned "
        f"{mix['tv_planned']:.3f} → training set {mix['tv_training_set']:.3f}",
        f"    scored: {_top(mix['scored'], sum(mix['scored'].values()))}",
        f"    training set: {_top(mix['training_set'], sum(mix['training_set'].values()))}",
        f"  {format_distribution(summary['difficulty'])}; judge requests a pool row "
        f"{summary['judge_requests_per_row']}",
        f"  tokens: student {tokens['student']}, teacher {_io(tokens['teacher_score'])}, judge {_io(tokens['judge'])}, "
        f"expand {_io(tokens['expand'])}, respond {_io(tokens['respond'])}; trained on {tokens['trained']}",
        f"  cost ${summary['cost_usd']['total']:.4f}; loss {_loss(summary['training']['first_loss'])} → "
        f"{_loss(summary['training']['final_loss'])}; model {summary['training']['model']}",
        "  wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["wall_s"].items() if v is not None),
        *(f"  warning: {warning}" for warning in summary.get("plan_warnings", [])),
        *labels_and_judge(summary),
    ]
    return "\n".join(lines)


def labels_and_judge(summary: dict) -> list[str]:
    """Lines on the task classifier's held-out agreement and the judge's calibration, from a summary (the score
    manifest's or the round's) that holds them."""
    from pipeline.classification import format_classifier
    from pipeline.judge_calibration import format_calibration

    lines = [format_classifier(summary["classifier"])] if summary.get("classifier") else []
    if summary.get("judge_calibration"):
        lines.append(textwrap.indent(format_calibration(summary["judge_calibration"]), "  "))
    return lines


def _io(tokens: dict) -> str:
    return f"{tokens['prompt']} in + {tokens['completion']} out"


def _loss(value) -> str:
    return "none" if value is None else f"{value:.3f}"
