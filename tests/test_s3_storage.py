"""The commands and model loading of a run directory on s3://, against a real S3 API on loopback (moto's
server): a pool imported there, `tapir stop` and `tapir report` on it, and a model stored there loaded by
transformers from its copy in the local cache. The whole run on s3 is tests/test_cluster_run.py (slow): a submitted run whose run directory is a bucket."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from s3_server import moto_s3
from test_report import _write_run

from pipeline import store
from pipeline.models import ModelError, StoredModel, bundled_encoder_dir, local_model, resolve_model
from pipeline.pool import read_pool

TAPIR = str(Path(sys.executable).with_name("tapir"))
BUCKET = "tapir-s3-storage"


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        server.create_bucket(BUCKET)
        yield server


def tapir(*args, env, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([TAPIR, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_a_pool_imports_into_s3_with_the_endpoint_from_the_environment(s3, shared_data, tmp_path):
    env = {**s3.env, "AWS_ENDPOINT_URL": s3.endpoint_url}
    source = tmp_path / "pool.jsonl"
    source.write_text("\n".join((shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:30]) + "\n")
    done = tapir("pool", "import", str(source), "--out", f"s3://{BUCKET}/imported/pool", "--rows-per-shard", "20",
                 env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(s3.files(f"{BUCKET}/imported/pool")) == {f"{BUCKET}/imported/pool/{name}" for name in (
        "part-00000.parquet", "part-00001.parquet", "_manifest.json")}
    pool = read_pool(store.locate(f"s3://{BUCKET}/imported/pool", s3.endpoint_url))
    assert pool.num_rows == 30 and len(set(pool.column("id").to_pylist())) == 30
    assert [p.name for p in tmp_path.iterdir()] == ["pool.jsonl"]         # nothing written beside the command


def test_tapir_stop_leaves_its_file_in_an_s3_run_directory(s3, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"run_dir": f"s3://{BUCKET}/stopped/run",
                                                  "s3_endpoint_url": s3.endpoint_url}}))
    done = tapir("stop", str(config), env=s3.env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote s3://{BUCKET}/stopped/run/STOP" in done.stdout
    assert s3.read(f"{BUCKET}/stopped/run/STOP").startswith(b"stop requested at ")


def test_tapir_report_writes_the_page_and_plots_into_an_s3_run_directory(s3, tmp_path):
    local = _write_run(tmp_path / "run")
    prefix = f"{BUCKET}/reported/run"
    pafs.copy_files(str(local), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())
    done = tapir("report", f"s3://{prefix}", env={**s3.env, "AWS_ENDPOINT_URL": s3.endpoint_url}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == f"s3://{prefix}/report/report.html"
    written = s3.files(f"{prefix}/report")
    assert {f"{prefix}/report/report.html", f"{prefix}/report/report.md"} <= set(written)
    assert sum(path.endswith(".png") for path in written) >= 5
    assert b"<img" in s3.read(f"{prefix}/report/report.html")


def test_a_model_in_s3_loads_in_transformers_from_a_copy_in_the_local_cache(s3, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    encoder = bundled_encoder_dir()
    prefix = f"{BUCKET}/models/round_0/model"
    pafs.copy_files(str(encoder), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())
    cache = tmp_path / "cache"
    model = resolve_model(f"s3://{prefix}", cache, s3.endpoint_url)
    assert isinstance(model, StoredModel) and model.uri == f"s3://{prefix}"
    local = Path(local_model(model))
    assert local.parent == cache / "models" / "stored" and local.name.startswith("round_0-model-")
    def files(directory: Path) -> list[str]:
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())

    assert files(local) == files(encoder) and "1_Pooling/config.json" in files(local)      # subfolders too
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    loaded = AutoModel.from_pretrained(str(local))
    assert loaded.config.to_dict()["hidden_size"] == json.loads((encoder / "config.json").read_text())["hidden_size"]
    assert tokenizer("an instruction")["input_ids"]
    assert local_model(model) == str(local)                     # copied once
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(f"s3://{BUCKET}/models/nothing-here", cache, s3.endpoint_url)


def test_a_resumed_training_log_on_s3_keeps_the_steps_logged_before(s3):
    from training.sft import read_metrics
    from training.sft_worker import _MetricsLog

    out = store.locate(f"s3://{BUCKET}/resumed/run/round_0/sft", s3.endpoint_url)
    record = {"lr": 1e-5, "loss": 2.0, "epoch": 0.5, "tokens_per_s": 10.0}
    first = _MetricsLog(out)                 # the run killed after step 1's checkpoint copied its log up
    first.step({"step": 1, **record}, total_steps=2)
    first.sync()
    resumed = _MetricsLog(out)
    resumed.step({"step": 2, **record, "loss": 1.5}, total_steps=2)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(out)["step"]] == [(1, 2.0), (2, 1.5)]
    assert any(path.startswith(f"{out.path}/tensorboard/") for path in s3.files(out.path))
