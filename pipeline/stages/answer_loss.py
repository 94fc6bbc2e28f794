"""The answer-loss stage: the student's mean per-token loss on a given answer, and IFD, from its vLLM engine.

IFD (Instruction-Following Difficulty, Li et al. 2023, "From Quantity to Quality") of a row = the student's mean
loss on the answer's tokens given the instruction ÷ its mean loss on the same tokens without it. High IFD: the
instruction helps the student little, the row is hard for it; above 1 the instruction does not help at all.

The losses come from vLLM's prompt log-probabilities (`prompt_logprobs=0`: the log-probability of each prompt
token itself), so the engine only prefills; it is asked for one new token because a request must generate one.
Only the answer's tokens count, split exactly as training masks them (training/chat_format.py): the prompt (the
chat template up to and including its assistant header, `add_generation_prompt=True`) and the rest of the whole
conversation are tokenized separately and concatenated, so the answer's tokens include the template's end of
turn, which the student is trained to write too.

The unconditioned loss is that of the same assistant turn after an *empty user turn* in the same template (the
system prompt included), rather than the bare answer text: it keeps the answer's tokens and their position after
an assistant header identical in both, so the ratio measures the instruction alone (the IFD authors score the
answer without any prompt; with a chat template that changes the first tokens' context as well).

The answer is read from a column chosen by the caller: the teacher's (or the pool's reference) answer when
scoring, the held-out reference answer when evaluating. A row without an answer, or whose prompt and answer do
not fit in `max_model_len`, is marked with a reason in `answer_status`/`answer_error`, never dropped.
"""
from __future__ import annotations

import math
from typing import Optional

import pyarrow as pa

from pipeline.config import StudentConfig
from pipeline.models import Model
from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.student import StudentGenerator, generate, start_engine
from training.chat_format import messages, split_texts

OUTPUT_COLUMNS = {"answer_loss": pa.float32(), "answer_loss_alone": pa.float32(), "ifd": pa.float32(),
                  "answer_tokens": pa.int32(), "answer_status": pa.string(), "answer_error": pa.string()}


class AnswerLoss:
    """Ray Data callable class: adds `answer_loss` (mean nats per answer token given the instruction),
    `answer_loss_alone` and `ifd` (when `unconditioned`), `answer_tokens`, `answer_status` and `answer_error`."""

    def __init__(self, config: StudentConfig, model_dir: Model, answer_column: str, unconditioned: bool = True,
                 system_prompt: Optional[str] = None, engine=None):
        """`answer_column`: the column holding the answer scored; `unconditioned`: also the loss without the
        instruction, and IFD; `system_prompt`: the one the student is trained with (training.system_prompt);
        `engine`: a vLLM engine over `model_dir` another stage of this actor started (else one is started)."""
        from vllm import SamplingParams

        self.llm = engine or start_engine(config, model_dir)
        self.tokenizer = self.llm.get_tokenizer()
        self.answer_column, self.unconditioned, self.system_prompt = answer_column, unconditioned, system_prompt
        self.max_model_len = config.engine.max_model_len
        # one new token: a request has to generate something; its prompt's log-probs are what is read
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

    def token_ids(self, instruction: str, input_text: Optional[str], answer: str) -> tuple[list[int], int]:
        """The whole conversation's token ids and where the answer starts in them (as training splits them)."""
        prompt, answer_text = split_texts(self.tokenizer, messages(instruction, input_text, self.system_prompt),
                                          answer)
        prompt_ids, answer_ids = self.tokenizer([prompt, answer_text], add_special_tokens=False)["input_ids"]
        return prompt_ids + answer_ids, len(prompt_ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, ("id", "instruction", "input", self.answer_column), "answer loss")
        rows = batch.select(["instruction", "input", self.answer_column]).to_pylist()
        # per row: (token ids, answer start) with the instruction, then without it when unconditioned
        requests: dict[int, list[tuple[list[int], int]]] = {}
        problems: dict[int, tuple[str, str]] = {}
        for i, row in enumerate(rows):
            answer = row[self.answer_column]
            if not isinstance(answer, str) or not answer.strip():
                problems[i] = ("no_answer", f"column '{self.answer_column}' is empty")
                continue
            pair = [self.token_ids(row["instruction"], row["input"], answer)]
            if self.unconditioned:
                pair.append(self.token_ids("", None, answer))
            longest = max(len(ids) for ids, _ in pair)
            if longest >= self.max_model_len:           # the one generated token needs a place too
                problems[i] = ("too_long", f"prompt and answer are {longest} tokens; max_model_len is "
                                           f"{self.max_model_len}")
                continue
            requests[i] = pair
        flat = [request for pair in requests.values() for request in pair]
        outputs = iter(self.llm.generate([{"prompt_token_ids": ids} for ids, _ in flat], self.params,
                                         use_tqdm=False) if flat else [])
        columns: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for i in range(len(rows)):
            if i in problems:
                values = (None, None, None, 0, *problems[i])
            else:
                losses = [mean_loss(next(outputs).prompt_logprobs, ids, start) for ids, start in requests[i]]
                loss, alone = losses[0], (losses[1] if self.unconditioned else None)
                ids, start = requests[i][0]
                values = (loss, alone, loss / alone if alone else None, len(ids) - start, "ok", None)
            for name, value in zip(OUTPUT_COLUMNS, values):
                columns[name].append(value)
        return with_columns(batch, {name: pa.array(columns[name], kind) for name, kind in OUTPUT_COLUMNS.items()})


class AnswerAndLoss:
    """Ray Data callable class: the student's own answer (StudentGenerator's columns) and its loss on a given
    answer (AnswerLoss's, without IFD), both from one engine. An evaluation needs both for every held-out row;
    a second pool of engines would pay its own start and memory."""

    def __init__(self, config: StudentConfig, model_dir: Model, answer_column: str,
                 system_prompt: Optional[str] = None):
        self.answer = StudentGenerator(config, model_dir)
        self.loss = AnswerLoss(config, model_dir, answer_column, False, system_prompt, engine=self.answer.llm)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.loss(self.answer(batch))


def mean_loss(prompt_logprobs: list, token_ids: list[int], answer_start: int) -> float:
    """Mean negative log-probability of the tokens from `answer_start` on. vLLM's prompt log-probs hold, per
    position, a dict token id → Logprob that includes the prompt's own token (None at position 0)."""
    return -math.fsum(prompt_logprobs[k][token_ids[k]].logprob
                      for k in range(answer_start, len(token_ids))) / (len(token_ids) - answer_start)


def answer_losses(dataset, model_dir: Model, config: StudentConfig, answer_column: str, unconditioned: bool,
                  system_prompt: Optional[str]):
    """The stage applied to a Ray dataset, on the student's engine actors (student.generate's pool and GPUs)."""
    return generate(dataset, model_dir, config, AnswerLoss, answer_column=answer_column,
                    unconditioned=unconditioned, system_prompt=system_prompt)


def answers_and_losses(dataset, model_dir: Model, config: StudentConfig, answer_column: str,
                       system_prompt: Optional[str]):
    """AnswerAndLoss applied to a Ray dataset, on one pool of the student's engine actors."""
    return generate(dataset, model_dir, config, AnswerAndLoss, answer_column=answer_column,
                    system_prompt=system_prompt)
