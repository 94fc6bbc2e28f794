"""The teacher stage: the teacher's response to every row, the pool's reference output where it may be kept.

A row with a non-empty reference output and `keep_reference_outputs` costs no call, nor does a row the
teacher answered in an earlier round (its source is then `earlier_round` and its usage 0 in this round). Every other row is
answered through the client; a row the endpoint cannot answer keeps `teacher_status`/`teacher_error`,
and the judge stage leaves it unscored.
"""
from __future__ import annotations

from typing import Optional

import pyarrow as pa

from pipeline.config import EndpointConfig, ScoringConfig
from pipeline.llm.carried import CarriedReplies
from pipeline.llm.client import ChatRequest, RequestFailed
from pipeline.llm.judge import request_text
from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.endpoint_stage import EndpointStage, endpoint_stage_options, paid_rows, refused_rows

REQUIRED_COLUMNS = ("id", "instruction", "input", "output")


def teacher_request(row: dict, scoring: ScoringConfig) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": request_text(row["instruction"], row["input"] or "")}],
                       max_tokens=scoring.teacher_max_tokens, temperature=scoring.teacher_temperature, stage="teacher")


class TeacherAnswer(EndpointStage):
    """Async Ray Data callable class: adds `teacher_response`, its source, usage and status to every row."""

    def __init__(self, endpoint: EndpointConfig, base_url: Optional[str], model: str, limits, scoring: ScoringConfig,
                 keep_reference_outputs: bool, carried: Optional[CarriedReplies] = None):
        super().__init__(endpoint, base_url, model, limits, "teacher", carried)
        self.scoring = scoring
        self.keep_reference_outputs = keep_reference_outputs


    async def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "teacher")
        answered_before = "teacher_status" in batch.column_names
        rows = batch.select(["instruction", "input", "output"] + (
            ["teacher_response", "teacher_status"] if answered_before else [])).to_pylist()
        replies = await self.ask({i: teacher_request(row, self.scoring) for i, row in enumerate(rows)
                                  if not (self.keep_reference_outputs and row["output"])
                                  and row.get("teacher_status") != "ok"})
        response, source, prompt_tokens, completion_tokens, status, error = ([] for _ in range(6))
        for i, row in enumerate(rows):
            reply = replies.get(i)
            if reply is None and self.keep_reference_outputs and row["output"]:
                values = (row["output"], "reference", 0, 0, "ok", None)
            elif reply is None:
                values = (row["teacher_response"], "earlier_round", 0, 0, "ok", None)
            elif isinstance(reply, RequestFailed):
                values = (None, "teacher", 0, 0, reply.reason, str(reply))
            else:
                values = (reply.content, "teacher", reply.prompt_tokens, reply.completion_tokens, "ok", None)
            for column, value in zip((response, source, prompt_tokens, completion_tokens, status, error), values):
                column.append(value)
        return paid_rows(with_columns(batch, {
            "teacher_response": pa.array(response, pa.string()), "teacher_source": pa.array(source, pa.string()),
            "teacher_prompt_tokens": pa.array(prompt_tokens, pa.int32()),
            "teacher_completion_tokens": pa.array(completion_tokens, pa.int32()),
            "teacher_status": pa.array(status, pa.string()), "teacher_error": pa.array(error, pa.string())}),
            refused_rows(replies))


def answered(dataset, endpoint: EndpointConfig, base_url: Optional[str], model: str, limits, scoring: ScoringConfig,
             keep_reference_outputs: bool, carried: Optional[CarriedReplies] = None):
    return dataset.repartition(target_num_rows_per_block=scoring.batch_size).map_batches(
        TeacherAnswer, fn_constructor_kwargs={
            "endpoint": endpoint, "base_url": base_url, "model": model, "limits": limits, "scoring": scoring,
            "keep_reference_outputs": keep_reference_outputs, "carried": carried}, **endpoint_stage_options(scoring))
