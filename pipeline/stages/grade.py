"""The grading stage: the judge rates the model's answer to each turn of a conversation from 1 to 10 (MT-Bench's
single-answer grading).

One request per answered turn, all of a batch at once through the judge's client (the run's limits, retries and
cost). Turn k's prompt is the conversation up to it and, for math, reasoning and coding, the reference answer
to it (pipeline/evaluation/mtbench.py). Every turn of a row gets a status, in lists parallel to `turns`: `ok`
with its rating; `judge_unparseable` with the judge's text kept (in `judge_replies`, and cut short in the
error); `judge_REASON` when the request failed for good; `student_too_long` for a turn the model never answered.
"""
from __future__ import annotations

from typing import Union

import pyarrow as pa

from pipeline.config import EndpointConfig, ScoringConfig
from pipeline.evaluation.mtbench import Question, grading_request_text, parse_rating
from pipeline.llm.client import ChatReply, ChatRequest, RequestFailed
from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.endpoint_stage import EndpointStage, endpoint_stage_options, paid_rows, refused_rows

REQUIRED_COLUMNS = ("id", "question_id", "category", "turns", "reference_turns", "student_answers",
                    "student_status", "student_error")
_UNPARSEABLE_CHARS = 300
_TURN_COLUMNS = {"judge_scores": pa.float32(), "judge_statuses": pa.string(), "judge_errors": pa.string(),
                 "judge_replies": pa.string(), "judge_prompt_tokens": pa.int32(),
                 "judge_completion_tokens": pa.int32()}


def grading_request(row: dict, turn_index: int, max_tokens: int) -> ChatRequest:
    question = Question(row["question_id"], row["category"], tuple(row["turns"]))
    text = grading_request_text(question, row["student_answers"][:turn_index + 1], turn_index, row["reference_turns"])
    return ChatRequest([{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.0, stage="judge")


def turn_grade(reply: Union[ChatReply, RequestFailed], max_tokens: int) -> tuple:
    """(score, status, error, judge's text, prompt tokens, completion tokens) of one turn's grading reply. An
    unreadable reply was still paid for: its tokens count."""
    if isinstance(reply, RequestFailed):
        return None, f"judge_{reply.reason}", str(reply), None, 0, 0
    tokens = (reply.prompt_tokens, reply.completion_tokens)
    try:
        return parse_rating(reply.content), "ok", None, reply.content, *tokens
    except ValueError as err:
        cut = f" (the reply was cut off at judge_max_tokens {max_tokens})" if reply.finish_reason == "length" else ""
        return (None, "judge_unparseable", f"{err}{cut}: {reply.content[:_UNPARSEABLE_CHARS]}", reply.content,
                *tokens)


class TurnGrader(EndpointStage):
    """Async Ray Data callable class over the judge endpoint: per-turn ratings of every row's answers."""

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits, max_tokens: int):
        super().__init__(endpoint, base_url, model, limits, "judge")
        self.max_tokens = max_tokens

    async def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "grade")
        rows = batch.select(list(REQUIRED_COLUMNS)).to_pylist()
        asked = [(i, k) for i, row in enumerate(rows) for k in range(len(row["student_answers"] or []))]
        replies = await self.ask({n: grading_request(rows[i], k, self.max_tokens) for n, (i, k) in enumerate(asked)})
        graded = {turn: turn_grade(replies[n], self.max_tokens) for n, turn in enumerate(asked)}
        columns: dict[str, list] = {name: [] for name in _TURN_COLUMNS}
        for i, row in enumerate(rows):
            turns = [graded.get((i, k)) or _unanswered(row) for k in range(len(row["turns"]))]
            for position, name in enumerate(_TURN_COLUMNS):
                columns[name].append([turn[position] for turn in turns])
        return paid_rows(with_columns(batch, {name: pa.array(values, pa.list_(_TURN_COLUMNS[name]))
                                              for name, values in columns.items()}),
                         {asked[n][0] for n in refused_rows(replies)})


def _unanswered(row: dict) -> tuple:
    """turn_grade's tuple for a turn the model did not answer: the student stage's reason."""
    return None, f"student_{row['student_status']}", row["student_error"], None, 0, 0


def graded(dataset, endpoint: EndpointConfig, base_url: str, model: str, limits, scoring: ScoringConfig,
           max_tokens: int):
    return dataset.repartition(target_num_rows_per_block=scoring.batch_size).map_batches(
        TurnGrader, fn_constructor_kwargs={"endpoint": endpoint, "base_url": base_url, "model": model,
                                           "limits": limits, "max_tokens": max_tokens},
        **endpoint_stage_options(scoring))
