"""`tapir train` end to end: Ray Train + DeepSpeed ZeRO-2 (gloo, CPU) on real Alpaca rows, killed with SIGKILL
mid-epoch and run again; the trained model is a safetensors directory that vLLM answers from. (ZeRO-3 on two
workers is trained, exported and checked whole by the s3 round in tests/test_s3_run.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import kill_when
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
ROWS = 24          # with 2 epochs and a step of 4 sequences: 6 steps, so a kill lands mid-epoch


def write_config(tmp_path: Path, cache_dir: Path, **training) -> Path:
    config = {"storage": {"run_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)},
              "ray": {"num_cpus": 2},
              "training": {"epochs": 2, "effective_batch_size": 4, "micro_batch_size": 2, "max_len": 256,
                           "checkpoint_every_steps": 2, "eval_fraction": 0.2, **training}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_rows(path: Path, shared_data: Path) -> list[dict]:
    rows = [json.loads(line) for line in (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:ROWS]]
    rows.append({**rows[0], "instruction": "Repeat this answer.", "output": " ".join([rows[0]["output"]] * 30)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def step_records(run: Path) -> list[dict]:
    path = run / "round_0" / "sft" / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "step"]


# A training run on 2 cores takes 5-8 minutes; a machine loaded by other work once pushed both past 15.
@pytest.mark.timeout(1800)
def test_a_killed_training_run_resumes_at_its_step_and_exports_a_model_vllm_loads(
        tmp_path, shared_data, prepared_student):
    data = tmp_path / "rows.jsonl"
    write_rows(data, shared_data)
    config = write_config(tmp_path, prepared_student.parent.parent)
    run = tmp_path / "run"
    command = [TAPIR, "train", str(config), "--data", str(data)]

    killed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    kill_when(killed, lambda: len(step_records(run)) >= 3, 600, killed.stdout)
    steps_before = [r["step"] for r in step_records(run)]

    resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]

    manifest = json.loads((run / "round_0" / "sft" / "_manifest.json").read_text())
    total = manifest["steps"]["total_steps"]
    resumed_at = int(output.split("resuming at step ")[1].split()[0])
    # the resumed run started from a checkpoint taken before the kill, not from step 0 or epoch 0
    assert 2 <= resumed_at <= max(steps_before) < total
    records = step_records(run)
    assert [r["step"] for r in records] == steps_before + list(range(resumed_at + 1, total + 1))
    first_resumed = records[len(steps_before)]
    assert first_resumed["epoch"] > records[resumed_at - 1]["epoch"] > 0
    # a step trained before the kill and again after it saw the same sequences from the same weights
    for redone in records[len(steps_before):]:
        if redone["step"] in steps_before:
            before = records[steps_before.index(redone["step"])]
            assert (redone["real_tokens"], redone["loss"]) == (before["real_tokens"], pytest.approx(before["loss"]))

    assert manifest["complete"] and manifest["training"]["steps_done"] == total
    assert manifest["data"]["rows_in"] == ROWS + 1
    assert manifest["data"]["rows_over_max_len"] == 1            # the repeated answer, counted and named
    assert len(manifest["data"]["over_max_len_ids"]) == 1
    assert manifest["data"]["rows_trainable"]["train"] + manifest["data"]["rows_trainable"]["eval"] == ROWS
    assert manifest["training"]["non_pad_share"] > 0.8
    evals = manifest["eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == total and evals[-1]["perplexity"] > 1
    assert "round 0 trained" in resumed.stdout and "held-out perplexity" in resumed.stdout

    model = run / "round_0" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= \
        {p.name for p in model.iterdir()}
    trained, base = load_file(model / "model.safetensors"), load_file(prepared_student / "model.safetensors")
    assert trained.keys() == base.keys()                          # tied weights saved once, as in the base
    assert trained["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert manifest["smoke"] and manifest["smoke"][0]["status"] == "ok" and manifest["smoke"][0]["response"].strip()

    sft = run / "round_0" / "sft"
    assert (sft / "loss.png").stat().st_size > 10_000
    assert any(p.stat().st_size > 0 for p in (sft / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run / "round_0" / "checkpoint" / "train").exists() or \
        not any((run / "round_0" / "checkpoint" / "train").iterdir())    # deleted once the model is in

    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_a_training_set_with_every_row_over_max_len_stops_before_any_worker_starts(
        tmp_path, shared_data, prepared_student):
    data = tmp_path / "rows.jsonl"
    write_rows(data, shared_data)
    config = write_config(tmp_path, prepared_student.parent.parent, max_len=16)
    result = subprocess.run([TAPIR, "train", str(config), "--data", str(data)], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 2
    assert f"all {ROWS + 1} rows are longer than training.max_len=16" in result.stderr
    assert "RayTrainWorker" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "round_0" / "checkpoint").exists()
