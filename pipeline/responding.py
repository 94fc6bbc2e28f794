"""The respond stage of a round: the teacher answers each of the round's training instructions once (planned
pool rows and kept new rows), in the style of its task. One checkpointed Ray Data job from
`respond/requests/` to `respond/answers/`; a row the teacher cannot answer keeps `respond_status` and the
reason, and is left out of the training set (counted there). With `respond.pool_answers: reference` a planned
row that has a reference answer in the pool keeps it instead (`respond/reference/`, style 'reference', no call).

A planned row is often planned again in a later round: a request identical to one an earlier round sent
(same model, messages and sampling settings) is not sent again; its answer is copied to `respond/reused/`
with usage 0."""
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
from pipeline.llm.endpoint import OpenEndpoint, RunEndpoints
from pipeline.llm.limits import cost_usd
from pipeline.planning import read_plan

STAGE = "respond"
_REQUEST_COLUMNS = ["id", "instruction", "input", "task"]
_ANSWER_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()), ("task", pa.string()),
    ("style", pa.string()), ("respond_response", pa.string()), ("respond_finish_reason", pa.string()),
    ("respond_prompt_tokens", pa.int32()), ("respond_completion_tokens", pa.int32()),
    ("respond_status", pa.string()), ("respond_error", pa.string()), ("respond_request_key", pa.string())])


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
    kept, requests = reference_answers(config, round_index, requests)
    store.write_parquet(out.child("reference"), "reference.parquet", kept)
    reused, to_ask = reused_answers(config, round_index, requests, config.teacher.served_model)
    store.write_parquet(out.child("reused"), "reused.parquet", reused)
    store.write_parquet(out.child("requests"), "requests.parquet", to_ask)
    stages = _answer(config, round_index, endpoints.teacher()) if to_ask.num_rows else []
    answers = read_answers(config, round_index)
    written = 0 if answers is None else len(pc.unique(answers.column("id")))
    if written < requests.num_rows + kept.num_rows:
        raise RuntimeError(f"{out.child('answers').uri}: {written - kept.num_rows} of {requests.num_rows} "
                           "instructions answered by the teacher; run the same command again")
    statuses = Counter(answers.column("respond_status").to_pylist())
    tokens = {"prompt": int(pc.sum(answers.column("respond_prompt_tokens")).as_py() or 0),
              "completion": int(pc.sum(answers.column("respond_completion_tokens")).as_py() or 0)}
    summary = {"stage": STAGE, "round": round_index, "complete": True,
               "rows_in": requests.num_rows + kept.num_rows, "rows_out": answers.num_rows,
               "reference_answers_kept": kept.num_rows, "reused_from_earlier_rounds": reused.num_rows,
               "rows_ok": statuses.pop("ok", 0), "failed": dict(statuses.most_common()),
               "cut_off": int(pc.sum(pc.equal(answers.column("respond_finish_reason"), "length")).as_py() or 0),
               "styles": dict(Counter(answers.column("style").to_pylist()).most_common()), "tokens": tokens,
               "cost_usd": round(cost_usd(config.teacher.price, tokens["prompt"], tokens["completion"]), 6),
               "stages": stages, "wall_s": round(time.perf_counter() - started, 2)}
    store.write_json(out, store.MANIFEST, summary)
    finish(checkpoint_location(config, round_index, STAGE))
    return summary


def reference_answers(config: RunConfig, round_index: int, requests: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(the answers kept from the pool, the requests left for the teacher): with respond.pool_answers
    'reference', every planned row whose reference answer is not blank keeps it; otherwise none is kept."""
    if config.respond.pool_answers != "reference":
        return _ANSWER_SCHEMA.empty_table(), requests
    planned = read_plan(config, round_index)
    reference = {row: text for row, text in zip(planned.column("id").to_pylist(), planned.column("output").to_pylist())
                 if text and text.strip()}
    keep = pa.array([row in reference for row in requests.column("id").to_pylist()], pa.bool_())
    kept = [{**row, "style": "reference", "respond_response": reference[row["id"]], "respond_status": "ok",
             "respond_prompt_tokens": 0, "respond_completion_tokens": 0} for row in requests.filter(keep).to_pylist()]
    return pa.Table.from_pylist(kept, schema=_ANSWER_SCHEMA), requests.filter(pc.invert(keep))


def reused_answers(config: RunConfig, round_index: int, requests: pa.Table, model: str) -> tuple[pa.Table, pa.Table]:
    """(the earlier rounds' answers to this round's requests that were sent before, the requests to send)."""
    from pipeline.stages.respond import request_key, style_prompts, styled_request

    answered_before = {}
    for earlier in range(round_index):
        answers = read_answers(config, earlier)
        if answers is not None:
            ok = answers.filter(pc.equal(answers.column("respond_status"), "ok"))
            answered_before.update({row["respond_request_key"]: row for row in ok.to_pylist()})
    styles = style_prompts(config.respond)
    reused, to_ask = [], []
    for index, row in enumerate(requests.to_pylist()):
        before = answered_before.get(request_key(styled_request(row, styles, config.respond), model))
        if before is None:
            to_ask.append(index)
        else:
            reused.append({**before, **row, "respond_prompt_tokens": 0, "respond_completion_tokens": 0})
    return pa.Table.from_pylist(reused, schema=_ANSWER_SCHEMA), requests.take(pa.array(to_ask, pa.int64()))


def _answer(config: RunConfig, round_index: int, teacher: OpenEndpoint) -> list[dict]:
    from pipeline.ray_runtime import run_limits
    from pipeline.stages.respond import responded

    limits = run_limits(config)
    out = respond_location(config, round_index)
    return write_checkpointed(
        lambda: responded(read_parquet(out.child("requests")), config.teacher, teacher.base_url, teacher.model,
                          limits, config.respond, config.scoring),
        out.child("answers"), checkpoint_location(config, round_index, STAGE), limits)


def read_answers(config: RunConfig, round_index: int) -> Optional[pa.Table]:
    """The round's answers: those its job wrote, those reused from earlier rounds and the pool's references
    kept."""
    location = respond_location(config, round_index)
    parts = [table.select(_ANSWER_SCHEMA.names).cast(_ANSWER_SCHEMA)
             for table in (store.read_table(location.child(part)) for part in ("answers", "reused", "reference"))
             if table is not None]
    return pa.concat_tables(parts) if parts else None
