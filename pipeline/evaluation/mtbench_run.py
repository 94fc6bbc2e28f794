"""`tapir eval mtbench`: a model's MT-Bench score, single-answer grading 1-10 of multi-turn questions.

The model answers every question turn after turn with its chat template (multi-turn student stage, vLLM), so
turn 2's prompt is user turn 1, the model's answer 1 and user turn 2; the judge then rates each answer from 1
to 10 seeing the conversation up to it, and, for math, reasoning and coding, the reference answer when the
references file has one (grading stage, the judge endpoint's client). The means run on the driver over the
graded turns: the question set is small (MT-Bench has 80 questions, 160 turns).

OUT (default RUN_DIR/eval/NAME-mtbench/):
  input/              the questions as rows (one per question: its turns and reference answers)
  graded/             what the stages wrote; with _checkpoint/, a killed evaluation resumes without paying twice
  results.parquet     one row per question × turn: the model's answer, the rating, its status and tokens
  summary.parquet     one row: model, round, score (mean of every graded turn), turn_1_score, turn_2_score, …
  categories.parquet  model, category, score (the category's mean over its graded turns), n
  _manifest.json      the summary, with the inputs it was computed from
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from statistics import fmean
from typing import Optional, Sequence

import pyarrow as pa

from pipeline import store
from pipeline.config import PriceConfig, RunConfig
from pipeline.evaluation.eval_dir import (
    RESULTS_FILE,
    EvalError,
    absolute,
    claim,
    closing_lines,
    eval_location,
    finished_summary,
    model_name,
    write_outputs,
)
from pipeline.evaluation.mtbench import Question, QuestionId, read_questions, read_references, shows_reference
from pipeline.llm.endpoint import OpenEndpoint, RunEndpoints
from pipeline.llm.limits import cost_usd
from pipeline.models import Model, model_key, resolve_model

log = logging.getLogger(__name__)

DIR_SUFFIX = "-mtbench"
# summary.parquet's columns, in order
SUMMARY_COLUMNS = ("model", "round", "score", "turn_1_score", "turn_2_score", "questions", "turns", "turns_judged",
                   "turns_failed", "references_shown", "student_tokens", "judge_prompt_tokens",
                   "judge_completion_tokens", "cost_usd", "wall_s", "model_path", "questions_file",
                   "references_file")
_FAILURES_SHOWN = 10


def mtbench(config: RunConfig, model: str, questions_file: Optional[str] = None,
            references_file: Optional[str] = None, out: Optional[str] = None, name: Optional[str] = None,
            endpoints: Optional[RunEndpoints] = None) -> dict:
    """Evaluates `model` (a model directory, hub id or bundled:NAME) on an MT-Bench question file and returns the
    summary (also written as OUT/_manifest.json). Files left None come from `config.eval`; `name` (default from
    the model, see eval_dir.model_name) names OUT, RUN_DIR/eval/NAME-mtbench/. A finished evaluation of the
    same inputs is not run again; an interrupted one continues with the questions not yet written."""
    from pipeline.scoring import config_hash  # scoring's imports are only needed once a model is evaluated

    questions_file = questions_file or config.eval.mtbench_questions
    if not questions_file:
        raise EvalError("no questions: pass --questions FILE or set eval.mtbench_questions in the config")
    references_file = references_file or config.eval.mtbench_references
    try:
        questions = read_questions(questions_file)
        references = read_references(references_file, questions) if references_file else {}
    except ValueError as err:       # the message names the file and line
        raise EvalError(str(err)) from None
    unaided = [q.question_id for q in questions if shows_reference(q) and q.question_id not in references]
    if unaided:
        log.warning("%d math/reasoning/coding question(s) have no reference answer and are graded without one, "
                    "which is known to be unreliable (e.g. question %r); pass --references FILE",
                    len(unaided), unaided[0])
    default_name, round_index = model_name(model)
    name = name or default_name
    location = eval_location(config, name + DIR_SUFFIX, out)
    model_dir = resolve_model(model, config.storage.cache_dir, config.storage.s3_endpoint_url)
    inputs = {"model": name, "round": round_index, "model_path": model_key(model_dir),
              "questions_file": absolute(questions_file),
              "references_file": absolute(references_file) if references_file else None,
              "config_hash": config_hash(config)}
    finished = finished_summary(location, inputs)
    if finished:
        return finished
    claim(location, inputs)

    started = time.perf_counter()
    if not location.child("input").child("part-00000.parquet").exists():
        store.write_parquet(location.child("input"), "part-00000.parquet", question_rows(questions, references))
    rows = store.read_table(location.child("input"))      # a resumed evaluation goes on with the rows it began
    with contextlib.ExitStack() as stack:
        endpoints = endpoints or RunEndpoints(config.teacher, config.judge, config.storage.cache_dir, stack)
        stages, spent = _grade(config, location, model_dir, endpoints.judge())
    results = results_table(rows, store.read_table(location.child("graded")))
    summary = {**summarise(results, config.effective_judge.price), **inputs, "inputs": inputs,
               "location": location.uri, "stages": stages, "api_usage_this_run": spent,
               "wall_s": round(time.perf_counter() - started, 2)}
    write_outputs(location, results, summary, summary_table, categories_table)
    return summary


def _grade(config: RunConfig, location: store.Location, model_dir: Model,
           judge: OpenEndpoint) -> tuple[list[dict], dict]:
    """The streaming job: the model's answers turn by turn, then their grades → OUT/graded/. Returns the stage
    times and the API usage of this invocation."""
    from pipeline.jobs import job_cpus, read_parquet, write_checkpointed
    from pipeline.ray_runtime import init_ray, run_limits
    from pipeline.stages.grade import graded
    from pipeline.stages.multiturn import MultiTurnGenerator
    from pipeline.stages.student import generate

    init_ray(config.ray, min_cpus=job_cpus(config, endpoint_stages=1))
    limits = run_limits(config)

    def build():
        dataset = generate(read_parquet(location.child("input")), model_dir, config.student, MultiTurnGenerator)
        return graded(dataset, config.effective_judge, judge.base_url, judge.model, limits, config.scoring,
                      config.eval.mtbench_judge_max_tokens)

    stages = write_checkpointed(build, location.child("graded"), location.child("_checkpoint"), limits)
    return stages, asyncio.run(limits.usage_by_stage())


# ---------------------------------------------------------------- questions → rows, graded rows → results (pure)

_INPUT_SCHEMA = pa.schema([("id", pa.string()), ("question_id", pa.string()), ("category", pa.string()),
                           ("turns", pa.list_(pa.string())), ("reference_turns", pa.list_(pa.string()))])


def question_rows(questions: Sequence[Question], references: dict[QuestionId, list[str]]) -> pa.Table:
    """One row per question, in file order. Ids are strings (a file may mix integer and string ids; the
    checkpoint keys on `id`); a question's reference answers are null when the file has none for it."""
    return pa.Table.from_pylist(
        [{"id": str(q.question_id), "question_id": str(q.question_id), "category": q.category,
          "turns": list(q.turns), "reference_turns": references.get(q.question_id)} for q in questions],
        schema=_INPUT_SCHEMA)


_RESULT_SCHEMA = pa.schema([
    ("question_id", pa.string()), ("category", pa.string()), ("turn", pa.int32()), ("question", pa.string()),
    ("model_answer", pa.string()), ("model_tokens", pa.int32()), ("reference_shown", pa.bool_()),
    ("score", pa.float32()), ("status", pa.string()), ("error", pa.string()), ("judge_reply", pa.string()),
    ("judge_prompt_tokens", pa.int32()), ("judge_completion_tokens", pa.int32()),
])


def results_table(rows: pa.Table, graded: Optional[pa.Table]) -> pa.Table:
    """One result per question × turn (turns numbered from 1), in the file's order. A question the stages did
    not write (an interrupted job) is there with status 'not_written' on each turn."""
    by_id = {row["id"]: row for row in (graded.to_pylist() if graded is not None else [])}
    results = []
    for row in rows.to_pylist():
        out = by_id.get(row["id"])
        shown = row["reference_turns"] is not None and shows_reference(
            Question(row["question_id"], row["category"], tuple(row["turns"])))
        for k, user_turn in enumerate(row["turns"]):
            result = {"question_id": row["question_id"], "category": row["category"], "turn": k + 1,
                      "question": user_turn, "reference_shown": shown}
            if out is None:
                results.append({**result, "status": "not_written", "error": "the evaluation stopped before this "
                                "question was written; run the same command again"})
                continue
            answered = k < len(out["student_answers"])
            results.append({
                **result, "model_answer": out["student_answers"][k] if answered else None,
                "model_tokens": out["student_turn_tokens"][k] if answered else None,
                "score": out["judge_scores"][k], "status": out["judge_statuses"][k], "error": out["judge_errors"][k],
                "judge_reply": out["judge_replies"][k], "judge_prompt_tokens": out["judge_prompt_tokens"][k],
                "judge_completion_tokens": out["judge_completion_tokens"][k]})
    return pa.Table.from_pylist(results, schema=_RESULT_SCHEMA)


def _mean(scores: list[float]) -> Optional[float]:
    return fmean(scores) if scores else None


def summarise(results: pa.Table, judge_price: PriceConfig) -> dict:
    """Counts, mean scores (all graded turns, per turn number, per category), tokens and cost of a results
    table. Means are over the graded turns only; None where no turn was graded."""
    rows = results.to_pylist()
    judged = [r for r in rows if r["status"] == "ok"]
    by_turn, by_category = defaultdict(list), defaultdict(list)
    for r in judged:
        by_turn[r["turn"]].append(r["score"])
        by_category[r["category"]].append(r["score"])
    turn_scores = {turn: fmean(scores) for turn, scores in sorted(by_turn.items())}

    def total(column: str) -> int:
        return sum(r[column] or 0 for r in rows)

    failed = [r for r in rows if r["status"] != "ok"]
    return {
        "complete": all(r["status"] != "not_written" for r in rows),
        "questions": len({r["question_id"] for r in rows}), "turns": len(rows), "turns_judged": len(judged),
        "turns_failed": len(failed), "failed": dict(Counter(r["status"] for r in failed).most_common()),
        "failures": [{"question_id": r["question_id"], "turn": r["turn"], "status": r["status"], "error": r["error"]}
                     for r in failed],
        "references_shown": sum(1 for r in judged if r["reference_shown"]),
        "score": _mean([r["score"] for r in judged]), "turn_scores": turn_scores,
        "turn_1_score": turn_scores.get(1), "turn_2_score": turn_scores.get(2),
        "categories": {name: {"score": fmean(scores), "n": len(scores)} for name, scores in sorted(by_category.items())},
        "student_tokens": total("model_tokens"), "judge_prompt_tokens": total("judge_prompt_tokens"),
        "judge_completion_tokens": total("judge_completion_tokens"),
        "cost_usd": round(cost_usd(judge_price, total("judge_prompt_tokens"), total("judge_completion_tokens")), 6),
    }


def summary_table(summary: dict) -> pa.Table:
    """summary.parquet: one row of SUMMARY_COLUMNS."""
    def kind(column: str) -> pa.DataType:
        if column in ("model", "model_path", "questions_file", "references_file"):
            return pa.string()
        if column.endswith("score") or column in ("cost_usd", "wall_s"):
            return pa.float64()
        return pa.int64()

    return pa.Table.from_pylist([{name: summary.get(name) for name in SUMMARY_COLUMNS}],
                                schema=pa.schema([(name, kind(name)) for name in SUMMARY_COLUMNS]))


def categories_table(summary: dict) -> pa.Table:
    """categories.parquet: model, category, score (the mean of the category's graded turns), n."""
    return pa.Table.from_pylist(
        [{"model": summary["model"], "category": name, "score": value["score"], "n": value["n"]}
         for name, value in summary["categories"].items()],
        schema=pa.schema([("model", pa.string()), ("category", pa.string()), ("score", pa.float64()),
                          ("n", pa.int64())]))


def _score(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_summary(summary: dict, location: str) -> str:
    turns = ", ".join(f"turn {turn} {_score(score)}" for turn, score in summary["turn_scores"].items())
    failed = ", ".join(f"{reason} {n}" for reason, n in summary["failed"].items()) or "none"
    lines = [
        f"{summary['model']} on MT-Bench: score {_score(summary['score'])} / 10"
        + (f" ({turns})" if turns else "")
        + (" (already finished; nothing was run)" if summary.get("skipped") else ""),
        f"  questions {summary['questions']}, turns {summary['turns']}: {summary['turns_judged']} judged "
        f"({summary['references_shown']} with a reference answer); failed: {failed}",
    ]
    for failure in summary["failures"][:_FAILURES_SHOWN]:
        reason = (failure["error"] or "").strip().splitlines()[:1]
        lines.append(f"    question {failure['question_id']} turn {failure['turn']}: {failure['status']}"
                     + (f": {reason[0][:160]}" if reason else ""))
    if len(summary["failures"]) > _FAILURES_SHOWN:
        lines.append(f"    … and {len(summary['failures']) - _FAILURES_SHOWN} more in {RESULTS_FILE}")
    if summary["categories"]:
        lines.append("  by category: " + ", ".join(f"{name} {_score(value['score'])} (n {value['n']})"
                                                   for name, value in summary["categories"].items()))
    lines += [
        f"  tokens: model {summary['student_tokens']}, judge {summary['judge_prompt_tokens']} in + "
        f"{summary['judge_completion_tokens']} out; cost ${summary['cost_usd']:.4f}",
    ]
    return "\n".join(lines + closing_lines(summary, location, "questions"))
