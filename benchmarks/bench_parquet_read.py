"""Ray Data's two Parquet readers on the small reads every stage of a round starts with: the same directory of
Parquet files read with datasource V2 (Ray 2.60's default: a ListFiles task, then ReadFiles) and with V1, in
turns in one Ray instance (as pipeline/ray_runtime.init_ray starts it), so both see the same machine.

    .venv/bin/python benchmarks/bench_parquet_read.py --repeats 5 --files 1 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--files", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from pipeline.config import RayConfig
    from pipeline.ray_runtime import init_ray

    init_ray(RayConfig(num_cpus=2), min_cpus=6)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    ray.data.from_items([{"a": 1}]).map_batches(lambda b: b).materialize()       # the workers warm
    results = []
    for files in args.files:
        directory = Path(tempfile.mkdtemp())
        for k in range(files):
            pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(100)], "text": ["x" * 200] * 100}),
                           directory / f"part-{k:05d}.parquet")
        seconds = {"v2": [], "v1": []}
        for _ in range(args.repeats):
            for reader in ("v2", "v1"):
                context.use_datasource_v2 = reader == "v2"
                started = time.perf_counter()
                rows = ray.data.read_parquet(str(directory)).map_batches(lambda b: b, batch_format="pyarrow") \
                    .materialize().count()
                seconds[reader].append(time.perf_counter() - started)
                assert rows == 100 * files
        medians = {reader: round(statistics.median(values), 2) for reader, values in seconds.items()}
        results.append({"files": files, "rows": 100 * files, "median_s": medians,
                        "v1_over_v2": round(medians["v1"] / medians["v2"], 3),
                        "all_s": {r: [round(v, 2) for v in vs] for r, vs in seconds.items()}})
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
