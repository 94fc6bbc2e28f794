import json
import multiprocessing
from pathlib import Path

import pytest

from pipeline.config import BUNDLED_ENCODER, BUNDLED_STUDENT
from pipeline.models import PREPARED_MANIFEST, ModelError, is_prepared, prepare_bundled_student, resolve_model


def test_bundled_student_is_prepared_as_a_verified_safetensors_directory(prepared_student):
    names = {p.name for p in prepared_student.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", PREPARED_MANIFEST} <= names
    config = json.loads((prepared_student / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert is_prepared(prepared_student, full_check=True)


def test_a_prepared_student_loads_in_transformers_and_answers(prepared_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared_student)
    model = AutoModelForCausalLM.from_pretrained(prepared_student)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    answer = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0][ids.shape[1]:])
    assert "4" in answer


def test_preparing_again_reuses_the_cache_without_rewriting(prepared_student, model_cache):
    before = {p.name: p.stat().st_mtime_ns for p in prepared_student.iterdir()}
    assert prepare_bundled_student(model_cache) == prepared_student
    assert {p.name: p.stat().st_mtime_ns for p in prepared_student.iterdir()} == before


def _prepare_in_child(cache: str, queue) -> None:
    queue.put(str(prepare_bundled_student(cache)))


def test_two_processes_racing_to_prepare_get_one_good_directory(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_prepare_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
    assert [w.exitcode for w in workers] == [0, 0]
    results = {queue.get(timeout=5), queue.get(timeout=5)}
    assert len(results) == 1
    models_dir = tmp_path / "models"
    assert [p.name for p in models_dir.iterdir() if p.is_dir()] == [Path(results.pop()).name]
    assert is_prepared(next(p for p in models_dir.iterdir() if p.is_dir()), full_check=True)


def test_a_damaged_preparation_is_detected_and_redone(tmp_path, prepared_student):
    import shutil

    damaged = tmp_path / "models" / prepared_student.name
    shutil.copytree(prepared_student, damaged)
    with open(damaged / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    assert not is_prepared(damaged)
    assert prepare_bundled_student(tmp_path) == damaged
    assert is_prepared(damaged, full_check=True)


def test_resolve_model_accepts_bundled_names_directories_and_hub_ids(prepared_student, model_cache, tmp_path):
    assert resolve_model(BUNDLED_STUDENT, model_cache) == str(prepared_student)
    encoder = Path(resolve_model(BUNDLED_ENCODER, model_cache))
    assert json.loads((encoder / "config.json").read_text())["model_type"] == "bert"
    assert resolve_model(str(prepared_student), model_cache) == str(prepared_student)
    assert resolve_model("Qwen/Qwen2-7B", model_cache) == "Qwen/Qwen2-7B"
    with pytest.raises(ModelError, match="unknown bundled model"):
        resolve_model("bundled:gpt-5", model_cache)
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model(str(tmp_path / "nowhere"), model_cache)
    with pytest.raises(ModelError, match="not an HF model directory"):
        resolve_model(str(tmp_path), model_cache)


def test_the_bundled_encoder_embeds_text_offline(monkeypatch):
    import torch
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = resolve_model(BUNDLED_ENCODER, "/nonexistent")
    tokenizer, model = AutoTokenizer.from_pretrained(encoder), AutoModel.from_pretrained(encoder)
    batch = tokenizer(["Solve 2x + 3 = 7.", "Find x if 2x + 3 = 7.", "Paint a sunset."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, different = (vectors[0] @ vectors[1]).item(), (vectors[0] @ vectors[2]).item()
    assert similar > different


def test_an_engine_on_a_cpu_without_bf16_arithmetic_runs_in_float32_unless_told_otherwise(monkeypatch):
    from pipeline import models
    from pipeline.config import StudentConfig
    from pipeline.stages.student import engine_kwargs

    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: False)
    assert models.engine_dtype("auto", on_gpu=False) == "float32"
    assert models.engine_dtype("auto", on_gpu=True) == "auto"             # a GPU does bf16 itself
    assert models.engine_dtype("bfloat16", on_gpu=False) == "bfloat16"    # an explicit choice is kept
    assert engine_kwargs(StudentConfig(), "/m")["dtype"] == "float32"
    assert engine_kwargs(StudentConfig(num_gpus_per_actor=1), "/m")["dtype"] == "auto"
    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: True)
    assert models.engine_dtype("auto", on_gpu=False) == "auto"
