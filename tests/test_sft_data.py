"""The data side of `tapir train`, without Ray: chat formatting and the answer-only mask, the length policy,
packing (tight, and with no attention across packed rows), the step arithmetic and the training-set checks."""
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import store
from pipeline.config import TrainingConfig
from training import TrainingDataError
from training.chat_format import IGNORE_INDEX, ChatTokenizer, fit_to_length, held_out, messages, split_texts
from training.packing import best_fit_decreasing, collate, pack
from training.sft import deepspeed_config, read_metrics
from training.sft_data import check_training_set
from training.steps import plan_steps


@pytest.fixture(scope="module")
def tokenizer(prepared_student):
    return AutoTokenizer.from_pretrained(prepared_student)


@pytest.fixture(scope="module")
def alpaca_rows(shared_data):
    lines = (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def tokenize_rows(model_dir, rows, max_len=1024, truncation="drop", eval_fraction=0.0, system_prompt=None):
    table = pa.Table.from_pylist([{"id": f"r{i}", "instruction": r["instruction"], "input": r["input"],
                                   "output": r["output"]} for i, r in enumerate(rows)])
    return ChatTokenizer(str(model_dir), max_len, truncation, system_prompt, eval_fraction)(table)


def test_only_the_answer_and_its_end_of_turn_carry_loss(tokenizer, prepared_student):
    row = {"instruction": "Name a primary colour.", "input": "", "output": "Blue."}
    tokenized = tokenize_rows(prepared_student, [row]).to_pylist()[0]
    ids, labels = tokenized["input_ids"], tokenized["labels"]
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert [label for label in labels if label != IGNORE_INDEX] == trained
    assert tokenizer.decode(trained) == "Blue.<|im_end|>\n"
    prompt = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    # the student is trained on the prompt it is asked with: the template's default system turn, the user turn
    assert prompt == tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}],
                                                   add_generation_prompt=True, tokenize=False)


def test_a_configured_system_prompt_and_the_input_are_part_of_the_prompt(tokenizer):
    conversation = messages("Summarise.", "A long text.", "Be brief.")
    prompt, answer = split_texts(tokenizer, conversation, "Short.")
    assert "Be brief." in prompt and "Summarise.\n\nA long text." in prompt
    assert "helpful AI assistant named SmolLM" not in prompt
    assert answer.startswith("Short.")


def test_rows_over_max_len_are_dropped_or_truncated_as_configured():
    prompt, answer = [1, 2, 3], [4, 5, 6, 7]
    assert fit_to_length(prompt, answer, 7, "drop").status == "ok"
    dropped = fit_to_length(prompt, answer, 5, "drop")
    assert (dropped.status, dropped.input_ids, dropped.num_tokens) == ("over_max_len", [], 7)
    assert "7 tokens (prompt 3) > max_len 5" in dropped.error
    truncated = fit_to_length(prompt, answer, 5, "truncate")
    assert truncated.status == "truncated"
    assert (truncated.input_ids, truncated.labels) == ([1, 2, 3, 4, 5], [IGNORE_INDEX] * 3 + [4, 5])
    # a prompt that fills max_len leaves no answer to learn from: dropped even when truncating
    assert fit_to_length(prompt, answer, 3, "truncate").status == "over_max_len"


def test_bad_rows_are_kept_with_a_reason_and_none_is_lost(prepared_student):
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
            {"instruction": "Say bye.", "input": "", "output": "  "},
            {"instruction": "", "input": "x", "output": "y"}]
    out = tokenize_rows(prepared_student, rows).to_pylist()
    assert [r["id"] for r in out] == ["r0", "r1", "r2"]
    assert [r["status"] for r in out] == ["ok", "invalid", "invalid"]
    assert out[1]["error"] == "field 'output' is empty" and out[2]["error"] == "field 'instruction' is empty"


def test_held_out_rows_are_a_stable_share_of_ids():
    ids = [f"row-{i}" for i in range(20000)]
    chosen = [i for i in ids if held_out(i, 0.05)]
    assert 0.04 < len(chosen) / len(ids) < 0.06
    assert chosen == [i for i in ids if held_out(i, 0.05)]
    assert not any(held_out(i, 0.0) for i in ids[:100])


def test_best_fit_decreasing_places_every_row_once_within_capacity():
    lengths = [random.Random(7).randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= sum(lengths) / 128 * 1.05 + 1
    with pytest.raises(ValueError, match="cannot be packed"):
        best_fit_decreasing([200], 128)


def test_packing_alpaca_fills_sequences_to_at_least_95_percent(prepared_student, alpaca_rows):
    tokenized = tokenize_rows(prepared_student, alpaca_rows[:2000])
    sequences = pack(tokenized.select(["input_ids", "labels"]), 1024, packing=True)
    tokens = sum(len(s) for s in sequences.column("input_ids").to_pylist())
    assert tokens == sum(len(s) for s in tokenized.column("input_ids").to_pylist())
    assert tokens / (sequences.num_rows * 1024) >= 0.95
    unpacked = pack(tokenized.select(["input_ids", "labels"]), 1024, packing=False)
    assert unpacked.num_rows == tokenized.num_rows


def test_a_packed_row_is_computed_as_if_it_were_alone(prepared_student, alpaca_rows):
    """No attention crosses from one packed row to another: the logits of each row inside a packed, padded
    micro-batch equal its logits computed on its own."""
    tokenized = tokenize_rows(prepared_student, alpaca_rows[:2]).to_pylist()
    packed = pack(pa.Table.from_pylist(tokenized).select(["input_ids", "labels"]), 1024, packing=True).to_pylist()
    assert len(packed) == 1 and len(packed[0]["row_lengths"]) == 2
    row = packed[0]
    longer = row["input_ids"] * 2          # a longer sequence beside it, so the packed one is padded
    batch = collate({"input_ids": np.array([row["input_ids"], longer], dtype=object),
                     "labels": np.array([row["labels"], longer], dtype=object),
                     "row_lengths": np.array([row["row_lengths"], [len(longer)]], dtype=object)}, pad_token_id=2)
    model = AutoModelForCausalLM.from_pretrained(prepared_student, dtype=torch.float32).eval()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        # with a KV cache transformers ignores the row boundaries: the trainer turns it off for this reason
        crossed = model(**inputs, use_cache=True).logits[0]
        together = model(**inputs, use_cache=False).logits[0]
        second = slice(row["row_lengths"][0], sum(row["row_lengths"]))
        assert not torch.allclose(crossed[second], together[second], atol=1e-2)
        start = 0
        for length in row["row_lengths"]:
            ids = torch.tensor([row["input_ids"][start:start + length]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(together[start:start + length], alone, atol=2e-4, rtol=1e-4)
            start += length


def test_collate_pads_with_ignored_labels_and_restarts_positions_per_row():
    batch = collate({"input_ids": np.array([[5, 6, 7, 8, 9], [5, 6]], dtype=object),
                     "labels": np.array([[-100, 6, -100, -100, 9], [-100, 6]], dtype=object),
                     "row_lengths": np.array([[2, 3], [2]], dtype=object)}, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100, 9], [-100, 6, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert (int(batch["real_tokens"]), int(batch["label_tokens"])) == (7, 3)


def test_step_plan_accumulates_to_the_effective_batch_and_resumes_mid_epoch():
    plan = plan_steps(TrainingConfig(epochs=3, effective_batch_size=16, micro_batch_size=4, num_workers=2), 101)
    # 50 sequences per worker (one left over by the equal split), 13 micro-batches of up to 4
    assert (plan.sequences_per_worker, plan.micro_batches_per_epoch, plan.accumulation_steps) == (50, 13, 2)
    assert (plan.effective_batch_size, plan.total_steps, plan.micro_batches_not_stepped) == (16, 19, 1)
    assert plan.warmup_steps == 1
    assert plan.position(0) == (0, 0)
    assert plan.position(7) == (1, 1)        # step 7 ends one micro-batch into the second epoch
    small = plan_steps(TrainingConfig(effective_batch_size=128, micro_batch_size=4), 6)
    assert (small.micro_batches_per_epoch, small.accumulation_steps, small.effective_batch_size) == (2, 2, 8)
    with pytest.raises(TrainingDataError, match="1 training sequence"):
        plan_steps(TrainingConfig(num_workers=2), 1)


def test_deepspeed_config_comes_from_the_shipped_file_with_this_runs_batch():
    training = TrainingConfig(zero_stage=3, effective_batch_size=16, micro_batch_size=4, num_workers=2)
    config = deepspeed_config(training, plan_steps(training, 64))
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 2, 16)
    assert config["bf16"] == {"enabled": False}          # auto: fp32 on CPU
    gpu = TrainingConfig(use_gpu=True)
    assert deepspeed_config(gpu, plan_steps(gpu, 64))["bf16"] == {"enabled": True}


def test_bad_training_sets_stop_with_the_file_named(tmp_path):
    location = store.locate(str(tmp_path))
    with pytest.raises(TrainingDataError, match="no training set"):
        check_training_set(location)
    good = pa.table({"id": ["a"], "instruction": ["i"], "input": [""], "output": ["o"]})
    pq.write_table(good.drop_columns(["output"]), tmp_path / "part-0.parquet")
    with pytest.raises(TrainingDataError, match=r"part-0\.parquet: training set file lacks column\(s\) output"):
        check_training_set(location)
    pq.write_table(good.slice(0, 0), tmp_path / "part-0.parquet")
    with pytest.raises(TrainingDataError, match="the training set is empty"):
        check_training_set(location)
    pq.write_table(good, tmp_path / "part-0.parquet")
    assert check_training_set(location)[1] == 1


def test_metrics_of_steps_redone_after_a_resume_count_once(tmp_path):
    records = [{"kind": "eval", "step": 0, "loss": 3.0}, {"kind": "step", "step": 1, "loss": 2.9},
               {"kind": "step", "step": 2, "loss": 2.8}, {"kind": "step", "step": 2, "loss": 2.7},
               {"kind": "step", "step": 3, "loss": 2.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = read_metrics(store.locate(str(tmp_path)))
    assert [(r["step"], r["loss"]) for r in metrics["step"]] == [(1, 2.9), (2, 2.7), (3, 2.6)]
    assert [r["step"] for r in metrics["eval"]] == [0]
