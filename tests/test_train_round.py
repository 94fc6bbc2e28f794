"""`tapir train --data FILE`: a training set from a file is checked before any Ray Train worker starts.

Training itself (Ray Train + DeepSpeed ZeRO-2, killed with SIGKILL after a checkpoint and resumed at its step, the
model exported whole and answered by vLLM) is proven by round 1 of the killed run in tests/test_run.py; ZeRO-3 on
two workers by the submitted run on s3 in tests/test_cluster_run.py; gradient checkpointing by tests/test_local_run.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
ROWS = 24


def write_config(tmp_path: Path, cache_dir: Path, **training) -> Path:
    config = {"storage": {"run_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)},
              "ray": {"num_cpus": 2},
              "training": {"epochs": 2, "effective_batch_size": 4, "micro_batch_size": 2, **training}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_rows(path: Path, shared_data: Path) -> list[dict]:
    rows = [json.loads(line) for line in (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:ROWS]]
    rows.append({**rows[0], "instruction": "Repeat this answer.", "output": " ".join([rows[0]["output"]] * 30)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


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
