"""kill -9 during each stage of round 1 of `tapir run`, then the same command again: does the run finish with the
same rows as an uninterrupted one, and how many paid calls were sent twice?

Round 0 is run once and copied into every trial, so each trial differs from the uninterrupted baseline only by
its kill. The teacher and judge are the loopback API (deterministic answers from the prompt); the student is
the real vLLM engine, greedy. Compared with the baseline: round 1's plan, the kept new rows, the training set
(id, output, copies) and whether every stage finished once.

    .venv/bin/python benchmarks/bench_run_resume.py --out benchmarks/results/run_resume.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_run import KEY_ENV, teacher_reply, write_config  # noqa: E402  (the test's config and teacher)

from pipeline.llm.emulated_api import EmulatedAPI  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
ROWS = 32


def ready_in(stage: str, run: Path):
    """When to kill: round 1 is in `stage` and, where the stage writes as it goes, has written something."""
    written = {"score": run / "round_1" / "score", "expand": run / "round_1" / "expand" / "generated",
               "respond": run / "round_1" / "respond" / "answers",
               "train": run / "round_1" / "checkpoint" / "train" / "ray_train"}

    def ready() -> bool:
        try:
            state = json.loads((run / "state.json").read_text())
        except (OSError, ValueError):
            return False
        if state.get("round") != 1 or state.get("stage") != stage:
            return False
        where = written.get(stage)
        return where is None or any(p.name.endswith(".parquet") or p.name.startswith("checkpoint")
                                    for p in where.rglob("*"))
    return ready


def round_1_rows(run: Path) -> dict:
    def rows(path, columns):
        return sorted(tuple(r[c] for c in columns) for r in pq.read_table(path).to_pylist())

    return {"plan": rows(run / "round_1" / "plan" / "plan.parquet", ["id", "copies", "difficulty"]),
            "new_rows": rows(run / "round_1" / "expand" / "new_rows.parquet", ["request_id", "status", "instruction"]),
            "train": rows(run / "round_1" / "train" / "part-0.parquet", ["id", "output", "origin"])}


def tapir_run(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([TAPIR, "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO, env=env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/tapir-bench-run-resume")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "run_resume.json"))
    parser.add_argument("--stages", default="score,plan,expand,respond,train_set,train")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pool = work / "pool.jsonl"
    pool.write_text("\n".join((REPO.parent / "shared" / "data" / "alpaca_dev_4000.jsonl").read_text()
                              .splitlines()[:ROWS]) + "\n")
    api = EmulatedAPI(reply=teacher_reply)
    overrides = {"student": {"batch_size": 8, "sampling": {"max_tokens": 16, "temperature": 0.0}}}
    results = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "pool_rows": ROWS, "trials": []}
    with api.serving_in_thread():
        env = {**os.environ, KEY_ENV: api.api_key}

        def config_in(directory: Path, rounds: int) -> Path:
            directory.mkdir(parents=True, exist_ok=True)
            path = write_config(directory, pool, api, Path.home() / ".cache" / "tapir", **overrides)
            config = yaml.safe_load(path.read_text())
            config["curriculum"]["rounds"] = rounds
            config["training"]["checkpoint_every_steps"] = 2
            path.write_text(yaml.safe_dump(config))
            return path

        started = time.perf_counter()
        round_0 = work / "round0"
        assert tapir_run(config_in(round_0, 1), env).wait() == 0, "round 0 failed"
        results["round_0_s"] = round(time.perf_counter() - started, 1)

        def trial(name: str, kill_stage: str | None) -> dict:
            directory = work / name
            shutil.copytree(round_0 / "run", directory / "run")
            config = config_in(directory, 2)
            before = Counter(api.stats.answered_prompts)
            started = time.perf_counter()
            process = tapir_run(config, env)
            landed = None
            if kill_stage:
                ready = ready_in(kill_stage, directory / "run")
                while process.poll() is None and not ready():
                    time.sleep(0.2)
                landed = process.poll() is None
                if landed:
                    process.send_signal(signal.SIGKILL)
                process.wait()
                process = tapir_run(config, env)
            code = process.wait()
            calls = Counter(api.stats.answered_prompts) - before
            state = json.loads((directory / "run" / "state.json").read_text())
            return {"trial": name, "killed_in": kill_stage, "kill_landed": landed, "exit_code": code,
                    "status": state["status"], "wall_s": round(time.perf_counter() - started, 1),
                    "paid_calls": sum(calls.values()), "repeated_calls": sum(n - 1 for n in calls.values() if n > 1),
                    "rows": round_1_rows(directory / "run") if code == 0 else None}

        baseline = trial("baseline", None)
        results["trials"].append({k: v for k, v in baseline.items() if k != "rows"})
        print(json.dumps(results["trials"][-1]), flush=True)
        for stage in args.stages.split(","):
            outcome = trial(f"kill_{stage}", stage)
            outcome["same_rows_as_baseline"] = {part: outcome["rows"] is not None and outcome["rows"][part] == rows
                                                for part, rows in baseline["rows"].items()}
            results["trials"].append({k: v for k, v in outcome.items() if k != "rows"})
            print(json.dumps(results["trials"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
