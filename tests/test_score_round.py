"""`tapir score` end to end: real vLLM student, real classifier, the paid API played by a loopback server.

The driver is killed with SIGKILL in the middle of the job and the same command run again: every pool row
must come out exactly once, and paid calls whose answers were written must not be sent again.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml
from conftest import kill_when

from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.llm.judge import request_text

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY_ENV = "TAPIR_TEST_SCORE_KEY"
ROWS = 32          # four batches: the kill comes after two are written, two are still to do
BATCH = 8


def write_config(tmp_path: Path, pool: Path, api: EmulatedAPI, cache_dir: Path, label_rows: int = ROWS) -> Path:
    endpoint = {"kind": "remote", "base_url": api.base_url, "model": "paid-teacher", "api_key_env": KEY_ENV,
                "price": {"input_per_million_usd": 1.0, "output_per_million_usd": 4.0}}
    config = {
        "pool": {"source": str(pool), "rows_per_shard": 16},
        "storage": {"run_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)},
        "ray": {"num_cpus": 2},
        "student": {"batch_size": BATCH, "sampling": {"max_tokens": 16}},
        "teacher": endpoint,
        "classifier": {"label_sample_size": label_rows, "train": {"epochs": 1}},
        "curriculum": {"keep_reference_outputs": False},      # every row costs a teacher call and two judge calls
        "scoring": {"batch_size": BATCH, "batches_in_flight_per_actor": 1},
    }
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_score(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([TAPIR, "score", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)


def written_files(run: Path) -> list[Path]:
    return sorted((run / "round_0" / "score").glob("*.parquet"))


def test_a_killed_scoring_round_resumes_with_every_row_once_and_no_answered_call_repeated(
        tmp_path, shared_data, prepared_student):
    pool = tmp_path / "pool.jsonl"
    lines = (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:ROWS]
    pool.write_text("\n".join(lines) + "\n")
    api = EmulatedAPI(latency_s=0.3, latency_jitter_s=0.2)
    with api.serving_in_thread():
        config = write_config(tmp_path, pool, api, prepared_student.parent.parent)
        env = {**os.environ, KEY_ENV: api.api_key}
        run = tmp_path / "run"

        killed = start_score(config, env)
        kill_when(killed, lambda: len(written_files(run)) >= 2, 480, killed.stderr)
        ids_before_resume = {i for f in written_files(run) for i in pads.dataset(f).to_table(columns=["id"])
                             .column("id").to_pylist()}

        resumed = subprocess.run([TAPIR, "score", str(config)], capture_output=True, text=True, cwd=REPO, env=env,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        calls = Counter(api.stats.answered_prompts)

        again = subprocess.run([TAPIR, "score", str(config)], capture_output=True, text=True, cwd=REPO, env=env,
                               timeout=300)
        assert again.returncode == 0 and "already finished" in again.stdout
        assert Counter(api.stats.answered_prompts) == calls                  # a finished round sends nothing

    scored = pads.dataset(run / "round_0" / "score", format="parquet").to_table()
    ids = scored.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == ROWS                                     # every row, exactly once
    rows = scored.to_pylist()
    assert all(r["status"] == "ok" for r in rows), Counter(r["status"] for r in rows)
    assert all(r["mfd"] == pytest.approx(r["teacher_score"] - r["student_score"]) for r in rows)
    assert all(r["student_response"] is not None and r["teacher_source"] == "teacher" for r in rows)
    assert all(r["task"] for r in rows)

    # A teacher prompt is one row's request; a judge prompt one row and one order: a prompt answered twice
    # is a paid call repeated. Rows written before the kill must never be asked about again.
    repeated = sum(n - 1 for n in calls.values() if n > 1)
    assert ids_before_resume, "the kill came before anything was written: the test proves nothing"
    for row in rows:
        if row["id"] in ids_before_resume:
            assert calls[_teacher_prompt(row)] == 1
    # what was in flight at the kill: one batch per endpoint actor (teacher: 1 call a row, judge: 2), plus
    # the judged rows waiting for their write
    assert repeated <= 3 * BATCH * 3, repeated

    manifest = json.loads((run / "round_0" / "score" / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_in"] == manifest["rows_out"] == ROWS
    assert manifest["duplicate_rows"] == 0 and manifest["failed"] == {}
    assert manifest["tokens"]["judge"]["prompt"] > 0 and manifest["cost_usd"]["total"] > 0
    assert api.api_key not in (run / "round_0" / "score" / "_manifest.json").read_text()
    assert f"round 0 scored: {ROWS} of {ROWS} rows" in resumed.stdout
    assert not any((run / "round_0" / "checkpoint" / "score").iterdir())       # cleaned once the manifest is in


def _teacher_prompt(row: dict) -> str:
    """The key the loopback API counts a teacher request under: its messages, as the stage sends them."""
    return json.dumps([{"role": "user", "content": request_text(row["instruction"], row["input"] or "")}],
                      sort_keys=True)


JUDGE_PROMPT_START = "You are a strict and fair judge"   # pipeline/prompts/judge_pairwise.txt


def judge_requests(calls: Counter) -> int:
    return sum(n for key, n in calls.items() if JUDGE_PROMPT_START in key)


def test_hybrid_scoring_pays_the_judge_only_for_the_band_and_its_ifd_job_neither_generates_nor_judges(
        tmp_path, shared_data, prepared_student):
    """One hybrid run: its first job is exactly what `ifd` runs (the answer-loss stage on the reference answers),
    its second the student and the judge over the band."""
    from pipeline.config import load_config
    from pipeline.difficulty import band_ids

    rows = 16
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join((shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:rows]) + "\n")
    api = EmulatedAPI()
    with api.serving_in_thread():
        path = write_config(tmp_path, pool, api, prepared_student.parent.parent, rows)
        config = yaml.safe_load(path.read_text())
        config["curriculum"] = {"difficulty": "hybrid", "hybrid_band": 0.25, "keep_reference_outputs": True}
        path.write_text(yaml.safe_dump(config))
        labelling = Counter(api.stats.answered_prompts)
        done = subprocess.run([TAPIR, "score", str(path)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, KEY_ENV: api.api_key}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        calls = Counter(api.stats.answered_prompts) - labelling
    config = load_config(path)
    run = tmp_path / "run" / "round_0"

    scored = pads.dataset(run / "score", format="parquet").to_table()
    assert "student_response" not in scored.column_names and "mfd" not in scored.column_names
    assert set(scored.column("answer_status").to_pylist()) == {"ok"} and scored.column("ifd").null_count == 0
    verdicts = pads.dataset(run / "difficulty", format="parquet").to_table().to_pylist()
    valid = [v for v in verdicts if v["status"] == "ok"]
    misaligned = [v for v in verdicts if v["status"] == "ifd_misaligned"]
    assert len(valid) + len(misaligned) == rows and all(v["difficulty_score"] > 1 for v in misaligned)

    band = band_ids(config, scored)
    judged = pads.dataset(run / "judge_band", format="parquet").to_table()
    assert sorted(judged.column("id").to_pylist()) == band and len(band) == round(0.25 * len(valid) / 2) * 2
    assert judge_requests(calls) == 2 * len(band)                  # both orders, for the band's rows only
    assert all(judged.column("student_response").to_pylist())      # the student answered the band's rows only
    # outside the band, the top half of the valid rows by IFD is hard (ifd_hard_share 0.5)
    by_ifd = sorted((v["difficulty_score"], v["id"]) for v in valid)
    boundary = len(valid) - round(0.5 * len(valid))
    assert all(v["hard"] == (by_ifd.index((v["difficulty_score"], v["id"])) >= boundary) for v in valid
               if v["id"] not in band)
    manifest = json.loads((run / "score" / "_manifest.json").read_text())
    assert manifest["judge_requests_per_row"] == round(2 * len(band) / rows, 3) <= 0.6
    assert manifest["decided_by_judge"] == sum(v["difficulty_source"] == "judge" for v in valid) <= len(band)
    assert manifest["difficulty"]["measure"] == "ifd" and manifest["complete"]
    assert "difficulty by hybrid: hard" in done.stdout
