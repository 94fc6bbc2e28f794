"""The expand stage: the teacher writes one new instruction from each seed (Lion's generator).

A hard seed asks for the same domain and task type at a similar length and difficulty; an easy seed for
the same domain, rarer. A row is one request (`id` is the request's id, `seed_id` the seed's); the new
instruction is in `instruction`, cleaned of the labels small models put before it. Whether it is kept
(not cut off, long enough, not a near-duplicate) is decided afterwards over all of them at once
(pipeline/expansion.py), because near-duplicates are a property of the whole set.
"""
from __future__ import annotations

import re

import pyarrow as pa

from pipeline.config import EndpointConfig, ExpansionConfig, ScoringConfig
from pipeline.llm.client import ChatReply, ChatRequest
from pipeline.llm.judge import request_text
from pipeline.llm.prompts import prompt_template
from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.endpoint_stage import EndpointStage, endpoint_stage_options, paid_rows, refused_rows, reply_columns

REQUIRED_COLUMNS = ("id", "seed_id", "seed_instruction", "seed_input", "difficulty")
_LABEL = re.compile(r"^\s*(?:#*\s*(?:new|created|brand new)?\s*(?:task|prompt|question)\s*#*\s*:)\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"


def cleaned(text: str) -> str:
    """The instruction without a leading "New task:"-style label and without quotes around all of it."""
    text = _LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


class SeedExpander(EndpointStage):
    """Async Ray Data callable class: adds `instruction`, `input` and the `expand_*` reply columns."""

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits, expansion: ExpansionConfig):
        super().__init__(endpoint, base_url, model, limits, "teacher")
        # ExpansionConfig checked that each prompt reads and has `$seed`
        self.templates = {"hard": prompt_template(expansion.hard_prompt), "easy": prompt_template(expansion.easy_prompt)}
        self.max_tokens, self.temperature = expansion.max_tokens, expansion.temperature

    def _request(self, row: dict) -> ChatRequest:
        prompt = self.templates[row["difficulty"]].substitute(
            seed=request_text(row["seed_instruction"], row["seed_input"] or ""))
        return ChatRequest([{"role": "user", "content": prompt}], max_tokens=self.max_tokens,
                           temperature=self.temperature, stage="expand")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "expand")
        rows = batch.select(list(REQUIRED_COLUMNS)).to_pylist()
        replies = await self.ask({i: self._request(row) for i, row in enumerate(rows)})
        instructions = [cleaned(reply.content) if isinstance(reply, ChatReply) else "" for _, reply in
                        sorted(replies.items())]
        return paid_rows(with_columns(batch, {"instruction": pa.array(instructions, pa.string()),
                                              "input": pa.array([""] * len(rows), pa.string()),
                                              **reply_columns("expand", len(rows), replies)}),
                         refused_rows(replies))


def expanded(dataset, endpoint: EndpointConfig, base_url: str, model: str, limits, expansion: ExpansionConfig,
             scoring: ScoringConfig):
    return dataset.repartition(target_num_rows_per_block=scoring.batch_size).map_batches(
        SeedExpander, fn_constructor_kwargs={"endpoint": endpoint, "base_url": base_url, "model": model,
                                             "limits": limits, "expansion": expansion},
        **endpoint_stage_options(scoring))
