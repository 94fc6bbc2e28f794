"""Scoring by IFD against scoring by the judge (issue 18): time per 1000 rows, paid calls per row, IFD's spread.

Each mode scores round 0 of its own run directory with `scoring.score`, on the first rows of the pool (Alpaca's
reference outputs as the teacher's answers, as the local config keeps them), with the bundled student:

- `judge`: the student generates (sampling.max_tokens as configured, 512) and the judge rates both orders;
- `ifd`: the student's loss on the reference answer with and without the instruction, nothing generated;
- `hybrid`: `ifd`, then the student and the judge for the band around the IFD boundary only.

The teacher and judge are the loopback API (pipeline/llm/emulated_api.py, 0.3-0.5 s a reply, no rate limit), so
the times are the pipeline's own work on this machine (student engines, Ray Data); a real judge adds its latency,
and its calls are what the API counted, labelling excluded. The task classifier is trained once, before any mode
is timed, and copied into every run directory. IFD's distribution is read from the `ifd` run's verdicts.

    nice -n 19 .venv/bin/python benchmarks/bench_ifd.py --pool ../shared/data/alpaca_dev_4000.jsonl \\
        --ifd-rows 4000 --hybrid-rows 1000 --judge-rows 100
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads

from pipeline import classification, scoring
from pipeline.config import RunConfig
from pipeline.difficulty import difficulty_location
from pipeline.llm.emulated_api import EmulatedAPI

KEY_ENV = "TAPIR_BENCH_IFD_KEY"
JUDGE_PROMPT_START = "You are a strict and fair judge"        # pipeline/prompts/judge_pairwise.txt


def config_for(work: Path, pool: Path, api: EmulatedAPI, name: str, difficulty: str, label_rows: int) -> RunConfig:
    return RunConfig.model_validate({
        "pool": {"source": str(pool), "rows_per_shard": 500},
        "storage": {"run_dir": str(work / name / "run")},
        "student": {"batch_size": 32},
        "teacher": {"kind": "remote", "base_url": api.base_url, "model": "paid-teacher", "api_key_env": KEY_ENV},
        "classifier": {"label_sample_size": label_rows, "train": {"epochs": 1}},
        "curriculum": {"difficulty": difficulty},
    })


def first_rows(pool: Path, count: int, out: Path) -> Path:
    lines = pool.read_text().splitlines()[:count]
    out.write_text("\n".join(lines) + "\n")
    return out


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {f"p{q}": round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3)
            for q in (1, 5, 10, 25, 50, 75, 90, 95, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--ifd-rows", type=int, default=1000)
    parser.add_argument("--hybrid-rows", type=int, default=1000)
    parser.add_argument("--judge-rows", type=int, default=100, help="judge mode (and ifd on the same rows)")
    parser.add_argument("--label-rows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ifd.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tapir-bench-ifd-"))
    api = EmulatedAPI(latency_s=0.3, latency_jitter_s=0.2)
    os.environ[KEY_ENV] = api.api_key
    runs = {"ifd": args.ifd_rows, "hybrid": args.hybrid_rows, "judge": args.judge_rows,
            "ifd-same-rows-as-judge": args.judge_rows}
    results = {}
    with api.serving_in_thread():
        trained = config_for(work, first_rows(args.pool, max(runs.values()), work / "pool-classifier.jsonl"), api,
                             "classifier", "judge", args.label_rows)
        classification.label(trained, progress=False)
        classification.train(trained)
        for mode, rows in runs.items():
            config = config_for(work, first_rows(args.pool, rows, work / f"pool-{rows}.jsonl"), api, mode,
                                mode.split("-")[0], args.label_rows)
            shutil.copytree(work / "classifier" / "run" / "classifier", work / mode / "run" / "classifier")
            before = Counter(api.stats.answered_prompts)
            summary = scoring.score(config, 0, progress=False)
            calls = Counter(api.stats.answered_prompts) - before
            judge_calls = sum(n for key, n in calls.items() if JUDGE_PROMPT_START in key)
            results[mode] = {
                "rows": summary["rows_out"], "complete": summary["complete"], "failed": summary["failed"],
                "wall_s": summary["wall_s"], "job_s": summary["job_s"],
                "job_s_per_1000_rows": round(summary["job_s"] / summary["rows_out"] * 1000, 1),
                "paid_calls": sum(calls.values()), "judge_calls": judge_calls,
                "paid_calls_per_row": round(sum(calls.values()) / summary["rows_out"], 3),
                "hard_rows": summary["hard_rows"], "easy_rows": summary["easy_rows"],
                "decided_by_judge": summary["decided_by_judge"], "difficulty": summary["difficulty"],
                "stage_active_s": {s["stage"]: s["active_s"] for s in summary["stages"]},
            }
            if mode == "ifd":
                verdicts = pads.dataset(difficulty_location(config, 0).path, format="parquet").to_table().to_pylist()
                ifd = [row["difficulty_score"] for row in verdicts if row["difficulty_score"] is not None]
                results[mode]["ifd_all_rows"] = {"rows": len(ifd), **percentiles(ifd),
                                                 "above_1": sum(value > 1 for value in ifd)}
            print(mode, json.dumps(results[mode]), flush=True)
    report = {"command": "benchmarks/bench_ifd.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("pool", "out")),
        "pool": str(args.pool), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
