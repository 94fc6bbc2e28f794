"""`tapir report RUN_DIR`: the run report, written to `RUN_DIR/report/`.

`report.html` is one self-contained page (its plots inlined as data: URIs, no script, nothing fetched), to open
or send as it is; `report.md` says the same and links the same plots as files under `plots/`. Everything comes
from files a run already wrote: `state.json` (status, spending, finished stages), each round's plan and training
set manifests, `summary.json` and `sft/metrics.jsonl`, and, when an evaluation was run, `eval/compare.parquet`
and `eval/categories.parquet`. Neither the config nor the environment is read, so no secret can reach the page.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from pipeline import store
from pipeline.errors import UserError
from pipeline.evaluation.eval_dir import CATEGORIES_FILE, EVAL_DIR
from pipeline.planning import PLAN, TRAIN
from pipeline.round_summary import format_round_summary

log = logging.getLogger(__name__)

REPORT_DIR = "report"
PLOTS_DIR = "plots"
COMPARE_FILE = "compare.parquet"
# eval/compare.parquet (pipeline/evaluation/compare.py): one row per model. win_rate and lc_win_rate
# (length-controlled; may be null) are shares in [0, 1] against the held-out references, as
# pipeline/evaluation/winrate.py computes them, standard_error in the same unit; round is null for a model that
# is no round's student (the baseline, the student the run started from).
COMPARE_COLUMNS = ("model", "round", "win_rate", "standard_error", "lc_win_rate")
# the reference loss (mean nats per token of the held-out reference answers under the model) and its paired
# difference to the baseline, each with its standard error; plotted when the file has them (an evaluation
# from before they existed has not)
LOSS_COLUMNS = ("reference_loss", "reference_loss_standard_error", "loss_difference_to_baseline",
                "loss_difference_standard_error")
CATEGORY_COLUMNS = ("model", "category", "score")
NO_EVALUATION = ("No evaluation was run: `tapir eval compare CONFIG` writes eval/compare.parquet and "
                 "eval/categories.parquet, which this report then plots.")
# stages in the order a round runs them, for the per-stage plot (summary.json keeps its keys sorted)
_STAGE_ORDER = ("student", "teacher_score", "judge", "score", "expand", "respond", "train", "trained")
_SFT_DIR = "sft"
_HISTOGRAM_CAPTIONS = {
    "mfd": "Instructions of the scored pool per MFD bin (judge score of the teacher's answer minus the student's); "
           "the shaded bins are hard.",
    "ifd": "Instructions of the scored pool per IFD bin (the student's loss on the teacher's answer with the "
           "instruction ÷ without it); the round's highest IFDs are hard (curriculum.ifd_hard_share), and rows "
           "above curriculum.ifd_misaligned_above are left out as misaligned."}
_METRICS_FILE = "metrics.jsonl"


class ReportError(UserError, ValueError):
    """A run directory that cannot be reported on; the message names the file and what is wrong."""


@dataclass
class RoundFiles:
    """What one round has written so far; None where a stage has not finished."""

    index: int
    finished: list[str]
    plan: Optional[dict] = None              # round_R/plan/_manifest.json
    training_set: Optional[dict] = None      # round_R/train/_manifest.json
    summary: Optional[dict] = None           # round_R/summary.json, once the round is over
    losses: list[tuple[int, float]] = field(default_factory=list)   # (step, loss) from sft/metrics.jsonl


@dataclass
class Evaluation:
    """eval/compare.parquet and eval/categories.parquet; None where the file is absent."""

    models: Optional[list[dict]]                         # compare rows: no-round models first, then by round
    categories: Optional[dict[str, dict[str, float]]]    # model → category → score


@dataclass
class Figure:
    title: str
    path: Path
    caption: str


def write_report(run_dir: str, s3_endpoint_url: Optional[str] = None) -> list[str]:
    """Writes report.html, report.md and plots/*.png under RUN_DIR/report/; returns their URIs, the page first.
    `s3_endpoint_url`: an S3-compatible endpoint for an s3:// RUN_DIR (else AWS_ENDPOINT_URL, as store.locate)."""
    # imported here, not at the top: rounds imports every stage, and the CLI imports this module when it starts
    from pipeline.rounds import STATE_FILE

    run = store.locate(run_dir, s3_endpoint_url)
    state = store.read_json(run, STATE_FILE)
    if state is None:
        raise FileNotFoundError(f"{run.child(STATE_FILE).uri}: not found; is {run.uri} a run directory? "
                                f"`tapir run CONFIG` writes it there")
    rounds = [read_round(run, int(r), done) for r, done in sorted(state.get("rounds", {}).items(),
                                                                  key=lambda item: int(item[0]))]
    evaluation = read_evaluation(run.child(EVAL_DIR))
    out = run.child(REPORT_DIR)
    with tempfile.TemporaryDirectory(prefix="tapir-report-") as scratch:
        figures = make_plots(rounds, evaluation, Path(scratch))
        written = [store.write_bytes(out.child(PLOTS_DIR), f.path.name, f.path.read_bytes()) for f in figures]
        page = render_html(run.uri, state, rounds, evaluation, figures)
        text = render_markdown(run.uri, state, rounds, evaluation, figures)
    markdown = store.write_text(out, "report.md", text)
    page_path = store.write_text(out, "report.html", page)    # last: the page appears once its plots are there
    return [_uri(out, path) for path in (page_path, markdown, *written)]


def _uri(out: store.Location, path: str) -> str:
    """The URI of a file that store wrote at `path` inside out's file system."""
    return out.uri.rstrip("/") + path[len(out.path.rstrip("/")):]


def read_round(run: store.Location, index: int, done: dict) -> RoundFiles:
    location = run.child(f"round_{index}")
    files = RoundFiles(index, list(done.get("finished", [])),
                       plan=store.read_json(location.child(PLAN), store.MANIFEST),
                       training_set=store.read_json(location.child(TRAIN), store.MANIFEST),
                       summary=store.read_json(location, "summary.json"))
    metrics = location.child(_SFT_DIR, _METRICS_FILE)
    if metrics.exists():
        with metrics.fs.open_input_stream(metrics.path) as stream:
            lines = [line for line in stream.read().decode("utf-8").splitlines() if line.strip()]
        files.losses = _step_losses(lines, metrics.uri)
    return files


def _step_losses(lines: list[str], uri: str) -> list[tuple[int, float]]:
    """(step, loss) of the step records; a step logged again after a resume counts once, as its last record."""
    losses = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):    # a worker killed mid-write leaves its last line cut off
                log.warning("%s: the last line is cut off; the loss plot leaves it out", uri)
                break
            raise ReportError(f"{uri}: line {number} is not JSON ({err})") from err
        if record.get("kind") == "step":
            losses[record["step"]] = record["loss"]
    return sorted(losses.items())


def _read_parquet(location: store.Location, name: str, columns: tuple[str, ...],
                  optional: tuple[str, ...] = ()) -> Optional[list[dict]]:
    """The file's `columns`, and those of `optional` it has; None when there is no file."""
    file = location.child(name)
    table = store.read_parquet_file(location, name)
    if table is None:
        return None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ReportError(f"{file.uri}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    if table.num_rows == 0:
        raise ReportError(f"{file.uri}: has no rows")
    return table.select(list(columns) + [c for c in optional if c in table.column_names]).to_pylist()


def read_evaluation(location: store.Location) -> Evaluation:
    models = _read_parquet(location, COMPARE_FILE, COMPARE_COLUMNS, LOSS_COLUMNS)
    if models:
        outside = [m["model"] for m in models if m["win_rate"] is None or not 0.0 <= m["win_rate"] <= 1.0
                   or not (m["lc_win_rate"] is None or 0.0 <= m["lc_win_rate"] <= 1.0)]
        if outside:
            raise ReportError(f"{location.child(COMPARE_FILE).uri}: win_rate (required) and lc_win_rate are shares "
                              f"in [0, 1]; not so for {', '.join(outside)} (divide a file in percent by 100)")
        models.sort(key=lambda m: (m["round"] is not None, m["round"] or 0))
    rows = _read_parquet(location, CATEGORIES_FILE, CATEGORY_COLUMNS)
    categories = None
    if rows:
        # models in the order of the win-rate plot, then any that only categories.parquet names
        present = {r["model"] for r in rows}
        order = [m["model"] for m in models or [] if m["model"] in present] + [r["model"] for r in rows]
        categories = {model: {} for model in order}
        for row in rows:
            categories[row["model"]][row["category"]] = row["score"]
    return Evaluation(models, categories)


def _total(tokens) -> int:
    """summary.json keeps tokens as a count or as {"prompt": n, "completion": m}."""
    return tokens if isinstance(tokens, int) else tokens["prompt"] + tokens["completion"]


def _in_stage_order(values: dict[str, float]) -> dict[str, float]:
    return dict(sorted(values.items(), key=lambda item: (_STAGE_ORDER + (item[0],)).index(item[0])))


def make_plots(rounds: list[RoundFiles], evaluation: Evaluation, out: Path) -> list[Figure]:
    """Draws every plot the run has data for into `out`; a plot with nothing to show is left out."""
    from pipeline import report_plots as plots

    summaries = {r.index: r.summary for r in rounds if r.summary}
    planned = {r.index: r.plan for r in rounds if r.plan}
    # the curriculum's δ and task targets are config values, the same in every round; summary.json keeps them
    any_summary = next(iter(summaries.values()), None)
    threshold = any_summary["hard_share"]["threshold"] if any_summary else None
    figures = []
    measured = {r: plan["difficulty"] for r, plan in planned.items() if plan["difficulty"]["rows"]}
    if measured:
        name = next(iter(measured.values()))["measure"]
        figures.append(Figure(f"{name.upper()} per round", plots.difficulty_histogram(
            {r: difficulty["histogram"] for r, difficulty in measured.items()}, name, threshold,
            out / "difficulty_histogram.png"), _HISTOGRAM_CAPTIONS[name]))
    if planned:
        targets = {r: (summaries.get(r) or any_summary or {}).get("task_mix", {}).get("target") for r in planned}
        figures.append(Figure("Task mix", plots.task_mix(
            {r: {"scored": plan["task_mix_scored"], "planned": plan["task_mix_planned"], "target": targets[r],
                 "tv_scored": plan["task_tv_scored"], "tv_planned": plan["task_tv_planned"]}
             for r, plan in planned.items()}, out / "task_mix.png"),
            "Share of each task in the scored pool (before task resampling), in the plan (after) and in the "
            "target; total variation from the target in each panel's title."))
        figures.append(Figure("Hard share", plots.hard_share(
            {r.index: {"target": r.plan["hard_share_target"], "planned": r.plan["hard_share_planned"],
                       "training_set": (r.training_set or {}).get("hard_share")} for r in rounds if r.plan},
            out / "hard_share.png"),
            "Share of hard instructions: the curriculum's target α for the round, the plan, and the training set "
            "after expansion and answering."))
    losses = {r.index: r.losses for r in rounds if r.losses}
    if losses:
        figures.append(Figure("Training loss", plots.training_loss(losses, out / "training_loss.png"),
                              "Loss per answer token at each optimizer step of the student's fine-tuning."))
    if summaries:
        figures.append(Figure("Tokens, cost and time per stage", plots.stage_usage(
            {r: _in_stage_order({name: _total(t) for name, t in s["tokens"].items()}) for r, s in summaries.items()},
            {r: _in_stage_order({name: usd for name, usd in s["cost_usd"].items() if name != "total"})
             for r, s in summaries.items()},
            {r: _in_stage_order({name: sec for name, sec in s["wall_s"].items() if sec is not None})
             for r, s in summaries.items()},
            out / "stage_usage.png"),
            "Per finished round: tokens each stage sent and received (student: generated; trained: seen in "
            "training), what the teacher and judge cost, and each stage's wall time."))
    if evaluation.models:
        figures.append(Figure("Win rate: each round against the baseline", plots.win_rates(
            evaluation.models, out / "win_rate.png"),
            f"From {EVAL_DIR}/{COMPARE_FILE} (`tapir eval compare`): every model judged against the same "
            "references on the same held-out rows, win rate ± standard error and length-controlled; the dashed "
            "line is the plain-distillation baseline's."))
    if evaluation.models and any(m.get("reference_loss") is not None for m in evaluation.models):
        figures.append(Figure("Reference loss: each round against the baseline", plots.reference_losses(
            evaluation.models, out / "reference_loss.png"),
            f"From {EVAL_DIR}/{COMPARE_FILE}: each model's mean loss per token on the same held-out reference "
            "answers (lower: closer to them) ± standard error, and its difference to the baseline paired by row "
            "± the paired standard error; no judge in it, so it sees what the win rate's ties hide."))
    if evaluation.categories:
        figures.append(Figure("Scores per category", plots.category_scores(evaluation.categories,
                                                                           out / "category_scores.png"),
                              f"From {EVAL_DIR}/{CATEGORIES_FILE}."))
    return figures


def status_lines(state: dict) -> list[str]:
    finished = sum(1 for done in state.get("rounds", {}).values() if done.get("summary"))
    lines = [f"status: {state.get('status', 'unknown')}",
             f"rounds finished: {finished} of {state.get('rounds_planned', '?')}",
             f"spent: ${state.get('spent_usd', 0.0):.4f}"]
    if state.get("status") != "finished" and state.get("stage"):
        lines.append(f"last stage: round {state.get('round')}, {state['stage']}")
    if state.get("stopped_because"):
        lines.append(f"stopped because: {state['stopped_because']}")
    lines.append(f"last started {state.get('last_started', '?')}, state updated {state.get('updated', '?')}")
    if state.get("heldout_loss"):
        from pipeline.evaluation.heldout_loss import format_heldout

        lines += format_heldout(state["heldout_loss"]).splitlines()
    return lines


def round_text(files: RoundFiles) -> str:
    if files.summary:
        return format_round_summary(files.summary)
    # state.json lists finished stages in the order they ran
    return f"== round {files.index} ==\n  not finished; stages done: {', '.join(files.finished) or 'none'}"


def _evaluation_note(evaluation: Evaluation) -> Optional[str]:
    if evaluation.models is None and evaluation.categories is None:
        return NO_EVALUATION
    absent = [name for name, value in ((COMPARE_FILE, evaluation.models), (CATEGORIES_FILE, evaluation.categories))
              if value is None]
    return f"{EVAL_DIR}/{absent[0]} is absent: its plot is left out." if absent else None


def _generated() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;white-space:pre-wrap}
figure{margin:1.5em 0}img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}"""


def render_html(run_uri: str, state: dict, rounds: list[RoundFiles], evaluation: Evaluation,
                figures: list[Figure]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>TAPIR run report: {e(run_uri)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>TAPIR run report</h1><p><code>{e(run_uri)}</code>, generated {_generated()}</p>",
             "<h2>Run</h2><pre>" + e("\n".join(status_lines(state))) + "</pre>",
             "<h2>Rounds</h2>", *(f"<pre>{e(round_text(r))}</pre>" for r in rounds)]
    if not rounds:
        parts.append("<p>No round has started.</p>")
    parts.append("<h2>Plots</h2>")
    for figure in figures:
        data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
        parts.append(f'<figure><h3>{e(figure.title)}</h3><img src="data:image/png;base64,{data}" '
                     f'alt="{e(figure.title)}"><figcaption>{e(figure.caption)}</figcaption></figure>')
    note = _evaluation_note(evaluation)
    if note:
        parts.append(f"<h2>Evaluation</h2><p>{e(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(run_uri: str, state: dict, rounds: list[RoundFiles], evaluation: Evaluation,
                    figures: list[Figure]) -> str:
    parts = [f"# TAPIR run report\n\n`{run_uri}`, generated {_generated()}\n", "## Run\n",
             "```\n" + "\n".join(status_lines(state)) + "\n```\n", "## Rounds\n",
             *(f"```\n{round_text(r)}\n```\n" for r in rounds)]
    if not rounds:
        parts.append("No round has started.\n")
    parts.append("## Plots\n")
    for figure in figures:
        parts.append(f"### {figure.title}\n\n![{figure.title}]({PLOTS_DIR}/{figure.path.name})\n\n{figure.caption}\n")
    note = _evaluation_note(evaluation)
    if note:
        parts.append(f"## Evaluation\n\n{note}\n")
    return "\n".join(parts)
