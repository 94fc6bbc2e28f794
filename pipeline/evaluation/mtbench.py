"""MT-Bench in FastChat's llm_judge file format: reading questions and reference answers, building the
single-answer grading prompt of one turn, and reading the judge's 1-10 rating.

Questions: one JSON object a line, {"question_id": int | str, "category": str, "turns": [str, ...]}.
Reference answers (optional): one JSON object a line, {"question_id": ..., "choices": [{"turns": [str, ...]}]},
one answer per turn. The judge sees the reference only for the categories where a grader without one is known to
be unreliable (it cannot check a computation or a program it does not solve itself).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from pipeline.llm.prompts import prompt_template

QuestionId = Union[int, str]

# FastChat's NEED_REF_CATS without 'arena-hard-200', which is no MT-Bench category.
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})


@dataclass(frozen=True)
class Question:
    question_id: QuestionId
    category: str
    turns: tuple[str, ...]          # the user's turns, in order


def read_questions(path: Union[str, Path]) -> list[Question]:
    """The questions of an MT-Bench question file, in file order; ValueError naming the line of a bad one."""
    questions: list[Question] = []
    first_line: dict[QuestionId, int] = {}
    for number, record in _records(path):
        where = f"{path} line {number}"
        question_id = _question_id(record, where)
        category = record.get("category")
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"{where}: 'category' must be a non-empty string")
        turns = record.get("turns")
        if not _is_list_of_strings(turns):
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
        _check_unique(question_id, number, first_line, where)
        questions.append(Question(question_id, category, tuple(turns)))
    if not questions:
        raise ValueError(f"{path}: no questions in the file")
    return questions


def read_references(path: Union[str, Path], questions: Sequence[Question]) -> dict[QuestionId, list[str]]:
    """Each referenced question's reference answers, one per turn (choices[0]["turns"]); ValueError naming the
    line of a bad record, of a question that is not in `questions`, or of an answer with too few turns."""
    turns_of = {q.question_id: len(q.turns) for q in questions}
    references: dict[QuestionId, list[str]] = {}
    first_line: dict[QuestionId, int] = {}
    for number, record in _records(path):
        where = f"{path} line {number}"
        question_id = _question_id(record, where)
        choices = record.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ValueError(f"{where}: 'choices' must be a non-empty list of objects")
        turns = choices[0].get("turns")
        if not _is_list_of_strings(turns):
            raise ValueError(f"{where}: 'choices[0].turns' must be a non-empty list of strings")
        if question_id not in turns_of:
            raise ValueError(f"{where}: question_id {question_id!r} is not a question of the question file")
        if len(turns) < turns_of[question_id]:
            raise ValueError(f"{where}: 'choices[0].turns' has {len(turns)} answer(s) but question "
                             f"{question_id!r} has {turns_of[question_id]} turns")
        _check_unique(question_id, number, first_line, where)
        references[question_id] = list(turns)
    return references


def shows_reference(question: Question) -> bool:
    """Whether the judge is shown a reference answer for this question's category."""
    return question.category.strip().lower() in REFERENCE_CATEGORIES


def grading_request_text(question: Question, answers_so_far: Sequence[str], turn_index: int,
                         reference_turns: Optional[Sequence[str]] = None) -> str:
    """The judge's prompt for the model's answer to turn `turn_index` (0-based): the conversation up to that
    turn, and the reference answer to it when the category calls for one and a reference is given."""
    if not 0 <= turn_index < len(question.turns):
        raise ValueError(f"question {question.question_id!r} has {len(question.turns)} turns; "
                         f"no turn {turn_index}")
    if len(answers_so_far) <= turn_index:
        raise ValueError(f"question {question.question_id!r}: turn {turn_index} needs {turn_index + 1} "
                         f"answers, got {len(answers_so_far)}")
    conversation = "\n\n".join(f"### User:\n{user}\n\n### Assistant:\n{answer}"
                               for user, answer in zip(question.turns[:turn_index + 1], answers_so_far))
    if reference_turns is None or not shows_reference(question):
        return prompt_template("mtbench_single").substitute(conversation=conversation)
    if len(reference_turns) <= turn_index:
        raise ValueError(f"question {question.question_id!r}: no reference answer for turn {turn_index}")
    return prompt_template("mtbench_single_reference").substitute(conversation=conversation,
                                                                  reference=reference_turns[turn_index])


_BRACKETED = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_LABELLED = re.compile(r"rating\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_rating(text: str) -> float:
    """The judge's 1-10 rating: the last `[[7]]`, else the last `Rating: 7`, else a JSON {"rating": 7}.
    ValueError when there is none, or it is outside 1..10 (a rating is never clipped into range)."""
    rating = _last_number(_BRACKETED, text)
    if rating is None:
        rating = _last_number(_LABELLED, text)
    if rating is None:
        rating = _json_rating(text)
    if rating is None:
        raise ValueError("no rating found")
    if not 1 <= rating <= 10:
        raise ValueError(f"rating out of 1..10: {rating}")
    return rating


def _last_number(pattern: re.Pattern, text: str) -> Optional[float]:
    # the verdict closes the reply; an earlier match may be the judge quoting the format
    found = pattern.findall(text)
    return float(found[-1]) if found else None


def _json_rating(text: str) -> Optional[float]:
    for candidate in _JSON_OBJECT.findall(text):
        try:
            value = json.loads(candidate).get("rating")
        except (ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _records(path: Union[str, Path]) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line of a JSON-lines file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read the file: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not valid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object")
        yield number, record


def _question_id(record: dict, where: str) -> QuestionId:
    question_id = record.get("question_id")
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)) or question_id == "":
        raise ValueError(f"{where}: 'question_id' must be an integer or a non-empty string")
    return question_id


def _is_list_of_strings(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)


def _check_unique(question_id: QuestionId, number: int, first_line: dict[QuestionId, int], where: str) -> None:
    if question_id in first_line:
        raise ValueError(f"{where}: question_id {question_id!r} repeats line {first_line[question_id]}")
    first_line[question_id] = number
