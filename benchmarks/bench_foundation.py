"""Foundation benchmarks: model preparation, teacher start-up, and pool import throughput.

Each figure is reported beside a baseline measured in the same run, as a ratio, because this machine is
noisy:
- model preparation (GGUF → verified safetensors dir) vs. only loading the GGUF with transformers;
- local teacher start-up until it answers vs. only `import vllm` in a fresh interpreter;
- `tapir pool import` of a generated 1M-row JSONL pool vs. pyarrow's JSON reader on the same file
  (which parses but neither validates, hashes ids, quarantines nor writes).

    .venv/bin/python benchmarks/bench_foundation.py --rows 1000000 --alpaca ../shared/data/alpaca_dev_4000.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.json as pajson

from pipeline import store
from pipeline.config import LocalServerConfig, PoolConfig
from pipeline.llm.local_server import LocalTeacherServer
from pipeline.models import bundled_student_gguf, prepare_bundled_student
from pipeline.pool import import_pool


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def bench_model_preparation(work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = bundled_student_gguf()
    load_s, _ = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)))
    prepare_s, model_dir = timed(lambda: prepare_bundled_student(work / "cache"))
    cached_s, _ = timed(lambda: prepare_bundled_student(work / "cache"))
    return {"gguf_load_s": load_s, "prepare_s": prepare_s, "prepare_over_load": prepare_s / load_s,
            "prepare_again_s": cached_s, "model_dir": str(model_dir)}


def bench_teacher_startup(model_dir: str) -> dict:
    import_s, _ = timed(lambda: subprocess.run([sys.executable, "-c", "import vllm"], check=True,
                                               capture_output=True))
    server = LocalTeacherServer(LocalServerConfig(), model_dir, "tapir-teacher")
    start_s, _ = timed(server.start)
    stop_s, _ = timed(server.stop)
    return {"import_vllm_s": import_s, "teacher_ready_s": start_s, "ready_over_import": start_s / import_s,
            "teacher_stop_s": stop_s}


def generate_pool(alpaca: Path, rows: int, path: Path) -> None:
    """A pool of `rows` distinct rows made from real Alpaca rows, each with a unique suffix."""
    seeds = [json.loads(line) for line in alpaca.open()]
    with open(path, "w") as out:
        for index in range(rows):
            seed = seeds[index % len(seeds)]
            out.write(json.dumps({"instruction": f"{seed['instruction']} (variant {index})",
                                  "input": seed["input"], "output": seed["output"]}) + "\n")


def bench_import(alpaca: Path, rows: int, work: Path) -> dict:
    source = work / "pool.jsonl"
    generate_pool(alpaca, rows, source)
    arrow_s, table = timed(lambda: pajson.read_json(source))
    out = store.locate(str(work / "pool"))
    import_s, summary = timed(lambda: import_pool([str(source)], out, PoolConfig(), progress=False))
    assert summary.rows_out == rows == table.num_rows
    return {"rows": rows, "source_mb": source.stat().st_size / 1e6, "pyarrow_read_json_s": arrow_s,
            "pyarrow_rows_per_s": rows / arrow_s, "tapir_import_s": import_s, "tapir_rows_per_s": rows / import_s,
            "import_over_pyarrow": import_s / arrow_s, "shards": len(summary.shards)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--alpaca", type=Path, default=Path("../shared/data/alpaca_dev_4000.jsonl"))
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    results = {"machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_models:
            results["model_preparation"] = bench_model_preparation(work)
            results["teacher_startup"] = bench_teacher_startup(results["model_preparation"]["model_dir"])
        results["pool_import"] = bench_import(args.alpaca, args.rows, work)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
