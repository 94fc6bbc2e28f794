"""The respond stage: the teacher answers the round's training instructions in a style chosen by task (TAPIR).

The style is a system prompt: step-by-step reasoning for math and reasoning, commented code with a short
explanation for code, detailed and well-structured answers otherwise (config `respond.styles`). The
request itself is the user turn, exactly as the student will see it in training.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.config import EndpointConfig, RespondConfig, ScoringConfig
from pipeline.llm.client import ChatRequest
from pipeline.llm.judge import request_text
from pipeline.llm.prompts import prompt_template
from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.endpoint_stage import EndpointStage, endpoint_stage_options, reply_columns

REQUIRED_COLUMNS = ("id", "instruction", "input", "task")


def style_for(task: str, respond: RespondConfig) -> str:
    return respond.styles.get(task, respond.default_style)


class StyledAnswer(EndpointStage):
    """Async Ray Data callable class: adds `style` and the `respond_*` reply columns to every row."""

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits, respond: RespondConfig):
        super().__init__(endpoint, base_url, model, limits, "teacher")
        self.respond = respond
        # every configured style is read now, so a missing prompt file fails the stage before any call
        self.styles = {name: prompt_template(name).template.strip()
                       for name in {*respond.styles.values(), respond.default_style}}

    def _request(self, row: dict) -> ChatRequest:
        return ChatRequest([{"role": "system", "content": self.styles[style_for(row["task"], self.respond)]},
                            {"role": "user", "content": request_text(row["instruction"], row["input"] or "")}],
                           max_tokens=self.respond.max_tokens, temperature=self.respond.temperature, stage="respond")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "respond")
        rows = batch.select(list(REQUIRED_COLUMNS)).to_pylist()
        replies = await self.ask({i: self._request(row) for i, row in enumerate(rows)})
        return with_columns(batch, {"style": pa.array([style_for(r["task"], self.respond) for r in rows], pa.string()),
                                    **reply_columns("respond", len(rows), replies)})


def responded(dataset, endpoint: EndpointConfig, base_url: str, model: str, limits, respond: RespondConfig,
              scoring: ScoringConfig):
    return dataset.repartition(target_num_rows_per_block=scoring.batch_size).map_batches(
        StyledAnswer, fn_constructor_kwargs={"endpoint": endpoint, "base_url": base_url, "model": model,
                                             "limits": limits, "respond": respond},
        **endpoint_stage_options(scoring))
