"""Training rows as token ids: the student's chat template, the loss on the answer only, the length policy.

The prompt (system, user, and the template's assistant header) and the answer are tokenized separately
and concatenated. That is what the student sees at inference, where the prompt is tokenized and the
answer generated after it, and it makes the boundary between masked and trained tokens exact for any
template: no need for `{% generation %}` markers, which few templates have.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

from pipeline.llm.judge import request_text
from pipeline.models import Model, local_model
from pipeline.stages.columns import check_columns
from training import TrainingDataError

IGNORE_INDEX = -100      # label of a token that carries no loss (transformers' convention)
REQUIRED_COLUMNS = ("id", "instruction", "input", "output")
TOKENIZED_SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("num_tokens", pa.int32()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
])


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]
    status: str                  # ok, truncated, over_max_len, invalid
    num_tokens: int              # before any truncation
    error: Optional[str] = None


def messages(instruction: str, input_text: Optional[str], system_prompt: Optional[str]) -> list[dict]:
    """The conversation the student is trained on: the same user turn the student stage sends."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return turns + [{"role": "user", "content": request_text(instruction, input_text or "")}]


def split_texts(tokenizer, conversation: list[dict], answer: str) -> tuple[str, str]:
    """(prompt text, answer text) such that their concatenation is the template's whole conversation."""
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": answer}], tokenize=False)
    if not whole.startswith(prompt):
        raise TrainingDataError("the student's chat template writes an assistant turn that does not continue its "
                                "generation prompt; the answer tokens cannot be told from the prompt's")
    return prompt, whole[len(prompt):]


def fit_to_length(prompt_ids: list[int], answer_ids: list[int], max_len: int, truncation: str) -> TokenizedRow:
    ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if len(ids) <= max_len:
        return TokenizedRow(ids, labels, "ok", len(ids))
    if truncation == "truncate" and len(prompt_ids) < max_len:
        return TokenizedRow(ids[:max_len], labels[:max_len], "truncated", len(ids))
    reason = f"{len(ids)} tokens (prompt {len(prompt_ids)}) > max_len {max_len}"
    return TokenizedRow([], [], "over_max_len", len(ids), reason)


def held_out(row_id: str, fraction: float) -> bool:
    """A stable choice of evaluation rows: the same ids are held out in every run and on every worker."""
    bucket = int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big") / 2 ** 64
    return bucket < fraction


class ChatTokenizer:
    """Ray Data callable class: one tokenized row (ids, labels, status) per training row, none dropped."""

    def __init__(self, model_dir: Model, max_len: int, truncation: str, system_prompt: Optional[str],
                 eval_fraction: float):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(local_model(model_dir))
        self.max_len, self.truncation, self.system_prompt = max_len, truncation, system_prompt
        self.eval_fraction = eval_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "sft tokenize")
        rows = batch.select(list(REQUIRED_COLUMNS)).to_pylist()
        invalid = {i: _problem(row) for i, row in enumerate(rows)}
        texts = {i: split_texts(self.tokenizer, messages(row["instruction"], row["input"], self.system_prompt),
                                row["output"]) for i, row in enumerate(rows) if invalid[i] is None}
        order = list(texts)
        prompts = self.tokenizer([texts[i][0] for i in order], add_special_tokens=False)["input_ids"] if order else []
        answers = self.tokenizer([texts[i][1] for i in order], add_special_tokens=False)["input_ids"] if order else []
        tokenized = {i: fit_to_length(p, a, self.max_len, self.truncation) for i, p, a in zip(order, prompts, answers)}
        out = []
        for i, row in enumerate(rows):
            result = tokenized.get(i) or TokenizedRow([], [], "invalid", 0, invalid[i])
            out.append({"id": row["id"], "split": "eval" if held_out(row["id"], self.eval_fraction) else "train",
                        "status": result.status, "error": result.error, "num_tokens": result.num_tokens,
                        "input_ids": result.input_ids, "labels": result.labels})
        return pa.Table.from_pylist(out, schema=TOKENIZED_SCHEMA)


def _problem(row: dict) -> Optional[str]:
    for field in ("id", "instruction", "output"):
        if not isinstance(row[field], str) or not row[field].strip():
            return f"field '{field}' is empty"
    if row["input"] is not None and not isinstance(row["input"], str):
        return "field 'input' is not text"
    return None
