"""The respond stage: the teacher answers the round's training instructions in a style chosen by task (TAPIR).

The style is a system prompt: step-by-step reasoning for math and reasoning, commented code with a short
explanation for code, detailed and well-structured answers otherwise (config `respond.styles`). The
request itself is the user turn, exactly as the student will see it in training.
"""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from pipeline.config import EndpointConfig, RespondConfig, ScoringConfig
from pipeline.llm.client import ChatRequest
from pipeline.llm.judge import request_text
from pipeline.llm.prompts import prompt_template
from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.endpoint_stage import EndpointStage, endpoint_stage_options, paid_rows, refused_rows, reply_columns

REQUIRED_COLUMNS = ("id", "instruction", "input", "task")


def style_for(task: str, respond: RespondConfig) -> str:
    return respond.styles.get(task, respond.default_style)


def style_prompts(respond: RespondConfig) -> dict[str, str]:
    """Every configured style's system prompt by name; a missing prompt file fails here, before any call."""
    return {name: prompt_template(name).template.strip() for name in {*respond.styles.values(), respond.default_style}}


def styled_request(row: dict, styles: dict[str, str], respond: RespondConfig) -> ChatRequest:
    return ChatRequest([{"role": "system", "content": styles[style_for(row["task"], respond)]},
                        {"role": "user", "content": request_text(row["instruction"], row["input"] or "")}],
                       max_tokens=respond.max_tokens, temperature=respond.temperature, stage="respond")


def request_key(request: ChatRequest, model: str) -> str:
    """The same key means the same call: model, messages and sampling settings."""
    text = json.dumps([model, request.messages, request.max_tokens, request.temperature], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class StyledAnswer(EndpointStage):
    """Async Ray Data callable class: adds `style`, the `respond_*` reply columns and `respond_request_key`
    (which a later round matches to reuse the answer) to every row."""

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits, respond: RespondConfig):
        super().__init__(endpoint, base_url, model, limits, "teacher")
        self.respond = respond
        self.styles = style_prompts(respond)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "respond")
        rows = batch.select(list(REQUIRED_COLUMNS)).to_pylist()
        requests = {i: styled_request(row, self.styles, self.respond) for i, row in enumerate(rows)}
        replies = await self.ask(requests)
        return paid_rows(with_columns(batch, {
            "style": pa.array([style_for(r["task"], self.respond) for r in rows], pa.string()),
            **reply_columns("respond", len(rows), replies),
            "respond_request_key": pa.array([request_key(requests[i], self.model) for i in range(len(rows))],
                                            pa.string())}), refused_rows(replies))


def responded(dataset, endpoint: EndpointConfig, base_url: str, model: str, limits, respond: RespondConfig,
              scoring: ScoringConfig):
    return dataset.repartition(target_num_rows_per_block=scoring.batch_size).map_batches(
        StyledAnswer, fn_constructor_kwargs={"endpoint": endpoint, "base_url": base_url, "model": model,
                                             "limits": limits, "respond": respond},
        **endpoint_stage_options(scoring))
