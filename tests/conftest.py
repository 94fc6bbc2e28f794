"""Shared fixtures: the real data beside the repo, and one prepared copy of the bundled student."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "alpaca_dev_4000.jsonl").exists():
        raise RuntimeError(f"{SHARED_DATA}: the shared data the tests use is missing (../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def prepared_student(model_cache) -> Path:
    from pipeline.models import prepare_bundled_student

    return prepare_bundled_student(model_cache)


def kill_when(process, ready, timeout_s: float, output) -> None:
    """SIGKILLs `process` as soon as `ready()` holds; fails if the process ended first (nothing was
    interrupted, so a resume test would prove nothing). `output`: the stream its error output is read from."""
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert process.poll() is None, f"the first run ended before it could be killed:\n{output.read()[-3000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()


def run_and_run_again(command: list, api, env: dict, cwd: Path, timeout_s: float) -> str:
    """Runs a finished-once command (an evaluation) twice against the loopback `api`: the first must succeed,
    the second must say it already finished and send no call. Returns the first run's output."""
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    calls = sum(api.stats.answered_prompts.values())
    again = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert sum(api.stats.answered_prompts.values()) == calls        # nothing sent twice
    print(done.stdout)
    return done.stdout


def assert_no_file_holds(directory: Path, secret: str) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
