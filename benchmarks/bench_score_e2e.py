"""One scoring round end to end on a real pool with the local teacher: rows/min, where the time goes, and
whether the stages overlap (streaming): the sum of the stages' active spans against the job's wall time.

The task classifier is labelled and trained first (timed on its own), so the scoring round is what is
measured. The teacher keeps the pool's reference outputs (Alpaca has them), as the local config does.

    .venv/bin/python benchmarks/bench_score_e2e.py --pool ../shared/data/alpaca_dev_4000.jsonl --max-tokens 128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from pipeline import classification, scoring
from pipeline.config import RunConfig

_STAGES = ("MapBatches(TaskClassifier)", "MapBatches(StudentGenerator)", "MapBatches(TeacherAnswer)",
           "MapBatches(PairJudge)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=128, help="student answer length")
    parser.add_argument("--label-rows", type=int, default=500)
    parser.add_argument("--work", type=Path, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tapir-bench-score-"))
    config = RunConfig.model_validate({
        "pool": {"source": str(args.pool), "rows_per_shard": 500},
        "storage": {"run_dir": str(work / "run")},
        "ray": {"num_cpus": 4},
        "student": {"batch_size": 32, "sampling": {"max_tokens": args.max_tokens}},
        "classifier": {"label_sample_size": args.label_rows},
    })
    started = time.perf_counter()
    labelled = classification.label(config, progress=False)
    metrics = classification.train(config)
    classifier_s = time.perf_counter() - started
    summary = scoring.score(config, 0, progress=False)
    active = {s["stage"]: s["active_s"] for s in summary["stages"]}
    stage_sum = sum(active.get(name, 0.0) for name in _STAGES)
    result = {
        "rows": summary["rows_out"], "complete": summary["complete"], "failed": summary["failed"],
        "classifier": {"labelled": labelled.labelled, "held_out_accuracy": metrics["accuracy"],
                       "seconds": round(classifier_s, 1)},
        "score_wall_s": summary["wall_s"], "setup_s": summary["setup_s"], "job_s": summary["job_s"],
        "rows_per_min_job": round(summary["rows_out"] / summary["job_s"] * 60, 1),
        "rows_per_min_command": round(summary["rows_out"] / summary["wall_s"] * 60, 1),
        "stage_active_s": active,
        "sum_of_stage_spans_s": round(stage_sum, 1),
        "overlap_ratio_sum_over_job": round(stage_sum / summary["job_s"], 2),
        "tokens": summary["tokens"], "api_usage": summary["api_usage_this_run"],
        "hard_rows": summary["hard_rows"], "mfd_mean": summary["difficulty"].get("mean"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": {"student_max_tokens": args.max_tokens, "label_rows": args.label_rows},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
