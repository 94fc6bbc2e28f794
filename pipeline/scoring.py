"""`tapir score`: one scoring round, pool → classify → student → teacher → judge → run/round_R/score/.

One streaming Ray Dataset from the pool's shards to the scored Parquet files, so every stage works at
once (each has its own progress bar); resumable under kill -9 (pipeline/jobs.py). With IFD difficulty
(curriculum.difficulty ifd or hybrid, or auto with a judge its calibration does not trust) the student does not generate: its answer-loss stage follows the teacher's
and there is no judge; hybrid then runs a second job, student and judge over the rows IFD leaves in doubt only
(round_R/judge_band/). Last, the round's verdicts (pipeline/difficulty.py) go to round_R/difficulty/.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import Counter
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import jobs, store
from pipeline.classification import (
    checkpoint_location,
    classified,
    classifier_location,
    classifier_summary,
    ensure_classifier,
    model_location,
    round_location,
    run_dir,
)
from pipeline.config import RunConfig
from pipeline.difficulty import (
    JUDGE_COLUMNS,
    band_ids,
    distribution,
    format_distribution,
    measure,
    method,
    read_verdicts,
    score_columns,
    verdicts,
    write_verdicts,
)
from pipeline.jobs import finish, read_parquet, write_checkpointed
from pipeline.judge_calibration import calibrate
from pipeline.llm.carried import carried_replies
from pipeline.llm.endpoint import OpenEndpoint, RunEndpoints
from pipeline.llm.limits import cost_usd
from pipeline.models import Model, resolve_model, run_model
from pipeline.pool import check_shards, ensure_pool
from pipeline.round_summary import labels_and_judge

STAGE = "score"
BAND_STAGE = "judge_band"
# What the stage summary reads back from the written rows (never the responses: the summary stays small).
_TEACHER_USAGE = ["teacher_prompt_tokens", "teacher_completion_tokens"]
_JUDGE_USAGE = JUDGE_COLUMNS[4:]


def score_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child(STAGE)


def band_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child(BAND_STAGE)


def config_hash(config: RunConfig) -> str:
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def student_model(config: RunConfig, round_index: int) -> Model:
    """Round 0 scores the configured student; round r the student trained in round r-1 (on object storage
    too: whoever loads it copies it to their node's cache, models.local_model)."""
    if round_index == 0:
        return resolve_model(config.student.model, config.storage.cache_dir, config.storage.s3_endpoint_url)
    trained = model_location(config, round_index - 1)
    if not trained.child("config.json").exists():
        raise FileNotFoundError(f"{trained.uri}: no student trained in round {round_index - 1}; "
                                f"train it before scoring round {round_index}")
    return run_model(trained, config.storage.cache_dir)


def score(config: RunConfig, round_index: int = 0, progress: bool = True,
          endpoints: Optional[RunEndpoints] = None) -> dict:
    """Scores the pool for one round and returns the stage summary (also written as its manifest).

    Round 0 reads the pool and classifies it; a later round reads round 0's scored rows, so the task labels
    and the teacher's answers are reused (no call is paid twice) and only the new student and the judge run.
    A finished round is not scored again; an interrupted one continues with the rows not yet written.
    `endpoints`: the run's open teacher and judge; without them they are opened (and closed) here.
    """
    from pipeline.ray_runtime import init_ray, run_limits

    out = score_location(config, round_index)
    finished = store.read_json(out, store.MANIFEST)
    if finished and finished.get("complete"):
        if read_verdicts(config, round_index) is None:      # a round scored before there were verdicts
            _write_verdicts(config, round_index)
        return {**finished, "skipped": True}
    source, rows_in = _source(config, round_index)
    student = student_model(config, round_index)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        endpoints = endpoints or RunEndpoints(config.teacher, config.judge, config.storage.cache_dir, stack)
        # before the job pays for judging: whether the judge can tell at all (paid once, kept in the run directory);
        # with difficulty 'auto' its verdict chooses the measure (difficulty.method)
        calibrate_now = round_index == 0 and (config.judge_calibration.enabled or config.curriculum.difficulty == "auto")
        # a local teacher that nothing here would call is not started (a `vllm serve` start is half a minute)
        teacher = endpoints.teacher() if needs_teacher(config, round_index, source) else None
        judge = endpoints.judge() if calibrate_now or method(config) != "ifd" else None
        init_ray(config.ray, min_cpus=job_cpus(config))
        limits = run_limits(config)          # labelling a sample for the classifier is paid under them too
        classifier = ensure_classifier(config, teacher, limits, progress) if round_index == 0 else None
        calibration = calibrate(config, judge, limits, source) if calibrate_now else None
        job_started = time.perf_counter()
        stages, spent = _run(config, round_index, source, classifier, student, teacher, judge, limits)
        job_s = time.perf_counter() - job_started
    summary = summarise(config, round_index, rows_in, _write_verdicts(config, round_index), stages, spent,
                        {"setup_s": round(job_started - started, 2), "job_s": round(job_s, 2),
                         "wall_s": round(time.perf_counter() - started, 2)})
    if round_index == 0:
        summary.update(classifier=classifier_summary(config), judge_calibration=calibration)
    store.write_json(out, store.MANIFEST, summary)
    if summary["complete"]:
        for stage in (STAGE, BAND_STAGE):
            finish(checkpoint_location(config, round_index, stage))
    return summary


def _source(config: RunConfig, round_index: int) -> tuple[store.Location, int]:
    """What the round scores, and its row count: the pool in round 0, round 0's scored rows afterwards."""
    if round_index == 0:
        pool_dir, _ = ensure_pool(config)
        return pool_dir, check_shards(pool_dir)
    first = score_location(config, 0)
    manifest = store.read_json(first, store.MANIFEST)
    if not (manifest and manifest.get("complete")):
        raise FileNotFoundError(f"{first.uri}: round 0 is not scored; score it before round {round_index}")
    return first, manifest["rows_out"]


def needs_teacher(config: RunConfig, round_index: int, source: store.Location) -> bool:
    """Whether scoring may call the teacher: to label the classifier's sample, to relabel unsure rows, or to
    answer a row the pool has no reference answer for (or every row, when references are not kept). The rows
    without one are counted from the Parquet footers' null counts; a file without statistics counts as having
    some."""
    labels_sample = (round_index == 0 and not config.classifier.labels_path
                     and not classifier_location(config).child("config.json").exists())
    if labels_sample or config.classifier.teacher_relabels_low_confidence:
        return True
    if not config.curriculum.keep_reference_outputs:
        return True
    return any(count is None or count > 0 for count in _null_counts(source, "output"))


def _null_counts(location: store.Location, column: str) -> Iterator[Optional[int]]:
    """Each row group's null count of `column` in the Parquet files under `location` (None: no statistics)."""
    import pyarrow.parquet as pq

    for path in location.list_files(".parquet"):
        metadata = pq.ParquetFile(path, filesystem=location.fs).metadata
        index = metadata.schema.to_arrow_schema().get_field_index(column)
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(index).statistics
            yield statistics.null_count if statistics is not None and statistics.has_null_count else None


def _run(config: RunConfig, round_index: int, source: store.Location, classifier: Optional[Model],
         student: Model, teacher: Optional[OpenEndpoint], judge: Optional[OpenEndpoint],
         limits) -> tuple[list[dict], dict]:
    """The streaming job (and hybrid's band job); returns the time of each stage and the API usage of this
    invocation."""
    from pipeline.stages.answer_loss import answer_losses
    from pipeline.stages.judge import judged
    from pipeline.stages.student import generate
    from pipeline.stages.teacher import answered

    by_judge = method(config) == "judge"

    def build():
        dataset = read_parquet(source)
        if classifier is not None:
            dataset = classified(dataset, config, classifier, teacher)
        if by_judge:
            dataset = generate(dataset, student, config.student)
        # without a teacher (needs_teacher) every row keeps its reference and the stage makes no call
        dataset = answered(dataset, config.teacher, teacher.base_url if teacher else None, config.teacher.served_model,
                           limits, config.scoring, config.curriculum.keep_reference_outputs, carried)
        if by_judge:
            return judged(dataset, config.effective_judge, judge.base_url, judge.model, limits, config.scoring,
                          carried, config.teacher.served_model)
        # IFD: the student's loss on the teacher's answer with and without the instruction; no generation
        return answer_losses(dataset, student, config.student, "teacher_response", True,
                             config.training.system_prompt)

    def build_band():
        # the band is known once every row has its IFD; the same rows on a re-run (ranked by IFD, then id)
        band = set(band_ids(config, store.read_table(score_location(config, round_index), score_columns(config))))
        dataset = read_parquet(score_location(config, round_index)).filter(lambda row: row["id"] in band)
        dataset = generate(dataset, student, config.student)
        return judged(dataset, config.effective_judge, judge.base_url, judge.model, limits, config.scoring)

    carried = carried_replies(run_dir(config))

    stages = write_checkpointed(build, score_location(config, round_index),
                                checkpoint_location(config, round_index, STAGE), limits)
    if method(config) == "hybrid":
        stages += write_checkpointed(build_band, band_location(config, round_index),
                                     checkpoint_location(config, round_index, BAND_STAGE), limits)
    return stages, asyncio.run(limits.usage_by_stage())


def job_cpus(config: RunConfig) -> int:
    """Logical CPUs the scoring job needs: jobs.job_cpus with the classifier's actors and, when it relabels,
    a third endpoint stage."""
    return jobs.job_cpus(config, endpoint_stages=2 + int(config.classifier.teacher_relabels_low_confidence),
                         model_actors=config.classifier.num_actors)


def _write_verdicts(config: RunConfig, round_index: int) -> pa.Table:
    """Writes the round's difficulty verdicts from the rows written so far; returns them as summary_rows."""
    by_judge = method(config) == "judge"
    columns = score_columns(config) + _TEACHER_USAGE + (_JUDGE_USAGE if by_judge else [])
    scored = store.read_table(score_location(config, round_index), columns)
    scored = scored if scored is not None else pa.table({name: [] for name in columns})   # nothing written yet
    band = None if by_judge else store.read_table(band_location(config, round_index), JUDGE_COLUMNS)
    verdict = verdicts(config, scored, band)
    write_verdicts(config, round_index, verdict)
    return summary_rows(verdict, scored, band)


def summary_rows(verdict: pa.Table, scored: pa.Table, band: Optional[pa.Table]) -> pa.Table:
    """Each verdict with its row's usage. Row k of `verdict` is row k of `scored` (difficulty.verdicts keeps the
    order), so the teacher's usage, and the judge's where the judge saw every row, are taken by position; with
    hybrid the judge's is that of `band`, the rows it judged, by id. Never a dict per row: at a million rows
    those would take the driver about a gigabyte (benchmarks/bench_verdicts_memory.py)."""
    table = verdict
    for name in _TEACHER_USAGE:
        table = table.append_column(name, scored.column(name))
    if set(_JUDGE_USAGE) <= set(scored.column_names):          # the judge scored every row
        table = table.append_column("judged", pa.array([True] * table.num_rows, pa.bool_()))
        for name in _JUDGE_USAGE:
            table = table.append_column(name, scored.column(name))
    elif band is not None:
        table = table.append_column("judged", pc.is_in(table.column("id"), band.column("id")))
        # one usage row per id (a row written twice by an interrupted job counts its larger usage)
        per_id = band.select(["id"] + _JUDGE_USAGE).group_by("id").aggregate([(n, "max") for n in _JUDGE_USAGE])
        table = table.join(per_id.rename_columns(["id"] + _JUDGE_USAGE), "id", join_type="left outer")
    else:
        table = table.append_column("judged", pa.array([False] * table.num_rows, pa.bool_()))
        for name in _JUDGE_USAGE:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.int64()))
    for name in _TEACHER_USAGE + _JUDGE_USAGE:
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pc.fill_null(table.column(name).cast(pa.int64()), 0))
    return table


def _distinct(ids: pa.ChunkedArray) -> int:
    """Distinct ids, counted in sorted order: a third of the memory of Arrow's hash count at a million ids."""
    ordered = ids.take(pc.sort_indices(ids)).combine_chunks()
    repeats = pc.sum(pc.equal(ordered.slice(1), ordered.slice(0, max(0, len(ordered) - 1)))).as_py()
    return len(ordered) - int(repeats or 0)


def _sum(table: pa.Table, column: str) -> int:
    return int(pc.sum(table.column(column)).as_py() or 0)


def summarise(config: RunConfig, round_index: int, rows_in: int, scored: pa.Table, stages: list[dict],
              spent: dict, times: dict) -> dict:
    """`scored`: summary_rows of the round. `times`: wall_s for the command, setup_s (endpoints, classifier) and
    job_s (the streaming job) in it."""
    unique = _distinct(scored.column("id"))
    statuses = Counter({row["values"]: row["counts"] for row in pc.value_counts(scored.column("status")).to_pylist()})
    ok = statuses.pop("ok", 0)
    hard = scored.column("hard")
    hard_rows = _sum(scored, "hard")
    scores = pc.filter(scored.column("difficulty_score"), pc.equal(scored.column("status"), "ok"))
    judged = _sum(scored, "judged")
    teacher_tokens = {"prompt": _sum(scored, "teacher_prompt_tokens"),
                      "completion": _sum(scored, "teacher_completion_tokens")}
    judge_tokens = {"prompt": _sum(scored, "judge_prompt_tokens"), "completion": _sum(scored, "judge_completion_tokens")}
    teacher_cost = cost_usd(config.teacher.price, teacher_tokens["prompt"], teacher_tokens["completion"])
    judge_cost = cost_usd(config.effective_judge.price, judge_tokens["prompt"], judge_tokens["completion"])
    return {
        "stage": STAGE, "round": round_index, "config_hash": config_hash(config),
        # complete: every pool row is in the output exactly once
        "complete": scored.num_rows == unique == rows_in,
        "rows_in": rows_in, "rows_out": scored.num_rows, "duplicate_rows": scored.num_rows - unique,
        "rows_ok": ok, "failed": dict(statuses.most_common()),
        "difficulty_measure": method(config), "hard_rows": hard_rows, "easy_rows": pc.count(hard).as_py() - hard_rows,
        "difficulty": distribution(scores.to_numpy(zero_copy_only=False), measure(config)),
        # rows the judge stage saw (both orders: two requests each), and the rows decided by its MFD
        "judged_rows": judged, "judge_requests_per_row": round(2 * judged / rows_in, 3) if rows_in else None,
        "decided_by_judge": int(pc.sum(pc.equal(scored.column("difficulty_source"), "judge")).as_py() or 0),
        "tokens": {"student_completion": _sum(scored, "student_tokens"), "teacher": teacher_tokens,
                   "judge": judge_tokens},
        "cost_usd": {"teacher": round(teacher_cost, 6), "judge": round(judge_cost, 6),
                     "total": round(teacher_cost + judge_cost, 6)},
        # this invocation only: every call it sent, including those of rows lost to an interruption
        "api_usage_this_run": spent,
        "stages": stages, **times,
    }


def format_summary(summary: dict, location: str) -> str:
    failed = ", ".join(f"{reason} {count}" for reason, count in summary["failed"].items()) or "none"
    tokens = summary["tokens"]
    lines = [
        f"round {summary['round']} scored: {summary['rows_out']} of {summary['rows_in']} rows written to {location}"
        + (" (already finished; nothing was run)" if summary.get("skipped") else ""),
        f"  ok {summary['rows_ok']}; failed: {failed}",
        f"  difficulty by {summary['difficulty_measure']}: hard {summary['hard_rows']}, easy {summary['easy_rows']}"
        f" ({summary['decided_by_judge']} decided by the judge, {summary['judge_requests_per_row']} judge requests a "
        f"row); {format_distribution(summary['difficulty'])}",
        f"  tokens: student {tokens['student_completion']}, teacher {tokens['teacher']['prompt']} in + "
        f"{tokens['teacher']['completion']} out, judge {tokens['judge']['prompt']} in + "
        f"{tokens['judge']['completion']} out; cost ${summary['cost_usd']['total']:.4f}",
    ]
    if summary["stages"]:
        lines.append("  stages (active s): " + ", ".join(f"{s['stage']} {s['active_s']:.1f}" for s in summary["stages"]))
    lines.append(f"  wall time {summary['wall_s']:.1f} s (start-up {summary['setup_s']:.1f} s, "
                 f"streaming job {summary['job_s']:.1f} s)")
    if not summary["complete"]:
        lines.append(f"  INCOMPLETE: {summary['rows_out']} rows written for {summary['rows_in']} in the pool, "
                     f"{summary['duplicate_rows']} of them duplicates; run the same command again")
    return "\n".join(lines + labels_and_judge(summary))
