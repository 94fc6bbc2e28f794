"""The multi-turn student stage: the model answers a conversation's user turns one after another.

The student stage's engine (pipeline/stages/student.py), another call: for turn k of every row at once, one
`llm.chat` over the conversations so far (user turn 1, the model's answer 1, …, user turn k), so turn k's
prompt holds the model's own earlier answers, as MT-Bench asks. Rows may have different numbers of turns; a
row drops out when its turns are done. A conversation that outgrows the context stops there: the answers
before it are kept, the row is `too_long` and its error names the turn. Applied to a dataset with
`student.generate(dataset, model_dir, config, generator=MultiTurnGenerator)`.
"""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.student import StudentGenerator

REQUIRED_COLUMNS = ("id", "turns")


def conversation(user_turns: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """The chat messages that ask for the answer to user_turns[-1]: every earlier turn with its answer."""
    if len(answers) != len(user_turns) - 1:
        raise ValueError(f"{len(user_turns)} user turns need {len(user_turns) - 1} earlier answers, "
                         f"got {len(answers)}")
    messages = []
    for user, answer in zip(user_turns, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": user_turns[-1]}]


class MultiTurnGenerator(StudentGenerator):
    """Ray Data callable class: adds the model's answer to each user turn of every row (lists, one per turn)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "multiturn")
        turns_of = batch.column("turns").to_pylist()
        answers: list[list[str]] = [[] for _ in turns_of]
        tokens: list[list[int]] = [[] for _ in turns_of]
        status: list[str] = ["ok"] * len(turns_of)
        error: list = [None] * len(turns_of)
        for k in range(max((len(turns) for turns in turns_of), default=0)):
            asked = [i for i, turns in enumerate(turns_of) if k < len(turns) and status[i] == "ok"]
            conversations = {i: conversation(turns_of[i][:k + 1], answers[i]) for i in asked}
            fits = []
            for i in asked:
                length = len(self.tokenizer.apply_chat_template(conversations[i], add_generation_prompt=True,
                                                                tokenize=True, return_dict=False))
                if length <= self.prompt_budget:
                    fits.append(i)
                else:
                    status[i] = "too_long"
                    error[i] = (f"turn {k + 1}: the conversation of {length} tokens leaves no room for "
                                f"{self.sampling.max_tokens} new tokens in max_model_len "
                                f"{self.prompt_budget + self.sampling.max_tokens}")
            if not fits:
                continue
            # one call per turn: vLLM batches every conversation of the batch that is at this turn
            outputs = self.llm.chat([conversations[i] for i in fits], self.sampling, use_tqdm=False)
            for i, output in zip(fits, outputs):
                completion = output.outputs[0]
                answers[i].append(completion.text)
                tokens[i].append(len(completion.token_ids))
        return with_columns(batch, {
            "student_answers": pa.array(answers, pa.list_(pa.string())),
            "student_turn_tokens": pa.array(tokens, pa.list_(pa.int32())),
            "student_tokens": pa.array([sum(t) for t in tokens], pa.int32()),
            "student_status": pa.array(status, pa.string()), "student_error": pa.array(error, pa.string())})

