"""The respond stage of a round: the teacher answers each of the round's training instructions once (planned
pool rows and kept new rows), in the style of its task. One checkpointed Ray Data job from
`respond/requests/` to `respond/answers/`; a row the teacher cannot answer keeps `respond_status` and the
reason, and is left out of the training set (counted there)."""
from __future__ import annotations

import time
from collections import Counter
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import store
from pipeline.classification import checkpoint_location, round_location
from pipeline.config import RunConfig
from pipeline.jobs import finish, read_parquet, write_checkpointed
from pipeline.llm.endpoint import RunEndpoints
from pipeline.llm.limits import cost_usd
from pipeline.planning import read_plan

STAGE = "respond"
_REQUEST_COLUMNS = ["id", "instruction", "input", "task"]


def respond_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child(STAGE)


def requests_table(config: RunConfig, round_index: int, new_rows: Optional[pa.Table]) -> pa.Table:
    """Each instruction once: the plan's rows (a row planned twice is answered once) and the kept new rows."""
    tables = [read_plan(config, round_index).select(_REQUEST_COLUMNS)]
    if new_rows is not None and new_rows.num_rows:
        tables.append(new_rows.select(_REQUEST_COLUMNS).cast(tables[0].schema))
    return pa.concat_tables(tables)


def respond(config: RunConfig, round_index: int, new_rows: Optional[pa.Table], endpoints: RunEndpoints) -> dict:
    out = respond_location(config, round_index)
    finished = store.read_json(out, store.MANIFEST)
    if finished and finished.get("complete"):
        return {**finished, "skipped": True}
    started = time.perf_counter()
    requests = requests_table(config, round_index, new_rows)
    store.write_parquet(out.child("requests"), "requests.parquet", requests)
    stages = _answer(config, round_index, endpoints)
    answers = read_answers(config, round_index)
    written = 0 if answers is None else len(pc.unique(answers.column("id")))
    if written < requests.num_rows:
        raise RuntimeError(f"{out.child('answers').uri}: {written} of {requests.num_rows} instructions answered; "
                           "run the same command again")
    statuses = Counter(answers.column("respond_status").to_pylist())
    tokens = {"prompt": int(pc.sum(answers.column("respond_prompt_tokens")).as_py() or 0),
              "completion": int(pc.sum(answers.column("respond_completion_tokens")).as_py() or 0)}
    summary = {"stage": STAGE, "round": round_index, "complete": True, "rows_in": requests.num_rows,
               "rows_out": answers.num_rows, "rows_ok": statuses.pop("ok", 0), "failed": dict(statuses.most_common()),
               "cut_off": int(pc.sum(pc.equal(answers.column("respond_finish_reason"), "length")).as_py() or 0),
               "styles": dict(Counter(answers.column("style").to_pylist()).most_common()), "tokens": tokens,
               "cost_usd": round(cost_usd(config.teacher.price, tokens["prompt"], tokens["completion"]), 6),
               "stages": stages, "wall_s": round(time.perf_counter() - started, 2)}
    store.write_json(out, store.MANIFEST, summary)
    finish(checkpoint_location(config, round_index, STAGE))
    return summary


def _answer(config: RunConfig, round_index: int, endpoints: RunEndpoints) -> list[dict]:
    from pipeline.ray_runtime import run_limits
    from pipeline.stages.respond import responded

    teacher = endpoints.teacher()
    limits = run_limits(config)
    out = respond_location(config, round_index)
    return write_checkpointed(
        lambda: responded(read_parquet(out.child("requests")), config.teacher, teacher.base_url, teacher.model,
                          limits, config.respond, config.scoring),
        out.child("answers"), checkpoint_location(config, round_index, STAGE), limits)


def read_answers(config: RunConfig, round_index: int) -> Optional[pa.Table]:
    return store.read_table(respond_location(config, round_index).child("answers"))
