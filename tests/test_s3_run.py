"""`tapir run` with its run directory on s3://, against a real S3 API on loopback (moto's server): one small round
of score → plan → expand → respond → train with the real vLLM student, classifier, Ray Train and DeepSpeed, the
paid API played by a loopback server. Every file the round writes must be in the bucket and nothing of it on
local disk but the model cache; then round 1 scores with the round-0 student, copied from the bucket.

The round trains with ZeRO-3 on two workers, the layout that shards the weights: the model exported to the
bucket must hold every tensor whole, not one rank's partition.
"""
import json
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
import yaml
from s3_server import CREDENTIALS, S3Server, moto_s3
from test_run import KEY_ENV, TAPIR, teacher_reply

from pipeline.llm.emulated_api import EmulatedAPI

pytestmark = pytest.mark.slow

BUCKET = "tapir-runs"
RUN = f"{BUCKET}/demo/run"
ROWS = 20
PLANNED = 12
EXPANDED = 4


@dataclass
class S3Run:
    s3: S3Server
    api: EmulatedAPI
    config: Path
    env: dict
    work: Path              # the commands' working directory: a relative local run dir would land here
    cache: Path             # storage.cache_dir
    student: Path           # the prepared bundled student the round started from
    first: subprocess.CompletedProcess
    calls: Counter          # the prompts the API answered during the run


def tapir(*args, env, cwd, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([TAPIR, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def write_config(path: Path, pool: Path, api: EmulatedAPI, s3: S3Server, cache: Path) -> None:
    config = {
        "pool": {"source": str(pool), "rows_per_shard": 16},
        "storage": {"run_dir": f"s3://{RUN}", "s3_endpoint_url": s3.endpoint_url, "cache_dir": str(cache)},
        "ray": {"num_cpus": 2},
        "student": {"batch_size": 10, "sampling": {"max_tokens": 12}},
        "teacher": {"kind": "remote", "base_url": api.base_url, "model": "paid-teacher", "api_key_env": KEY_ENV,
                    "price": {"input_per_million_usd": 1.0, "output_per_million_usd": 4.0}},
        "classifier": {"label_sample_size": ROWS, "train": {"epochs": 1}},
        "curriculum": {"rounds": 1, "rows_per_round": PLANNED, "expansion_per_round": EXPANDED,
                       "mfd_threshold": 0.0, "keep_reference_outputs": False},
        "scoring": {"batch_size": 10, "batches_in_flight_per_actor": 1},
        "respond": {"max_tokens": 16},
        "training": {"epochs": 1, "effective_batch_size": 4, "micro_batch_size": 2, "max_len": 192,
                     "eval_fraction": 0.0, "zero_stage": 3, "num_workers": 2, "gradient_checkpointing": False},
    }
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory, shared_data, prepared_student):
    tmp_path = tmp_path_factory.mktemp("s3-run")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join((shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:ROWS]) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    cache = prepared_student.parent.parent
    api = EmulatedAPI(reply=teacher_reply)
    with moto_s3() as s3, api.serving_in_thread():
        s3.create_bucket(BUCKET)
        config = tmp_path / "config.yaml"
        write_config(config, pool, api, s3, cache)
        env = {**s3.env, KEY_ENV: api.api_key}
        first = tapir("run", str(config), env=env, cwd=work, timeout=1500)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
        print(first.stdout)
        yield S3Run(s3, api, config, env, work, cache, prepared_student, first, Counter(api.stats.answered_prompts))


@pytest.mark.timeout(1800)     # the module's run: ~9 min on 2 cores beside other work, 14 min under heavy load
def test_a_round_on_s3_writes_every_stage_manifest_model_and_report_to_the_bucket(s3_run):
    s3, run = s3_run.s3, s3_run
    files = s3.files(RUN)
    names = {path.removeprefix(RUN + "/") for path in files}
    assert "run finished: 1 round(s)" in run.first.stdout
    assert f"report: s3://{RUN}/report/report.html" in run.first.stdout

    state = json.loads(s3.read(f"{RUN}/state.json"))
    assert state["status"] == "finished" and state["spent_usd"] > 0
    assert state["rounds"]["0"]["finished"] == ["score", "plan", "expand", "respond", "train_set", "train"]
    manifests = {stage: json.loads(s3.read(f"{RUN}/round_0/{stage}/_manifest.json"))
                 for stage in ("score", "plan", "expand", "respond", "train", "sft")}
    assert manifests["score"]["complete"] and manifests["score"]["rows_out"] == ROWS
    assert manifests["plan"]["rows_planned"] == PLANNED
    assert manifests["sft"]["complete"] and manifests["sft"]["model"] == f"s3://{RUN}/round_0/model"
    assert manifests["sft"]["smoke"][0]["status"] == "ok"         # vLLM answered from the model in the bucket

    expected = {"pool/_manifest.json", "pool/part-00000.parquet", "pool/part-00001.parquet",
                "classifier/labels/_manifest.json", "classifier/model/config.json",
                "classifier/model/model.safetensors", "classifier/model/metrics.json",
                "classifier/model/confusion.png",
                "round_0/plan/plan.parquet", "round_0/expand/new_rows.parquet", "round_0/expand/seeds/seeds.parquet",
                "round_0/train/part-0.parquet", "round_0/train/_manifest.json",
                "round_0/sft/metrics.jsonl", "round_0/sft/loss.png", "round_0/sft/data/_manifest.json",
                "round_0/model/config.json", "round_0/model/model.safetensors", "round_0/model/tokenizer.json",
                "round_0/summary.json", "round_0/summary.txt", "state.json",
                "report/report.html", "report/report.md"}
    assert expected <= names, sorted(expected - names)
    for stage in ("score", "expand/generated", "respond/answers", "sft/data/tokenized", "sft/data/packed/train"):
        assert any(n.startswith(f"round_0/{stage}/") and n.endswith(".parquet") for n in names), stage
    assert any(n.startswith("round_0/sft/tensorboard/") for n in names)
    assert sum(n.startswith("report/plots/") and n.endswith(".png") for n in names) >= 4
    # the stages' resume checkpoints and Ray Train's are deleted once their stage is done
    assert not [n for n in names if n.startswith("round_0/checkpoint/")], sorted(names)

    steps = [json.loads(line) for line in s3.read(f"{RUN}/round_0/sft/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == list(range(1, manifests["sft"]["steps"]
                                                                             ["total_steps"] + 1))
    model_config = json.loads(s3.read(f"{RUN}/round_0/model/config.json"))
    assert model_config["model_type"] == "llama"
    # ZeRO-3 on two workers: each worker's micro-batch counts, and the export gathered whole tensors
    plan = manifests["sft"]["steps"]
    assert plan["effective_batch_size"] == 4 and plan["accumulation_steps"] == 1
    trained = safetensors.torch.load(s3.read(f"{RUN}/round_0/model/model.safetensors"))
    base = safetensors.torch.load_file(run.student / "model.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    train = pq.read_table(f"{RUN}/round_0/train/part-0.parquet", filesystem=s3.filesystem())
    assert Counter(train.column("origin").to_pylist())["pool"] == PLANNED


@pytest.mark.timeout(1800)
def test_nothing_of_an_s3_run_lands_on_local_disk_and_no_secret_in_the_bucket(s3_run):
    s3, run = s3_run.s3, s3_run
    assert list(run.work.iterdir()) == []               # no runs/ or anything else beside the command
    # the only local files: the model cache (the prepared student, and copies of models from the bucket)
    stored = run.cache / "models" / "stored"
    assert {p.name.rsplit("-", 1)[0] for p in stored.iterdir() if p.is_dir()} >= {"round_0-model", "classifier-model"}
    secrets = [run.api.api_key, CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_ACCESS_KEY_ID"]]
    for path in s3.files(RUN):
        data = s3.read(path)
        assert not [secret for secret in secrets if secret.encode() in data], path


@pytest.mark.timeout(1800)
def test_an_s3_run_run_again_is_finished_and_sends_nothing(s3_run):
    again = tapir("run", str(s3_run.config), env=s3_run.env, cwd=s3_run.work, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "run finished: 1 round(s)" in again.stdout
    assert Counter(s3_run.api.stats.answered_prompts) == s3_run.calls


@pytest.mark.timeout(1800)
def test_round_1_scores_with_the_round_0_student_copied_from_the_bucket(s3_run):
    s3 = s3_run.s3
    scored = tapir("score", str(s3_run.config), "--round", "1", env=s3_run.env, cwd=s3_run.work, timeout=600)
    assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr[-3000:]
    manifest = json.loads(s3.read(f"{RUN}/round_1/score/_manifest.json"))
    assert manifest["complete"] and manifest["rows_out"] == ROWS
    rows = [pq.read_table(path, filesystem=s3.filesystem()).to_pylist()
            for path in s3.files(f"{RUN}/round_1/score") if path.endswith(".parquet")]
    rows = [row for part in rows for row in part]
    assert {row["teacher_source"] for row in rows} == {"earlier_round"}      # no teacher call paid again
    assert all(row["student_status"] in ("ok", "too_long") for row in rows)
    assert list(s3_run.work.iterdir()) == []
