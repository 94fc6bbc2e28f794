"""`tapir run` on the local default's path, the one `make demo` takes: the teacher and judge are a `vllm serve` of
the bundled model that the run starts as its child with a random key, on a tiny config (one round, 12 rows) with
configs/local.yaml's choices: IFD difficulty, the judge calibrated first, the classifier on the sample pool's
categories, the pool's reference answers trained on, and the held-out reference loss measured at the end.

The key is read from the server's own environment while the run goes; the Ray workers that call the teacher must
have it in theirs (the only way it reaches them), and afterwards it must be in no file of the run directory, no
Ray session log and nothing the command printed, and no teacher, engine or Ray process of the run may be left.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import assert_no_file_holds
from processes import left_behind, with_environment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY_ENV = "TAPIR_TEST_LOCAL_TEACHER_KEY"        # never set here: the run draws a random key
MARKER_ENV = "TAPIR_TEST_LOCAL_RUN"
ROWS = 12
HELD_OUT, OVERLAPPING = 6, 2


def write_config(tmp_path: Path, pool: Path, heldout: Path, cache_dir: Path) -> Path:
    config = {
        "pool": {"source": str(pool), "rows_per_shard": 16},
        "storage": {"run_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)},
        "ray": {"num_cpus": 2},
        "student": {"batch_size": ROWS, "sampling": {"max_tokens": 8}},
        "teacher": {"kind": "local", "api_key_env": KEY_ENV, "local": {"engine": {"max_model_len": 1024}}},
        "classifier": {"labels_path": "bundled:sample", "train": {"epochs": 1}},
        "judge_calibration": {"enabled": True, "rows": 2},
        "curriculum": {"rounds": 1, "rows_per_round": 6, "expansion_per_round": 2, "difficulty": "ifd"},
        "scoring": {"batch_size": ROWS},
        "expansion": {"max_tokens": 48},
        "respond": {"max_tokens": 24, "pool_answers": "reference"},
        "training": {"epochs": 1, "effective_batch_size": 4, "micro_batch_size": 4, "max_len": 192,
                     "eval_fraction": 0.0},
        "eval": {"held_out_path": str(heldout)},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def environment_of(process: psutil.Process) -> dict:
    try:
        return process.environ()
    except psutil.Error:
        return {}


@pytest.mark.timeout(1200)
def test_a_run_with_the_local_teacher_finishes_and_leaves_no_key_and_no_process_behind(
        tmp_path, shared_data, prepared_student):
    alpaca = (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()
    pool, heldout = tmp_path / "pool.jsonl", tmp_path / "heldout.jsonl"
    pool.write_text("\n".join(alpaca[:ROWS]) + "\n")
    # the held-out file's first rows are pool rows: they are dropped and counted, never measured
    heldout.write_text("\n".join(alpaca[ROWS - OVERLAPPING:ROWS + HELD_OUT]) + "\n")
    config = write_config(tmp_path, pool, heldout, prepared_student.parent.parent)
    marker = uuid.uuid4().hex
    ray_temp = Path(tempfile.mkdtemp(prefix="tapir-ray-"))      # short: Ray's socket paths live in it
    env = {**{k: v for k, v in os.environ.items() if k != KEY_ENV}, MARKER_ENV: marker, "RAY_TMPDIR": str(ray_temp)}
    output = tmp_path / "run.log"
    with open(output, "w") as out:
        run = subprocess.Popen([TAPIR, "run", str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    # While it runs: the key `vllm serve` was given, and the Ray workers that hold it in their environment.
    key, workers_with_key, command_lines = None, set(), set()
    deadline = time.monotonic() + 1100
    while run.poll() is None and time.monotonic() < deadline:
        for process in with_environment(MARKER_ENV, marker):
            environment = environment_of(process)
            try:
                command_line = " ".join(process.cmdline())
            except psutil.Error:
                continue
            command_lines.add(command_line)
            if key is None and "vllm.entrypoints.openai.api_server" in command_line:
                key = environment.get("VLLM_API_KEY")
            if key and command_line.startswith("ray::") and environment.get(KEY_ENV) == key:
                workers_with_key.add(command_line.split()[0])
        time.sleep(1.0)
    assert run.wait(timeout=max(1, deadline - time.monotonic())) == 0, output.read_text()[-5000:]
    printed = output.read_text()
    logged = (tmp_path / "run" / "logs" / "run.log").read_text()     # all but what a person reads

    assert key, "no `vllm serve` child with a key was seen while the run went"
    assert "local teacher ready" in logged and "local teacher stopped" in logged
    assert "run finished: 1 round(s)" in printed and len(printed.splitlines()) <= 30, printed
    # the round's summary says how difficulty was measured and what the judge and the task labels are worth
    assert "IFD over" in printed and "judge calibration: discrimination" in printed, printed
    assert "task classifier: trained on" in printed and "labelled by bundled:sample" in printed, printed
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["status"] == "finished"
    assert state["rounds"]["0"]["finished"] == ["score", "plan", "expand", "respond", "train_set", "train"]
    scored = json.loads((tmp_path / "run" / "round_0" / "score" / "_manifest.json").read_text())
    assert scored["complete"] and scored["rows_out"] == ROWS
    trained = json.loads((tmp_path / "run" / "round_0" / "sft" / "_manifest.json").read_text())
    # no smoke generation: the held-out check loads the trained student in vLLM right after
    assert trained["complete"] and "held-out" in trained["smoke_skipped_because"], trained
    # the planned pool rows trained on their reference answers; only new rows went to the teacher
    respond = json.loads((tmp_path / "run" / "round_0" / "respond" / "_manifest.json").read_text())
    assert respond["reference_answers_kept"] > 0 and "reference" in respond["styles"], respond
    # the held-out check: both students on the same rows, the overlapping ones dropped and said so
    heldout = state["heldout_loss"]
    assert heldout["rows"] == HELD_OUT and heldout["rows_overlapping_pool"] == OVERLAPPING, heldout
    assert [m["name"] for m in heldout["models"]] == ["start", "round_0"]
    assert all(m["rows_scored"] == HELD_OUT for m in heldout["models"]) and heldout["rows_paired"] == HELD_OUT
    assert heldout["difference"] == pytest.approx(
        heldout["models"][1]["reference_loss"] - heldout["models"][0]["reference_loss"], abs=1e-6)
    assert f"held-out reference loss: {HELD_OUT} rows" in printed and "difference (paired)" in printed, printed

    # the key reached the teacher's callers through their environment, and never a command line
    assert any("SeedExpander" in name or "StyledAnswer" in name for name in workers_with_key), workers_with_key
    assert not [line for line in command_lines if key in line]
    # ... and nothing that stays
    assert key not in printed
    assert_no_file_holds(tmp_path / "run", key)
    assert any(ray_temp.rglob("*.log")), "the run's Ray session logs were not where the test looked"
    assert_no_file_holds(ray_temp, key)

    assert left_behind(MARKER_ENV, marker) == []
