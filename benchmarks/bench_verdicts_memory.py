"""The score step's last part on the driver: the round's difficulty verdicts and its summary from N scored rows.

After its streaming job, `tapir score` reads a few small columns of every scored row back into the driver, writes
round_R/difficulty/ and sums the round's summary. This measures that part alone, in a fresh process per measure
and size, on generated scored rows (the columns the judge stage or the answer-loss stage leaves): its wall time
and the process's peak RSS above what it held before (the scored table itself included).

    .venv/bin/python benchmarks/bench_verdicts_memory.py --rows 1000000 [--measures judge ifd]

Run it on two checkouts to compare designs; memory, unlike time, barely varies between runs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scored_rows(rows: int, measure: str) -> pa.Table:
    """`rows` rows as the score job writes them; 2% failed, ids as the pool's (40 hex characters)."""
    rng = np.random.default_rng(0)
    ids = pa.array([f"{k:040x}" for k in range(rows)])
    failed = rng.random(rows) < 0.02
    usage = {name: pa.array(rng.integers(10, 500, rows)) for name in
             ("teacher_prompt_tokens", "teacher_completion_tokens", "student_tokens", "judge_prompt_tokens",
              "judge_completion_tokens")}
    if measure == "judge":
        return pa.table({"id": ids, "status": pa.array(np.where(failed, "judge_unparsed", "ok")),
                         "error": pa.array([("no verdict" if f else None) for f in failed], pa.string()),
                         "mfd": pa.array(np.where(failed, np.nan, rng.uniform(-3, 5, rows))), **usage})
    return pa.table({"id": ids, "teacher_status": pa.array(["ok"] * rows),
                     "teacher_error": pa.nulls(rows, pa.string()),
                     "answer_status": pa.array(np.where(failed, "too_long", "ok")),
                     "answer_error": pa.array([("over max_len" if f else None) for f in failed], pa.string()),
                     "ifd": pa.array(rng.uniform(0.2, 1.1, rows)), **usage})


def measure_once(path: Path, measure: str) -> dict:
    """In a process that has read the scored rows from Parquet (as the score step does), so its high-water mark
    before the measured part is the table's, not the generator's."""
    from pipeline.config import RunConfig
    from pipeline.difficulty import verdicts
    from pipeline.scoring import summarise, summary_rows

    config = RunConfig.model_validate({"curriculum": {"difficulty": measure}})
    scored = pq.read_table(path)
    rows = scored.num_rows
    judged = scored if measure == "judge" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    verdict = verdicts(config, scored, judged)
    summary = summarise(config, 0, rows, summary_rows(verdict, scored, judged), [], {}, {})
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "measure": measure, "wall_s": round(wall, 2),
            "peak_rss_above_start_mb": round((peak - before) / 1024), "rows_ok": summary["rows_ok"],
            "table_mb": round(scored.nbytes / 2 ** 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--measures", nargs="+", default=["judge", "ifd"])
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_once(Path(args.one[0]), args.one[1])))
        return
    with tempfile.TemporaryDirectory() as work:
        for rows in args.rows:
            for measure in args.measures:
                path = Path(work) / f"{measure}-{rows}.parquet"
                pq.write_table(scored_rows(rows, measure), path)
                out = subprocess.run([sys.executable, __file__, "--one", str(path), measure], check=True,
                                     capture_output=True, text=True).stdout
                print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
