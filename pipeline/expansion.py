"""The expand stage of a round: seeds from the plan → the teacher writes new instructions → the task classifier
labels them (one checkpointed Ray Data job, `expand/generated/`) → the driver keeps those that are whole,
long enough and not near-duplicates of the pool or of each other (`expand/new_rows.parquet`, every generated
row with its `status`; only `ok` rows go on).

Near-duplicates are judged over the whole set at once, so that step runs on the driver after the job: the
new rows are indexed (MinHash/LSH, pipeline/dedup.py) and the pool streams past them in batches, so memory
grows with the new rows, not with the pool.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import store
from pipeline.classification import checkpoint_location, classified, classifier_model, round_location
from pipeline.config import RunConfig
from pipeline.curriculum import expansion_seeds, hard_share
from pipeline.dedup import near_duplicates, rejection
from pipeline.jobs import finish, read_parquet, write_checkpointed
from pipeline.llm.endpoint import RunEndpoints
from pipeline.llm.judge import request_text
from pipeline.llm.limits import cost_usd
from pipeline.planning import read_plan
from pipeline.pool import ensure_pool
from pipeline.schema import row_id

STAGE = "expand"
NEW_ROWS_FILE = "new_rows.parquet"
_REFERENCE_BATCH_ROWS = 65_536


def expand_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child(STAGE)


def seeds_table(config: RunConfig, round_index: int) -> pa.Table:
    """One row per expansion request: its id, the seed's id and text, hard or easy."""
    planned = read_plan(config, round_index)
    by_id = {row["id"]: row for row in planned.select(["id", "instruction", "input", "difficulty"]).to_pylist()}
    curriculum = config.curriculum
    pairs = expansion_seeds([i for i, r in by_id.items() if r["difficulty"] == "hard"],
                            [i for i, r in by_id.items() if r["difficulty"] == "easy"], curriculum.expansion_per_round,
                            hard_share(round_index, curriculum.hard_share_start, curriculum.hard_share_step),
                            round_index, curriculum.seed)
    request_ids = [hashlib.blake2b(f"{round_index}:{k}:{seed_id}".encode(), digest_size=10).hexdigest()
                   for k, (seed_id, _) in enumerate(pairs)]
    return pa.table({"id": request_ids, "seed_id": [s for s, _ in pairs],
                     "seed_instruction": [by_id[s]["instruction"] for s, _ in pairs],
                     "seed_input": [by_id[s]["input"] for s, _ in pairs], "difficulty": [d for _, d in pairs]},
                    schema=pa.schema([("id", pa.string()), ("seed_id", pa.string()), ("seed_instruction", pa.string()),
                                      ("seed_input", pa.string()), ("difficulty", pa.string())]))


def expand(config: RunConfig, round_index: int, endpoints: RunEndpoints) -> dict:
    out = expand_location(config, round_index)
    finished = store.read_json(out, store.MANIFEST)
    if finished and finished.get("complete"):
        return {**finished, "skipped": True}
    started = time.perf_counter()
    seeds = seeds_table(config, round_index)
    store.write_parquet(out.child("seeds"), "seeds.parquet", seeds)
    stages = _generate(config, round_index, endpoints) if seeds.num_rows else []
    generated = store.read_table(out.child("generated"))
    if seeds.num_rows and (generated is None or generated.num_rows < seeds.num_rows):
        raise RuntimeError(f"{out.child('generated').uri}: {0 if generated is None else generated.num_rows} of "
                           f"{seeds.num_rows} expansion requests written; run the same command again")
    new_rows = judged_rows(config, round_index, generated)
    store.write_parquet(out, NEW_ROWS_FILE, new_rows)
    summary = _summarise(config, round_index, seeds.num_rows, new_rows, stages, time.perf_counter() - started)
    store.write_json(out, store.MANIFEST, summary)
    finish(checkpoint_location(config, round_index, STAGE))
    return summary


def _generate(config: RunConfig, round_index: int, endpoints: RunEndpoints) -> list[dict]:
    from pipeline.ray_runtime import run_limits
    from pipeline.stages.expand import expanded

    teacher = endpoints.teacher()
    limits = run_limits(config)
    out = expand_location(config, round_index)

    def build():
        dataset = expanded(read_parquet(out.child("seeds")), config.teacher, teacher.base_url, teacher.model,
                           limits, config.expansion, config.scoring)
        return classified(dataset, config, classifier_model(config), teacher)

    return write_checkpointed(build, out.child("generated"), checkpoint_location(config, round_index, STAGE), limits)


# The columns judged_rows reads from the expand and classify stages' output, with their types.
_GENERATED_SCHEMA = pa.schema([
    ("id", pa.string()), ("seed_id", pa.string()), ("difficulty", pa.string()), ("instruction", pa.string()),
    ("input", pa.string()), ("task", pa.string()), ("task_confidence", pa.float32()), ("expand_status", pa.string()),
    ("expand_error", pa.string()), ("expand_finish_reason", pa.string()), ("expand_prompt_tokens", pa.int32()),
    ("expand_completion_tokens", pa.int32())])


def judged_rows(config: RunConfig, round_index: int, generated: Optional[pa.Table]) -> pa.Table:
    """Every generated row with `status` (ok, the request's failure, or why it was dropped), in request order;
    an ok row gets its own stable `id` and keeps the request's as `request_id`."""
    columns = _GENERATED_SCHEMA.names
    if generated is None:           # no request was sent (expansion_per_round: 0, or no seeds): no rows, same columns
        generated = _GENERATED_SCHEMA.empty_table()
    table = generated.select(columns)
    table = table.take(pc.sort_indices(table, [("id", "ascending")]))
    rows = table.to_pylist()
    status = [row["expand_status"] if row["expand_status"] != "ok"
              else rejection(row["instruction"], row["expand_finish_reason"], config.expansion.min_words) or "ok"
              for row in rows]
    candidates = [i for i, s in enumerate(status) if s == "ok"]
    pool_texts = (texts for _, texts in pool_requests(config, round_index))
    duplicates = near_duplicates([rows[i]["instruction"] for i in candidates], pool_texts,
                                 threshold=config.expansion.rouge_l_threshold) if candidates else []
    duplicate_of = [None] * len(rows)
    for i, found in zip(candidates, duplicates):
        if found is not None:
            status[i] = "near_duplicate"
            duplicate_of[i] = (f"{found.source}:{found.index}" if found.source == "pool"
                               else f"new:{rows[candidates[found.index]]['id']}") + f" rouge_l={found.rouge_l:.3f}"
    table = table.rename_columns(["request_id", *columns[1:]])
    ids = [row_id(row["instruction"], "") if s == "ok" else None for row, s in zip(rows, status)]
    return (table.append_column("id", pa.array(ids, pa.string()))
            .append_column("status", pa.array(status, pa.string()))
            .append_column("duplicate_of", pa.array(duplicate_of, pa.string())))


def pool_requests(config: RunConfig, rounds: int) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, request texts) of the pool, then of the new rows kept in rounds before `rounds`, in batches."""
    pool_dir, _ = ensure_pool(config)
    pool = pads.dataset(pool_dir.list_files(".parquet"), filesystem=pool_dir.fs, format="parquet")
    for batch in pool.to_batches(columns=["id", "instruction", "input"], batch_size=_REFERENCE_BATCH_ROWS):
        yield batch.column("id").to_pylist(), [request_text(i, x or "") for i, x in zip(
            batch.column("instruction").to_pylist(), batch.column("input").to_pylist())]
    for earlier in range(rounds):
        kept = read_new_rows(config, earlier)
        if kept is not None and kept.num_rows:
            yield kept.column("id").to_pylist(), kept.column("instruction").to_pylist()


def read_new_rows(config: RunConfig, round_index: int) -> Optional[pa.Table]:
    """The round's kept new rows (status ok); None before its expand stage wrote them."""
    location = expand_location(config, round_index)
    if not location.child(NEW_ROWS_FILE).exists():
        return None
    table = store.read_table(location)
    return table.filter(pc.equal(table.column("status"), "ok"))


def _summarise(config: RunConfig, round_index: int, requests: int, rows: pa.Table, stages: list[dict],
               wall_s: float) -> dict:
    statuses = Counter(rows.column("status").to_pylist())
    tokens = {"prompt": 0, "completion": 0}
    if rows.num_rows:
        tokens = {"prompt": int(pc.sum(rows.column("expand_prompt_tokens")).as_py() or 0),
                  "completion": int(pc.sum(rows.column("expand_completion_tokens")).as_py() or 0)}
    kept = rows.filter(pc.equal(rows.column("status"), "ok")) if rows.num_rows else rows
    return {"stage": STAGE, "round": round_index, "complete": True, "requests": requests,
            "rows_written": rows.num_rows, "rows_kept": statuses.pop("ok", 0), "dropped": dict(statuses.most_common()),
            "kept_by_difficulty": dict(Counter(kept.column("difficulty").to_pylist())) if kept.num_rows else {},
            "kept_task_mix": dict(Counter(kept.column("task").to_pylist()).most_common()) if kept.num_rows else {},
            "tokens": tokens, "cost_usd": round(cost_usd(config.teacher.price, tokens["prompt"], tokens["completion"]), 6),
            "stages": stages, "wall_s": round(wall_s, 2)}
