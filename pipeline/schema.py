"""The row schema of an instruction pool, row ids, and the checks every imported row passes.

A pool row is (id, instruction, input, output, source, meta). Stages add columns to it and never drop
one. `meta` keeps, as JSON, whatever fields the source had beyond these, so an import loses nothing.
"""
from __future__ import annotations

import datetime
import decimal
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

POOL_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("input", pa.string(), nullable=False),
    pa.field("output", pa.string()),   # the pool's reference answer, null when it has none
    pa.field("source", pa.string(), nullable=False),   # "file:line" (or "file:row") it came from
    pa.field("meta", pa.string()),     # JSON of the source's other fields, null when there were none
])

POOL_COLUMNS = tuple(POOL_SCHEMA.names)


def row_id(instruction: str, input_text: str) -> str:
    """A stable id: the same instruction and input get the same id in every pool and every run."""
    digest = hashlib.blake2b(digest_size=10)
    digest.update(instruction.encode("utf-8"))
    digest.update(b"\x1f")
    digest.update(input_text.encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class RowProblem:
    """Why a row cannot enter the pool. `reason` is a short code for counting; `detail` is for people."""

    reason: str
    field: Optional[str]
    detail: str


def _text_field(record: dict, name: str, required: bool) -> tuple[Optional[str], Optional[RowProblem]]:
    value = record.get(name)
    if value is None:
        if required:
            return None, RowProblem("missing_field", name, f"'{name}' is missing")
        return None, None
    if not isinstance(value, str):
        return None, RowProblem("wrong_type", name, f"'{name}' must be a string, got {type(value).__name__}")
    return value, None


def check_record(record: Any, max_row_chars: int) -> tuple[Optional[dict], Optional[RowProblem]]:
    """Validates one source record already mapped to pool fields; returns the clean row or the problem.

    `record` holds instruction, input, output and optionally id and meta; the caller adds source.
    """
    if not isinstance(record, dict):
        return None, RowProblem("not_an_object", None, f"expected a JSON object, got {type(record).__name__}")
    instruction, problem = _text_field(record, "instruction", required=True)
    if problem:
        return None, problem
    if not instruction.strip():
        return None, RowProblem("empty_instruction", "instruction", "'instruction' is empty")
    input_text, problem = _text_field(record, "input", required=False)
    if problem:
        return None, problem
    output, problem = _text_field(record, "output", required=False)
    if problem:
        return None, problem
    input_text = input_text or ""
    size = len(instruction) + len(input_text) + len(output or "")
    if size > max_row_chars:
        return None, RowProblem("too_long", None, f"{size} characters, over the limit of {max_row_chars}")
    for name, text in (("instruction", instruction), ("input", input_text), ("output", output or "")):
        if _has_lone_surrogate(text):
            return None, RowProblem("invalid_utf8", name, f"'{name}' holds text that is not valid UTF-8")
    given_id = record.get("id")
    # bool is an int to Python: `"id": true` would become the id "True"
    if given_id is not None and (isinstance(given_id, bool) or not isinstance(given_id, (str, int))):
        return None, RowProblem("wrong_type", "id", f"'id' must be a non-empty string (or an integer), got "
                                                    f"{type(given_id).__name__}")
    if isinstance(given_id, str) and not given_id.strip():
        return None, RowProblem("empty_id", "id", "'id' is empty")
    try:
        meta = json.dumps(record["meta"], ensure_ascii=False, sort_keys=True, default=_json_value) \
            if record.get("meta") else None
    except TypeError as err:
        return None, RowProblem("wrong_type", "meta", f"a field holds a value JSON cannot: {err}")
    row = {
        "id": str(given_id) if given_id is not None else row_id(instruction, input_text),
        "instruction": instruction,
        "input": input_text,
        "output": output if output else None,
        "meta": meta,
    }
    return row, None


def _json_value(value: Any) -> Any:
    """Values Parquet and HF columns hold that JSON has no type for: dates and times as ISO 8601, decimals as
    their exact text, durations in seconds."""
    if isinstance(value, (datetime.date, datetime.time)):       # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _has_lone_surrogate(text: str) -> bool:
    # json.loads accepts "\ud800" escapes; such strings cannot be written as UTF-8 (Parquet would fail later).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
