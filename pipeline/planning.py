"""The planner's two steps on the driver: which scored rows a round trains on (`plan/`), and, once the teacher
has answered them, the round's training set (`train/`). Both touch only small tables: one row per planned
instruction, never the pool's responses."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import store
from pipeline.classification import round_location
from pipeline.config import RunConfig
from pipeline.curriculum import plan_round, total_variation
from pipeline.difficulty import difficulty_location, distribution, measure, read_verdicts
from pipeline.errors import UserError
from pipeline.scoring import score_location
from training.sft_data import training_set_location

log = logging.getLogger(__name__)

PLAN = "plan"
TRAIN = "train"
_PLAN_FILE = "plan.parquet"
# What planning reads of every scored row; the texts are read for the planned rows only (at 10M rows they would
# be about 4 GB on the driver).
_SCORED_COLUMNS = ["id", "task"]


class PlanError(UserError, ValueError):
    """A round that cannot be planned (no row scored ok); the message says why and what to do."""


def plan_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child(PLAN)


def plan(config: RunConfig, round_index: int) -> dict:
    """Writes `plan/plan.parquet` (each planned row once, with its reference `output` when the pool has one, its
    `copies` and `difficulty`) and the manifest."""
    out = plan_location(config, round_index)
    finished = store.read_json(out, store.MANIFEST)
    if finished and finished.get("complete"):
        return {**finished, "skipped": True}
    curriculum = config.curriculum
    verdicts = read_verdicts(config, round_index)
    if verdicts is None:
        raise PlanError(f"{difficulty_location(config, round_index).uri}: round {round_index} has no difficulty "
                        "verdicts; score the round (tapir score) before planning it")
    # the scored rows with their verdicts, by id order, so the plan does not depend on the order Ray Data wrote
    # the files in
    scored = store.read_table(score_location(config, round_index), _SCORED_COLUMNS)
    scored = scored.append_column("position", pa.array(np.arange(scored.num_rows)))     # where its texts are
    if scored.column("id").equals(verdicts.column("id")):
        # written from these files in this order (scoring._write_verdicts): joined by position, without the hash
        # join's 330 MB at a million rows
        for name in verdicts.column_names[1:]:
            scored = scored.append_column(name, verdicts.column(name))
    else:
        scored = scored.join(verdicts, "id")
    scored = scored.take(pc.sort_indices(scored, [("id", "ascending")]))
    hard = scored.column("hard").to_pylist()
    tasks = scored.column("task").to_pylist()
    if not any(verdict is not None for verdict in hard):
        failures = Counter(scored.column("status").to_pylist())
        raise PlanError(f"{score_location(config, round_index).uri}: round {round_index} has no row scored ok "
                        f"({', '.join(f'{k}: {n}' for k, n in failures.most_common()) or 'no rows'}), so there is "
                        "nothing to plan: the rows' error column says why; fix the cause and start the run again in "
                        "a new storage.run_dir")
    chosen = plan_round(tasks, hard, round_index, curriculum.rows_per_round, curriculum.hard_share_start,
                        curriculum.hard_share_step, curriculum.task_targets,
                        curriculum.seed, max_copies=curriculum.max_copies_per_row)
    for warning in chosen.warnings():
        log.warning("round %d plan: %s", round_index, warning)
    copies = Counter(chosen.indices)
    unique = sorted(copies)
    table = scored.select(["id", "task", "difficulty_score", "difficulty_source", "position"]).take(unique)
    # the planned rows' texts, read in the files' order and put back in the plan's
    in_file_order = pc.sort_indices(table.column("position"))
    texts = store.read_rows(score_location(config, round_index), ["id", "instruction", "input", "output"],
                            table.column("position").take(in_file_order).combine_chunks())
    texts = texts.take(pc.sort_indices(in_file_order))
    if not texts.column("id").equals(table.column("id")):
        raise RuntimeError(f"{score_location(config, round_index).uri}: the scored files changed while round "
                           f"{round_index} was planned; plan it again")
    table = pa.table({"id": table.column("id"), "instruction": texts.column("instruction"),
                      "input": texts.column("input"), "output": texts.column("output"),
                      **{name: table.column(name) for name in
                                                         ("task", "difficulty_score", "difficulty_source")}})
    table = table.append_column("difficulty", pa.array(["hard" if hard[i] else "easy" for i in unique], pa.string()))
    table = table.append_column("copies", pa.array([copies[i] for i in unique], pa.int32()))
    store.write_parquet(out, _PLAN_FILE, table)
    scored_mix = Counter(task for task, verdict in zip(tasks, hard) if verdict is not None)
    summary = {
        "stage": PLAN, "round": round_index, "complete": True, "rows_scored": len(hard),
        "rows_unscored": chosen.unscored_rows, "rows_planned": len(chosen.indices), "distinct_rows": len(unique),
        "rows_wanted": chosen.rows_wanted, "max_copies_per_row": chosen.max_copies,
        "most_copies_of_a_row": max(copies.values(), default=0),
        "hard_share_target": chosen.hard_share_target, "hard_share_planned": chosen.hard_share_planned,
        "hard_rows_available": chosen.hard_rows_available, "easy_rows_available": chosen.easy_rows_available,
        "hard_rows_planned": chosen.hard_rows_planned, "easy_rows_planned": chosen.easy_rows_planned,
        "rows_outside_targets": chosen.rows_outside_targets, "warnings": chosen.warnings(),
        "task_mix_scored": dict(scored_mix.most_common()), "task_mix_planned": dict(Counter(chosen.task_mix).most_common()),
        "task_tv_scored": round(total_variation(scored_mix, curriculum.task_targets), 4),
        "task_tv_planned": round(total_variation(chosen.task_mix, curriculum.task_targets), 4),
        "difficulty": distribution([value for value, verdict in zip(scored.column("difficulty_score").to_pylist(), hard)
                                    if verdict is not None], measure(config)),
    }
    store.write_json(out, store.MANIFEST, summary)
    return summary


def read_plan(config: RunConfig, round_index: int) -> pa.Table:
    return store.read_table(plan_location(config, round_index))


def write_training_set(config: RunConfig, round_index: int, new_rows: Optional[pa.Table], answers: pa.Table) -> dict:
    """`train/part-0.parquet`: every planned row as many times as it was planned, and every kept new row once,
    each with its answer from the respond stage as `output` (the teacher's styled answer, or the pool's reference
    with respond.pool_answers 'reference'). A row the teacher could not answer is left out and counted; an answer
    cut off at max_tokens is kept and counted."""
    out = training_set_location(config, round_index)
    finished = store.read_json(out, store.MANIFEST)
    if finished and finished.get("complete"):
        return {**finished, "skipped": True}
    answer_of = {row["id"]: row for row in answers.select(
        ["id", "respond_response", "respond_status", "respond_finish_reason", "style"]).to_pylist()}
    planned = read_plan(config, round_index).to_pylist()
    rows = [{**row, "origin": "pool", "seed_id": None} for row in planned for _ in range(row["copies"])]
    if new_rows is not None:
        rows += [{**row, "origin": "expansion", "copies": 1} for row in new_rows.select(
            ["id", "instruction", "input", "task", "difficulty", "seed_id"]).to_pylist()]
    kept, unanswered, cut_off = [], Counter(), 0
    for row in rows:
        answer = answer_of.get(row["id"])
        if answer is None or answer["respond_status"] != "ok":
            unanswered[answer["respond_status"] if answer else "not_answered"] += 1
            continue
        cut_off += answer["respond_finish_reason"] == "length"
        kept.append({"id": row["id"], "instruction": row["instruction"], "input": row["input"] or "",
                     "output": answer["respond_response"], "task": row["task"], "difficulty": row["difficulty"],
                     "origin": row["origin"], "seed_id": row["seed_id"], "style": answer["style"]})
    table = pa.Table.from_pylist(kept, schema=pa.schema([
        ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()), ("output", pa.string()),
        ("task", pa.string()), ("difficulty", pa.string()), ("origin", pa.string()), ("seed_id", pa.string()),
        ("style", pa.string())]))
    store.write_parquet(out, "part-0.parquet", table)
    mix = Counter(row["task"] for row in kept)
    summary = {
        "stage": TRAIN, "round": round_index, "complete": True, "rows": len(kept),
        "rows_from_pool": sum(row["origin"] == "pool" for row in kept),
        "rows_from_expansion": sum(row["origin"] == "expansion" for row in kept),
        "hard_share": round(sum(row["difficulty"] == "hard" for row in kept) / len(kept), 3) if kept else None,
        "left_out_unanswered": dict(unanswered), "answers_cut_off": cut_off,
        "task_mix": dict(mix.most_common()),
        "task_tv": round(total_variation(mix, config.curriculum.task_targets), 4),
        "styles": dict(Counter(row["style"] for row in kept).most_common()),
    }
    store.write_json(out, store.MANIFEST, summary)
    return summary
