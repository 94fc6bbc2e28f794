"""`tapir eval winrate`: a model's win rate against reference answers on held-out instructions.

The scoring round's chain over another input with another model: the held-out file is imported like a pool,
the model answers every row (student stage, vLLM), the teacher answers the rows that have no reference answer
(teacher stage: a row's own `output` is used where there is one), and the judge compares the two in both
orders (judge stage). The win-rate math (pipeline/evaluation/winrate.py) then runs on the driver over the
judged rows: the eval set is small. The model is the judged "student", the reference the judged "teacher".

Beside the judge, the reference loss: the model's mean loss per token on the row's own reference answer (the
file's `output`) given the instruction, under its chat template and training's system prompt (answer-loss
stage, the tokens training puts a loss on). It needs no judge and no sampling, so it is the same on every run
and paired by row it sees differences a small judge calls ties. A row without a reference in the file, or too
long for the engine, has none and says why (`reference_loss_status`).

Rows of the file that overlap the run's pool (the same id, i.e. the same instruction and input, or a
near-duplicate request: ROUGE-L above expansion.rouge_l_threshold against a pool row or a new row a round kept)
are dropped before the first eval.num_rows are taken, and counted with their reason: a model trained on them
would be scored on its training data. Without an imported pool in RUN_DIR no model of the run trained on
one; the summary then says the overlap was not checked.

OUT (default RUN_DIR/eval/MODEL_NAME/):
  heldout/            the imported file; rows it could not take are in heldout/_quarantine.jsonl, the rows
                      dropped as overlapping the pool (id → reason) in heldout/_overlap.json
  input/              the rows evaluated: the file's first eval.num_rows, each with its task
  judged/             what the stages wrote; with _checkpoint/, a killed evaluation resumes without paying twice
  results.parquet     one row per evaluated row: answers, where the reference came from, scores, preference,
                      reference loss
  summary.parquet     one row: model, round, win_rate, standard_error, lc_win_rate, … (what a comparison gathers)
  categories.parquet  model, category, score (the category's win rate), standard_error, n, reference_loss, …
  _manifest.json      the summary, with the inputs it was computed from
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, defaultdict
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import store
from pipeline.config import PoolConfig, PriceConfig, RunConfig
from pipeline.evaluation.eval_dir import (
    EvalError,
    absolute,
    claim,
    closing_lines,
    eval_location,
    finished_summary,
    model_name,
    write_outputs,
)
from pipeline.evaluation.winrate import (
    UNLABELLED,
    by_category,
    length_controlled_win_rate,
    mean_and_error,
    preference,
    win_rate,
)
from pipeline.llm.carried import carried_replies
from pipeline.llm.endpoint import OpenEndpoint, RunEndpoints
from pipeline.llm.judge import request_text
from pipeline.llm.limits import cost_usd
from pipeline.models import Model, model_key, resolve_model
from pipeline.pool import import_pool, pool_location, read_pool
from pipeline.schema import POOL_COLUMNS

# A row of the file may name its category under either key (MT-Bench files say "category").
_TASK_KEYS = ("task", "category")
# reference_source of a result: the teacher stage's `teacher_source` as the user knows it
_REFERENCE_SOURCES = {"reference": "file", "teacher": "teacher"}
# the file's reference answer, whose loss under the model is the reference loss
REFERENCE_COLUMN = "output"
_OVERLAP_FILE = "_overlap.json"
CATEGORIES_SCHEMA = pa.schema([
    ("model", pa.string()), ("category", pa.string()), ("score", pa.float64()), ("standard_error", pa.float64()),
    ("n", pa.int64()), ("reference_loss", pa.float64()), ("reference_loss_standard_error", pa.float64()),
    ("reference_loss_n", pa.int64())])
# summary.parquet's columns, in order; the first five are what pipeline/report.py's COMPARE_COLUMNS reads
SUMMARY_COLUMNS = ("model", "round", "win_rate", "standard_error", "lc_win_rate", "lc_standard_error",
                   "length_slope", "rows", "rows_judged", "rows_failed", "wins", "ties", "losses",
                   "reference_loss", "reference_loss_standard_error", "reference_loss_rows", "rows_overlapping_pool",
                   "references_from_file", "references_from_teacher", "student_tokens", "teacher_prompt_tokens",
                   "teacher_completion_tokens", "judge_prompt_tokens", "judge_completion_tokens", "cost_usd",
                   "wall_s", "model_path", "eval_file")


def overlapping_rows(ids: list[str], requests: list[str], pool_batches: Iterable[tuple[list[str], list[str]]],
                     threshold: float) -> dict[str, str]:
    """Held-out row id → why it overlaps the pool: "same_id" (the pool has a row with its id, i.e. its
    instruction and input), or "near_duplicate" (ROUGE-L of its request above `threshold` against a pool
    request, as expansion drops new rows); rows that do not overlap are absent. `pool_batches`: (ids, request
    texts) of the pool in batches, read once."""
    from pipeline.dedup import near_duplicates

    wanted, in_pool = set(ids), set()

    def texts(batches):
        for batch_ids, batch_texts in batches:
            in_pool.update(wanted.intersection(batch_ids))
            yield batch_texts

    duplicates = near_duplicates(requests, texts(pool_batches), threshold=threshold)
    reasons = {}
    for row, duplicate in zip(ids, duplicates):
        if row in in_pool:
            reasons[row] = "same_id"
        elif duplicate is not None and duplicate.source == "pool":     # not another held-out row
            reasons[row] = "near_duplicate"
    return reasons


def without_overlap(config: RunConfig, heldout: pa.Table) -> tuple[pa.Table, Optional[dict[str, str]]]:
    """The held-out rows that do not overlap the run's pool and its rounds' new rows, and the ids dropped with
    their reason; None for the latter when the run has no imported pool (nothing was checked)."""
    from pipeline.expansion import pool_requests

    if not pool_location(config).child(store.MANIFEST).exists():
        return heldout, None
    requests = [request_text(i, x or "") for i, x in zip(heldout.column("instruction").to_pylist(),
                                                         heldout.column("input").to_pylist())]
    dropped = overlapping_rows(heldout.column("id").to_pylist(), requests,
                               pool_requests(config, config.curriculum.rounds), config.expansion.rouge_l_threshold)
    keep = [row not in dropped for row in heldout.column("id").to_pylist()]
    return heldout.filter(pa.array(keep, pa.bool_())), dropped


def overlap_summary(dropped: Optional[dict[str, str]]) -> dict:
    """What the summary says of the overlap: checked or not, and how many rows were dropped for each reason."""
    return {"overlap_checked": dropped is not None, "rows_overlapping_pool": len(dropped or {}),
            "overlapping": dict(Counter((dropped or {}).values()).most_common())}


def evaluated_rows(heldout: pa.Table, num_rows: int) -> pa.Table:
    """The first `num_rows` rows of an imported file (pool columns), with `task` taken from their other fields."""
    rows = heldout.slice(0, num_rows)
    tasks = []
    for meta in rows.column("meta").to_pylist():
        fields = json.loads(meta) if meta else {}
        task = next((fields[key] for key in _TASK_KEYS if fields.get(key) not in (None, "")), None)
        tasks.append(None if task is None else str(task))
    return rows.select(list(POOL_COLUMNS)).append_column("task", pa.array(tasks, pa.string()))


def winrate(config: RunConfig, model: str, eval_file: Optional[str] = None, out: Optional[str] = None,
            num_rows: Optional[int] = None, name: Optional[str] = None, round_index: Optional[int] = None,
            endpoints: Optional[RunEndpoints] = None) -> dict:
    """Evaluates `model` (a model directory, hub id or bundled:NAME) on the held-out file and returns the
    summary (also written as OUT/_manifest.json). Arguments left None come from `config.eval`; `name` names OUT
    under RUN_DIR/eval/ and the model in the results, with `round_index` its round (both from the model when no
    name is given, see model_name). A finished evaluation of the same inputs is not run again; an interrupted
    one continues with the rows not yet written."""
    from pipeline.scoring import config_hash  # scoring's imports are only needed once a model is evaluated

    eval_file = eval_file or config.eval.held_out_path
    if not eval_file:
        raise EvalError("no held-out file: pass --eval FILE or set eval.held_out_path in the config")
    num_rows = num_rows or config.eval.num_rows
    if name is None:
        name, round_index = model_name(model)
    location = eval_location(config, name, out)
    model_dir = resolve_model(model, config.storage.cache_dir, config.storage.s3_endpoint_url)
    inputs = {"model": name, "round": round_index, "model_path": model_key(model_dir), "eval_file": absolute(eval_file),
              "num_rows": num_rows, "config_hash": config_hash(config),
              # an evaluation from before the reference loss has none in its rows: it is refused, not mixed in
              "reference_loss_of": REFERENCE_COLUMN}
    finished = finished_summary(location, inputs)
    if finished:
        return finished
    claim(location, inputs)

    started = time.perf_counter()
    rows, quarantined, overlap = input_rows(config, location, eval_file, num_rows)
    with contextlib.ExitStack() as stack:
        endpoints = endpoints or RunEndpoints(config.teacher, config.judge, config.storage.cache_dir, stack)
        stages, spent = _judge(config, location, model_dir, endpoints.teacher(), endpoints.judge())
    judged_rows = store.read_table(location.child("judged"))
    results = results_table(rows, judged_rows)
    summary = {**summarise(results, config.teacher.price, config.effective_judge.price), **inputs,
               "inputs": inputs, "location": location.uri, "quarantined": quarantined, **overlap, "stages": stages,
               "api_usage_this_run": spent, "wall_s": round(time.perf_counter() - started, 2)}
    write_outputs(location, results, summary, summary_table, categories_table)
    return summary


def input_rows(config: RunConfig, location: store.Location, eval_file: str, num_rows: int,
               by_id: bool = False) -> tuple[pa.Table, int, dict]:
    """The rows to evaluate (written to OUT/input/ on the first invocation, read back on a resumed one), how
    many rows of the file were quarantined, and the overlap with the pool (overlap_summary). The file's first
    num_rows rows that do not overlap, or with `by_id` the first in id order: a sample spread over a file whose
    rows are grouped (by category, say), the same every time."""
    source = location.child("input")
    heldout = location.child("heldout")
    if not source.child("part-00000.parquet").exists():
        import_pool([eval_file], heldout, PoolConfig(max_row_chars=config.pool.max_row_chars), overwrite=True,
                    progress=False)
        kept, dropped = without_overlap(config, read_pool(heldout))
        if by_id:
            kept = kept.take(pc.sort_indices(kept, [("id", "ascending")]))
        store.write_json(heldout, _OVERLAP_FILE, {"checked": dropped is not None, "dropped": dropped or {}})
        store.write_parquet(source, "part-00000.parquet", evaluated_rows(kept, num_rows))
    manifest = store.read_json(heldout, store.MANIFEST) or {}
    # an evaluation begun before the overlap check has no record of it: it was not checked
    overlap = store.read_json(heldout, _OVERLAP_FILE) or {"checked": False}
    return (read_pool(source), int(manifest.get("failed", 0)),
            overlap_summary(overlap["dropped"] if overlap["checked"] else None))


def _judge(config: RunConfig, location: store.Location, model_dir: Model, teacher: OpenEndpoint,
           judge: OpenEndpoint) -> tuple[list[dict], dict]:
    """The streaming job: model answers, references, judged pairs → OUT/judged/. Returns the stage times and the
    API usage of this invocation."""
    from pipeline.jobs import read_parquet, write_checkpointed
    from pipeline.ray_runtime import init_ray, run_limits
    from pipeline.stages.answer_loss import answers_and_losses
    from pipeline.stages.judge import judged
    from pipeline.stages.teacher import answered

    init_ray(config.ray, min_cpus=eval_cpus(config))
    limits = run_limits(config)

    def build():
        # the model's answers and its loss on the reference answers, from the same engines
        dataset = answers_and_losses(read_parquet(location.child("input")), model_dir, config.student,
                                     REFERENCE_COLUMN, config.training.system_prompt)
        # keep_reference_outputs: a row's own answer is its reference; the teacher answers only the others
        dataset = answered(dataset, config.teacher, teacher.base_url, teacher.model, limits, config.scoring, True,
                           carried)
        return judged(dataset, config.effective_judge, judge.base_url, judge.model, limits, config.scoring, carried,
                      teacher.model)

    carried = carried_replies(location)

    stages = write_checkpointed(build, location.child("judged"), location.child("_checkpoint"), limits)
    return stages, asyncio.run(limits.usage_by_stage())


def eval_cpus(config: RunConfig) -> int:
    """Logical CPUs the evaluation job needs: the model's engines (answers and reference loss) and two endpoint
    stages (teacher, judge)."""
    from pipeline.jobs import job_cpus

    return job_cpus(config, endpoint_stages=2)


# ---------------------------------------------------------------- judged rows → results and summary (pure)

_RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()), ("task", pa.string()),
    ("model_answer", pa.string()), ("reference_answer", pa.string()), ("reference_source", pa.string()),
    ("model_score", pa.float32()), ("reference_score", pa.float32()), ("preference", pa.float32()),
    ("model_length", pa.int32()), ("reference_length", pa.int32()), ("model_tokens", pa.int32()),
    ("teacher_prompt_tokens", pa.int32()), ("teacher_completion_tokens", pa.int32()),
    ("judge_prompt_tokens", pa.int32()), ("judge_completion_tokens", pa.int32()),
    ("status", pa.string()), ("error", pa.string()),
    ("reference_loss", pa.float32()), ("reference_loss_tokens", pa.int32()), ("reference_loss_status", pa.string()),
    ("reference_loss_error", pa.string()),
])


def results_table(rows: pa.Table, judged: Optional[pa.Table]) -> pa.Table:
    """One result per evaluated row, in the file's order. A row the stages did not write (an interrupted job)
    is there with status 'not_written'; `preference` (1 win, 0.5 tie, 0 loss for the model) only for judged rows.
    Lengths are in characters, as AlpacaEval's length control measures them. `reference_loss` (mean nats per
    token of the file's reference answer) where reference_loss_status is 'ok', whatever the judge made of the
    row."""
    by_id = {row["id"]: row for row in (judged.to_pylist() if judged is not None else [])}
    results = []
    for row in rows.select(["id", "instruction", "input", "task"]).to_pylist():
        out = by_id.get(row["id"])
        if out is None:
            results.append({**row, "status": "not_written",
                            "error": "the evaluation stopped before this row was written; run the same command again"})
            continue
        ok = out["status"] == "ok"
        model_answer, reference = out["student_response"], out["teacher_response"]
        results.append({
            **row, "model_answer": model_answer, "reference_answer": reference,
            "reference_source": _REFERENCE_SOURCES.get(out["teacher_source"]) if reference is not None else None,
            "model_score": out["student_score"], "reference_score": out["teacher_score"],
            "preference": preference(out["student_score"], out["teacher_score"]) if ok else None,
            "model_length": len(model_answer) if model_answer is not None else None,
            "reference_length": len(reference) if reference is not None else None,
            "model_tokens": out["student_tokens"],
            **{name: out[name] for name in ("teacher_prompt_tokens", "teacher_completion_tokens",
                                            "judge_prompt_tokens", "judge_completion_tokens")},
            "status": out["status"], "error": out["error"],
            "reference_loss": out["answer_loss"], "reference_loss_tokens": out["answer_tokens"],
            "reference_loss_status": out["answer_status"], "reference_loss_error": out["answer_error"]})
    return pa.Table.from_pylist(results, schema=_RESULT_SCHEMA)


def summarise(results: pa.Table, teacher_price: PriceConfig, judge_price: PriceConfig) -> dict:
    """Counts, win rates (raw, length-controlled, per category), the reference loss (overall, per category),
    tokens and cost of a results table. Rates are over the judged rows only, None when no row was judged; the
    loss is over the rows it was computed for, None when there are none, and the others are counted by reason."""
    rows = results.to_pylist()
    judged = [r for r in rows if r["status"] == "ok"]
    scored = [r for r in rows if r["reference_loss_status"] == "ok"]
    loss, loss_error = mean_and_error([r["reference_loss"] for r in scored]) if scored else (None, None)
    statuses = Counter(r["status"] for r in rows if r["status"] != "ok")
    sources = Counter(r["reference_source"] for r in rows)

    def total(column: str) -> int:
        return sum(r[column] or 0 for r in rows)

    teacher_cost = cost_usd(teacher_price, total("teacher_prompt_tokens"), total("teacher_completion_tokens"))
    judge_cost = cost_usd(judge_price, total("judge_prompt_tokens"), total("judge_completion_tokens"))
    summary = {
        "complete": statuses["not_written"] == 0, "rows": len(rows), "rows_judged": len(judged),
        "rows_failed": len(rows) - len(judged), "failed": dict(statuses.most_common()),
        "references_from_file": sources["file"], "references_from_teacher": sources["teacher"],
        "student_tokens": total("model_tokens"),
        **{column: total(column) for column in ("teacher_prompt_tokens", "teacher_completion_tokens",
                                                "judge_prompt_tokens", "judge_completion_tokens")},
        "cost_usd": round(teacher_cost + judge_cost, 6),
        "win_rate": None, "standard_error": None, "wins": 0, "ties": 0, "losses": 0, "lc_win_rate": None,
        "lc_standard_error": None, "length_slope": None,
        "reference_loss": loss, "reference_loss_standard_error": loss_error, "reference_loss_rows": len(scored),
        "reference_loss_failed": dict(Counter(r["reference_loss_status"] or "not_written" for r in rows
                                              if r["reference_loss_status"] != "ok").most_common()),
        "categories": _categories(judged, scored),
    }
    if not judged:
        return summary
    preferences = [r["preference"] for r in judged]
    raw = win_rate(preferences)
    controlled = length_controlled_win_rate(preferences, [r["model_length"] for r in judged],
                                            [r["reference_length"] for r in judged])
    return {**summary, "win_rate": raw.rate, "standard_error": raw.standard_error, "wins": raw.wins,
            "ties": raw.ties, "losses": raw.losses, "lc_win_rate": controlled.rate,
            "lc_standard_error": controlled.standard_error, "length_slope": controlled.length_slope}


def _categories(judged: list[dict], scored: list[dict]) -> dict[str, dict]:
    """Per category (sorted; rows without one under 'unlabelled'): the win rate over its judged rows and the
    reference loss over its scored rows, each with its standard error and row count (None and 0 without rows)."""
    rates = by_category([r["preference"] for r in judged], [r["task"] for r in judged]) if judged else {}
    grouped: dict[str, list[float]] = defaultdict(list)
    for r in scored:
        grouped[r["task"] or UNLABELLED].append(r["reference_loss"])
    categories = {}
    for name in sorted(rates.keys() | grouped.keys()):
        rate = rates.get(name)
        loss, loss_error = mean_and_error(grouped[name]) if grouped.get(name) else (None, None)
        categories[name] = {"win_rate": rate.rate if rate else None, "standard_error": rate.standard_error if rate
                            else None, "n": rate.n if rate else 0, "reference_loss": loss,
                            "reference_loss_standard_error": loss_error, "reference_loss_n": len(grouped.get(name, []))}
    return categories


def summary_table(summary: dict) -> pa.Table:
    """summary.parquet: one row of SUMMARY_COLUMNS."""
    return pa.Table.from_pylist([{name: summary.get(name) for name in SUMMARY_COLUMNS}],
                                schema=pa.schema([(name, _summary_type(name)) for name in SUMMARY_COLUMNS]))


def _summary_type(column: str) -> pa.DataType:
    if column in ("model", "model_path", "eval_file"):
        return pa.string()
    if column in ("win_rate", "standard_error", "lc_win_rate", "lc_standard_error", "length_slope", "cost_usd",
                  "wall_s", "reference_loss", "reference_loss_standard_error"):
        return pa.float64()
    return pa.int64()


def categories_table(summary: dict) -> pa.Table:
    """categories.parquet: model, category, score (the category's win rate), standard_error, n, and its
    reference loss: reference_loss, reference_loss_standard_error, reference_loss_n."""
    return pa.Table.from_pylist(
        [{"model": summary["model"], "category": name, "score": value["win_rate"], **value}
         for name, value in summary["categories"].items()], schema=CATEGORIES_SCHEMA)


def _percent(rate: Optional[float], error: Optional[float]) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}% ± {100 * error:.1f}%"


def _loss(loss: Optional[float], error: Optional[float]) -> str:
    return "n/a" if loss is None else f"{loss:.4f} ± {error:.4f}"


def format_summary(summary: dict, location: str) -> str:
    failed = ", ".join(f"{reason} {n}" for reason, n in summary["failed"].items()) or "none"
    lines = [
        f"{summary['model']} vs references: win rate {_percent(summary['win_rate'], summary['standard_error'])} "
        f"({summary['rows_judged']} judged: {summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses)"
        + (" (already finished; nothing was run)" if summary.get("skipped") else ""),
        f"  length-controlled {_percent(summary['lc_win_rate'], summary['lc_standard_error'])}"
        + (f" (judge's length slope {summary['length_slope']:+.2f})" if summary["length_slope"] is not None else ""),
        f"  rows {summary['rows']} (references: file {summary['references_from_file']}, teacher "
        f"{summary['references_from_teacher']}); failed: {failed}"
        + (f"; {summary['quarantined']} row(s) of the file quarantined" if summary.get("quarantined") else ""),
    ]
    unscored = ", ".join(f"{reason} {n}" for reason, n in summary["reference_loss_failed"].items()) or "none"
    lines.append(f"  reference loss {_loss(summary['reference_loss'], summary['reference_loss_standard_error'])} "
                 f"nats/token ({summary['reference_loss_rows']} rows; without: {unscored})")
    overlapping = ", ".join(f"{reason} {n}" for reason, n in summary["overlapping"].items())
    lines.append(f"  {summary['rows_overlapping_pool']} row(s) of the file overlap the pool and were dropped"
                 + (f" ({overlapping})" if overlapping else "") if summary["overlap_checked"] else
                 "  overlap with the pool not checked: the run has no imported pool")
    if summary["categories"]:
        lines.append("  by category: " + ", ".join(
            f"{name} {_percent(value['win_rate'], value['standard_error'])} (n {value['n']}), loss "
            f"{_loss(value['reference_loss'], value['reference_loss_standard_error'])}"
            for name, value in summary["categories"].items()))
    lines += [
        f"  tokens: model {summary['student_tokens']}, teacher {summary['teacher_prompt_tokens']} in + "
        f"{summary['teacher_completion_tokens']} out, judge {summary['judge_prompt_tokens']} in + "
        f"{summary['judge_completion_tokens']} out; cost ${summary['cost_usd']:.4f}",
    ]
    return "\n".join(lines + closing_lines(summary, location, "rows"))
