"""`tapir submit` / `status` / `logs` without a cluster: what a job carries, what status says, clear refusals.
The real submission to a two-node cluster is tests/test_cluster_run.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobDetails, JobStatus, JobType

from pipeline import submission
from pipeline.config import load_config
from pipeline.submission import SubmitError

TAPIR = str(Path(sys.executable).with_name("tapir"))


def write_config(directory: Path, **judge) -> Path:
    config = {"storage": {"run_dir": "s3://bucket/runs/r1"},
              "teacher": {"kind": "remote", "base_url": "https://api.example.com/v1", "model": "big",
                          "api_key_env": "TEACHER_KEY"}}
    if judge:
        config["judge"] = {"kind": "remote", "base_url": "https://judge.example.com/v1", "model": "j", **judge}
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_job_names_the_key_variables_and_carries_no_value(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-teacher-value")
    monkeypatch.setenv("JUDGE_KEY", "sk-judge-value")
    path = write_config(tmp_path, api_key_env="JUDGE_KEY")
    request = submission.job_request(load_config(path), path)

    assert request.entrypoint == "python -m pipeline.cli run cluster.yaml"
    assert request.runtime_env["working_dir"] == str(tmp_path)
    assert request.metadata == {"tapir_config": "cluster.yaml", "tapir_run_dir": "s3://bucket/runs/r1",
                                "tapir_secret_env": "JUDGE_KEY,TEACHER_KEY"}
    assert "sk-" not in repr(request)
    # the package travels with the job: the nodes need only its dependencies
    modules = [Path(p) for p in request.runtime_env["py_modules"]]
    assert (modules[0] / "cli.py").exists() and (modules[1] / "sft.py").exists()
    assert ".venv" in request.runtime_env["excludes"] and "runs" in request.runtime_env["excludes"]
    assert submission.job_request(load_config(path), path).submission_id != request.submission_id


def test_a_local_teacher_needs_no_key_and_a_config_outside_the_working_dir_is_refused(tmp_path):
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump({"storage": {"run_dir": "runs/x"}}))
    inside = tmp_path / "project"
    inside.mkdir()
    assert submission.job_request(load_config(path), path).metadata["tapir_secret_env"] == ""
    with pytest.raises(SubmitError, match="outside the working dir .*--working-dir"):
        submission.job_request(load_config(path), path, working_dir=inside)
    nested = inside / "configs" / "run.yaml"
    nested.parent.mkdir()
    nested.write_text(path.read_text())
    assert submission.job_request(load_config(nested), nested, inside).entrypoint.endswith("run configs/run.yaml")


def test_status_says_state_times_run_dir_keys_and_the_error():
    failed = JobDetails(type=JobType.SUBMISSION, status=JobStatus.FAILED, entrypoint="python -m pipeline.cli run c",
                        message="Job entrypoint command failed with exit code 2\nmore", start_time=1_700_000_000_000,
                        end_time=1_700_000_090_000, driver_exit_code=2,
                        metadata={"tapir_config": "c.yaml", "tapir_run_dir": "s3://b/r", "tapir_secret_env": "K"})
    text = submission.describe("tapir-c-1", failed)
    assert text.splitlines()[0] == "job tapir-c-1: FAILED"
    assert "(90 s)" in text and "run directory: s3://b/r (config c.yaml)" in text
    assert "keys read on the cluster from: K" in text and "exit code: 2" in text
    assert "message: Job entrypoint command failed with exit code 2" in text and "more" not in text
    done = JobDetails(type=JobType.SUBMISSION, status=JobStatus.SUCCEEDED, entrypoint="x", message="ok")
    assert "message" not in submission.describe("j", done)


def test_no_job_server_at_the_address_is_a_clear_error(tmp_path):
    path = write_config(tmp_path)
    done = subprocess.run([TAPIR, "submit", str(path), "--address", "http://127.0.0.1:9", "--no-wait"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tapir: error: no Ray job server answers at http://127.0.0.1:9" in done.stderr, done.stderr[-2000:]
    status = subprocess.run([TAPIR, "status", "some-job", "--address", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 2 and "no Ray job server answers" in status.stderr
