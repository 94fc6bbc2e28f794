"""Two runs never share state through Ray: the limits actor (rate windows, spend, budget) is named by the run
directory's full URI, not by its last component; each run's Ray processes find their own cluster; two runs on
one machine both finish."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import RunConfig
from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.ray_runtime import limits_key

TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY_ENV = "TAPIR_TEST_ISOLATION_KEY"
ROWS = 12          # the classifier trains on at least 10 labelled rows


def config(run_dir: str) -> RunConfig:
    return RunConfig.model_validate({"storage": {"run_dir": run_dir}})


def test_runs_whose_directories_share_their_last_component_get_their_own_limits_actor(tmp_path, monkeypatch):
    first, second = limits_key(config(str(tmp_path / "a" / "local"))), limits_key(config(str(tmp_path / "b" / "local")))
    assert first != second and first.startswith("local-") and second.startswith("local-")
    assert limits_key(config("s3://bucket-1/runs/local")) != limits_key(config("s3://bucket-2/runs/local"))
    assert limits_key(config("s3://bucket-1/runs/local/")) == limits_key(config("s3://bucket-1/runs/local"))
    # the same directory, however it is written, is the same run
    monkeypatch.chdir(tmp_path)
    assert limits_key(config(os.path.join("a", "local"))) == first


# A run's own Ray started beside another: a task asks Ray's own "which cluster am I in" with no address, as
# Ray Train's placement-group cleaner does.
OWN_CLUSTER_SCRIPT = """
import ray, ray._private.services
from pipeline.config import RayConfig
from pipeline.ray_runtime import init_ray
init_ray(RayConfig(num_cpus=1))
found = ray.get(ray.remote(num_cpus=0)(lambda: ray._private.services.canonicalize_bootstrap_address_or_die(None)).remote())
print("OWN" if found == ray.get_runtime_context().gcs_address else f"OTHER {found}")
"""
OTHER_RAY_SCRIPT = ("import ray, sys; ray.init(num_cpus=1, include_dashboard=False); "
                    "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")


def test_a_runs_ray_processes_find_their_own_cluster_beside_another_ray_instance():
    """Beside another Ray instance, Ray Train's cleaner failed with "Found multiple active Ray instances"; and
    a local run joined the cluster a `ray start` had left in Ray's address file, which refused its num_cpus."""
    temp = tempfile.mkdtemp(prefix="tapir-ray-")        # short: Ray's socket paths live in it
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": temp}
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY_SCRIPT], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        other_address = other.stdout.readline().strip()
        assert other_address
        # what `ray start` leaves: the address a Ray started with no address joins
        Path(temp, "ray").mkdir(exist_ok=True)
        Path(temp, "ray", "ray_current_cluster").write_text(other_address)
        own = subprocess.run([sys.executable, "-c", OWN_CLUSTER_SCRIPT], capture_output=True, text=True,
                             timeout=300, env=env)
        assert own.stdout.strip().splitlines()[-1:] == ["OWN"], own.stdout + own.stderr[-3000:]
    finally:
        other.stdin.close()
        other.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_two_runs_on_one_machine_at_once_both_finish_each_under_its_own_budget(tmp_path, shared_data,
                                                                               prepared_student):
    """Two runs whose directories share their last component (a/run, b/run) shared one limits actor and one
    budget, and the second died with the first."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join((shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:ROWS]) + "\n")
    api = EmulatedAPI(latency_s=0.05)
    with api.serving_in_thread():
        commands = []
        for name in ("a", "b"):
            config = {"pool": {"source": str(pool)},
                      "storage": {"run_dir": str(tmp_path / name / "run"),
                                  "cache_dir": str(prepared_student.parent.parent)},
                      "ray": {"num_cpus": 2}, "student": {"batch_size": ROWS, "sampling": {"max_tokens": 8}},
                      "teacher": {"kind": "remote", "base_url": api.base_url, "model": "paid-teacher",
                                  "api_key_env": KEY_ENV,
                                  "price": {"input_per_million_usd": 1.0, "output_per_million_usd": 4.0}},
                      "classifier": {"label_sample_size": ROWS, "train": {"epochs": 1}},
                      "curriculum": {"keep_reference_outputs": False},
                      "scoring": {"batch_size": ROWS}}
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            commands.append(subprocess.Popen([TAPIR, "score", str(path)], stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True,
                                             env={**os.environ, KEY_ENV: api.api_key, "RAY_ADDRESS": ""}))
        outputs = [command.communicate(timeout=600) for command in commands]
    for command, (_, stderr) in zip(commands, outputs):
        assert command.returncode == 0, stderr[-3000:]
    spent = []
    for name in ("a", "b"):
        manifest = json.loads((tmp_path / name / "run" / "round_0" / "score" / "_manifest.json").read_text())
        assert manifest["complete"] and manifest["rows_out"] == ROWS
        spent.append(json.loads((tmp_path / name / "run" / "spend.json").read_text())["spent_usd"])
    # each run counted what it paid for and nothing of the other's
    assert spent[0] > 0 and spent[1] > 0 and sum(spent) == pytest.approx(api.stats.billed_usd(1.0, 4.0))
