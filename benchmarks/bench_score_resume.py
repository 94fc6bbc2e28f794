"""kill -9 at random moments of `tapir score`, resumed each time, against an uninterrupted run of the same pool.

The paid API is the loopback server that behaves like one (latency, usage); it counts every prompt it
answered, so a paid call sent twice is seen. The student is the real vLLM engine. Five kills, each at a
random moment 8-60 s after the previous event: three of the driver (the command is started again) and two
of a worker (a student engine actor, a judge actor: Ray restarts it and the job goes on); a worker kill
waits for its actor to be running.

Reported: whether the final row set equals the uninterrupted run's (ids, each once, same statuses), and how
many paid calls were repeated in all, against the bound of the batches in flight.

    .venv/bin/python benchmarks/bench_score_resume.py --pool ../shared/data/alpaca_dev_4000.jsonl --rows 1200
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import yaml

from pipeline import classification
from pipeline.config import load_config
from pipeline.llm.emulated_api import EmulatedAPI

TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY_ENV = "TAPIR_BENCH_KEY"
EVENTS = ("driver", "worker:StudentGenerator", "driver", "worker:PairJudge", "driver")


def write_config(path: Path, run: Path, pool: Path, api: EmulatedAPI, batch: int) -> Path:
    endpoint = {"kind": "remote", "base_url": api.base_url, "model": "paid-teacher", "api_key_env": KEY_ENV,
                "price": {"input_per_million_usd": 1.0, "output_per_million_usd": 4.0}}
    path.write_text(yaml.safe_dump({
        "pool": {"source": str(pool), "rows_per_shard": 200}, "storage": {"run_dir": str(run)},
        "ray": {"num_cpus": 4}, "student": {"batch_size": batch, "sampling": {"max_tokens": 32}},
        "teacher": endpoint, "classifier": {"label_sample_size": 200, "train": {"epochs": 2}},
        "curriculum": {"keep_reference_outputs": False}, "scoring": {"batch_size": batch}}))
    return path


def worker_pids(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"MapBatches({name})" in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def start(config: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([TAPIR, "score", str(config)], stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)


def scored(run: Path) -> dict:
    table = pads.dataset(run / "round_0" / "score", format="parquet").to_table(columns=["id", "status"])
    ids = table.column("id").to_pylist()
    return {"ids": ids, "status": dict(zip(ids, table.column("status").to_pylist()))}


def repeated(calls: Counter) -> int:
    return sum(n - 1 for n in calls.values() if n > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tapir-bench-resume-"))
    pool = work / "pool.jsonl"
    pool.write_text("\n".join(args.pool.read_text().splitlines()[:args.rows]) + "\n")
    reference_api, killed_api = (EmulatedAPI(latency_s=0.3, latency_jitter_s=0.2) for _ in range(2))
    with reference_api.serving_in_thread(), killed_api.serving_in_thread():
        reference_cfg = write_config(work / "reference.yaml", work / "reference", pool, reference_api, args.batch)
        killed_cfg = write_config(work / "killed.yaml", work / "killed", pool, killed_api, args.batch)
        # one classifier for both runs, trained before anything is timed or killed
        os.environ[KEY_ENV] = reference_api.api_key
        classification.label(load_config(reference_cfg), progress=False)
        classification.train(load_config(reference_cfg))
        (work / "killed").mkdir()
        shutil.copytree(work / "reference" / "classifier", work / "killed" / "classifier")
        shutil.copytree(work / "reference" / "pool", work / "killed" / "pool")
        labelling_calls = Counter(reference_api.stats.answered_prompts)

        started = time.perf_counter()
        subprocess.run([TAPIR, "score", str(reference_cfg)], check=True, capture_output=True,
                       env={**os.environ, KEY_ENV: reference_api.api_key})
        reference_s = time.perf_counter() - started
        reference_calls = Counter(reference_api.stats.answered_prompts) - labelling_calls

        env = {**os.environ, KEY_ENV: killed_api.api_key}
        log = work / "killed.log"
        events, runs = [], 1
        process = start(killed_cfg, env, log)
        for event in EVENTS:
            delay = rng.uniform(8, 60)
            time.sleep(delay)
            if process.poll() is not None:
                events.append({"event": event, "after_s": round(delay, 1), "done": "run had finished"})
                break
            written = len(list((work / "killed" / "round_0" / "score").glob("*.parquet")))
            if event == "driver":
                process.send_signal(signal.SIGKILL)
                process.wait()
                time.sleep(3)
                process, runs = start(killed_cfg, env, log), runs + 1
                done = "driver killed, command started again"
            else:
                # a worker kill waits (up to 60 s) for its actor to exist, so that every such event lands
                deadline = time.monotonic() + 60
                while not (pids := worker_pids(event.split(":")[1])) and time.monotonic() < deadline \
                        and process.poll() is None:
                    time.sleep(0.5)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                done = f"killed {len(pids)} worker process(es); the job goes on"
            events.append({"event": event, "after_s": round(delay, 1), "files_written_before": written, "done": done})
        process.wait()
        while process.returncode != 0 and runs < 10:          # a run killed at its very end may need one more
            process, runs = start(killed_cfg, env, log), runs + 1
            process.wait()
        killed_calls = Counter(killed_api.stats.answered_prompts)

    reference, resumed = scored(work / "reference"), scored(work / "killed")
    manifest = json.loads((work / "killed" / "round_0" / "score" / "_manifest.json").read_text())
    in_flight_bound = 2 * 4 * args.batch * 3     # 2 endpoint stages x 4 batches in flight x rows x (1 + 2) calls
    print(json.dumps({
        "rows": args.rows, "reference_wall_s": round(reference_s, 1), "events": events, "invocations": runs,
        "same_row_set": sorted(reference["ids"]) == sorted(resumed["ids"]),
        "each_row_once": len(resumed["ids"]) == len(set(resumed["ids"])) == args.rows,
        "same_statuses": reference["status"] == resumed["status"],
        "manifest_complete": manifest["complete"],
        "paid_calls": {"reference": sum(reference_calls.values()), "killed_series": sum(killed_calls.values()),
                       "repeated": repeated(killed_calls), "repeated_in_reference": repeated(reference_calls),
                       "driver_kills": sum(e["event"] == "driver" for e in events),
                       "bound_per_driver_kill_batches_in_flight": in_flight_bound},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "work": str(work)}, indent=2))


if __name__ == "__main__":
    main()
