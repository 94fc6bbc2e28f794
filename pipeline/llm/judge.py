"""The teacher as judge: pairwise scores in both orders (→ MFD), and task labels from a fixed list.

Both ask for JSON that matches a schema (structured output where the endpoint supports it) and read the
answer with a tolerant parser where it does not: a JSON object anywhere in the text, then labelled
scores ("score 1: 7"), then Lion's format of the two scores on the first line. An answer none of these
can read fails the row with reason 'unparseable', with the text kept for inspection; a label outside
the list is never guessed.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Optional, Union

from pipeline.llm.client import BUDGET_REFUSED, ChatClient, ChatReply, ChatRequest, RequestFailed
from pipeline.llm.prompts import prompt_template

SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score_1": {"type": "integer", "minimum": 1, "maximum": 10},
                   "score_2": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["score_1", "score_2"],
    "additionalProperties": False,
}
_JUDGE_MAX_TOKENS = 64
_LABEL_MAX_TOKENS = 32
_UNPARSEABLE_CHARS = 300


def request_text(instruction: str, input_text: str) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


@dataclass(frozen=True)
class PairScores:
    teacher_score: float      # mean of the teacher's scores in the two orders
    student_score: float
    mfd: float                # model fitting difficulty: teacher_score - student_score
    prompt_tokens: int = 0    # usage of both judge calls together
    completion_tokens: int = 0


def judge_request(request: str, answer_1: str, answer_2: str, stage: str) -> ChatRequest:
    prompt = prompt_template("judge_pairwise").substitute(request=request, answer_1=answer_1, answer_2=answer_2)
    return ChatRequest([{"role": "user", "content": prompt}], max_tokens=_JUDGE_MAX_TOKENS, temperature=0.0,
                       json_schema=SCORE_SCHEMA, stage=stage)


_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_LABELLED = re.compile(r"(?:score[ _]?|answer |assistant )([12])\D{0,15}?(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_scores(text: str) -> tuple[float, float]:
    """(score of answer 1, score of answer 2) from a judge's reply; ValueError when it cannot be read."""
    for candidate in _JSON_OBJECT.findall(text):
        try:
            data = json.loads(candidate)
            return _checked(float(data["score_1"]), float(data["score_2"]))
        except (ValueError, KeyError, TypeError):
            continue
    labelled = dict(_LABELLED.findall(text))
    if "1" in labelled and "2" in labelled:
        return _checked(float(labelled["1"]), float(labelled["2"]))
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    numbers = _NUMBER.findall(first_line)
    if len(numbers) == 2:
        return _checked(float(numbers[0]), float(numbers[1]))
    raise ValueError("no pair of scores found")


def _checked(first: float, second: float) -> tuple[float, float]:
    if not (1 <= first <= 10 and 1 <= second <= 10):
        raise ValueError(f"scores out of 1..10: {first}, {second}")
    return first, second


async def judge_pair(client: ChatClient, instruction: str, input_text: str, teacher_answer: str,
                     student_answer: str, stage: str = "judge") -> Union[PairScores, RequestFailed]:
    """Scores teacher vs student in both orders and averages, cancelling the judge's position bias."""
    request = request_text(instruction, input_text)
    requests = (judge_request(request, teacher_answer, student_answer, stage),
                judge_request(request, student_answer, teacher_answer, stage))
    replies = await asyncio.gather(*(client.complete(r) for r in requests), return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException) and not isinstance(reply, RequestFailed):
            raise reply
    failed = [reply for reply in replies if isinstance(reply, RequestFailed)]
    refused = [reply for reply in failed if reply.reason == BUDGET_REFUSED]
    if refused:
        # the next command asks the row again: the order already paid for waits for it there
        for asked, reply in zip(requests, replies):
            if isinstance(reply, ChatReply):
                client.keep_paid(asked, reply)
        return refused[0]
    if failed:
        return failed[0]
    try:
        teacher_first, student_first = parse_scores(replies[0].content), parse_scores(replies[1].content)
    except ValueError as err:
        texts = " | ".join(r.content[:_UNPARSEABLE_CHARS] for r in replies)
        return RequestFailed("unparseable", f"{err}: {texts}", max(r.attempts for r in replies))
    teacher = (teacher_first[0] + student_first[1]) / 2
    student = (teacher_first[1] + student_first[0]) / 2
    return PairScores(teacher, student, teacher - student, sum(r.prompt_tokens for r in replies),
                      sum(r.completion_tokens for r in replies))


def label_schema(categories: list[str]) -> dict:
    return {"type": "object", "properties": {"task": {"enum": categories}}, "required": ["task"],
            "additionalProperties": False}


def label_request(instruction: str, input_text: str, categories: list[str], stage: str) -> ChatRequest:
    prompt = prompt_template("label_task").substitute(
        categories="\n".join(f"- {c}" for c in categories), request=request_text(instruction, input_text))
    return ChatRequest([{"role": "user", "content": prompt}], max_tokens=_LABEL_MAX_TOKENS, temperature=0.0,
                       json_schema=label_schema(categories), stage=stage)


def parse_label(text: str, categories: list[str]) -> Optional[str]:
    """The category a reply names: its JSON 'task', else the one category named in the text, else None."""
    by_name = {c.lower(): c for c in categories}
    for candidate in _JSON_OBJECT.findall(text):
        try:
            label = json.loads(candidate).get("task")
        except (ValueError, AttributeError):
            continue
        if isinstance(label, str) and label.strip().lower() in by_name:
            return by_name[label.strip().lower()]
    lowered = text.lower()
    named = {c for name, c in by_name.items() if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", lowered)}
    return named.pop() if len(named) == 1 else None


async def label_task(client: ChatClient, instruction: str, input_text: str, categories: list[str],
                     stage: str = "label") -> Union[str, RequestFailed]:
    """The teacher's choice of task category; rows it cannot label are failed, not guessed."""
    try:
        reply = await client.complete(label_request(instruction, input_text, categories, stage))
    except RequestFailed as failed:
        return failed
    label = parse_label(reply.content, categories)
    if label is None:
        return RequestFailed("unlabelled", f"no single category in: {reply.content[:_UNPARSEABLE_CHARS]}",
                             reply.attempts)
    return label
