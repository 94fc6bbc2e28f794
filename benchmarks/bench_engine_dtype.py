"""The student's vLLM engine in bf16 against float32 on this CPU: what `student.engine.dtype: auto` should mean.

Each dtype gets a fresh process (one engine each, as a stage's actor has), started by the pipeline's own
`start_engine`; the same rows of the bundled sample pool go through the answer-loss stage (IFD: two prefills
a row, prompt log-probs, what scoring and the held-out check run) `--repeats` times. Printed and written as JSON:
engine start, seconds per repeat, tokens per second, and the mean loss each dtype gives (they should agree to
about bf16's precision).

    .venv/bin/python benchmarks/bench_engine_dtype.py --rows 32 --repeats 2 --out benchmarks/results/engine_dtype.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(dtype: str, rows: int, repeats: int, queue) -> None:
    import pyarrow as pa

    from pipeline.config import StudentConfig
    from pipeline.models import resolve_model
    from pipeline.pool import bundled_sample_path
    from pipeline.stages.answer_loss import AnswerLoss

    records = [json.loads(line) for line in bundled_sample_path().read_text().splitlines()[:rows]]
    batch = pa.Table.from_pylist([{"id": str(i), "instruction": r["instruction"], "input": r["input"],
                                   "output": r["output"]} for i, r in enumerate(records)])
    config = StudentConfig.model_validate({"engine": {"dtype": dtype, "enforce_eager": True}})
    started = time.perf_counter()
    stage = AnswerLoss(config, resolve_model("bundled:smollm2-135m-instruct", Path.home() / ".cache" / "tapir"),
                       "output", unconditioned=True)
    start_s = time.perf_counter() - started
    times, out = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        out = stage(batch)
        times.append(time.perf_counter() - began)
    losses = [x for x in out.column("answer_loss").to_pylist() if x is not None]
    # both prefills of every row: the whole conversation, then the answer after an empty user turn
    tokens = sum(len(ids) for i in range(batch.num_rows) for ids, _ in (
        stage.token_ids(records[i]["instruction"], records[i]["input"], records[i]["output"]),
        stage.token_ids("", None, records[i]["output"])))
    queue.put({"dtype": dtype, "engine_start_s": round(start_s, 1), "seconds": [round(t, 2) for t in times],
               "prefill_tokens": tokens, "tokens_per_s": round(tokens / statistics.median(times), 1),
               "mean_answer_loss": round(statistics.fmean(losses), 5)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    for dtype in ("bfloat16", "float32"):
        queue = context.Queue()
        process = context.Process(target=measure, args=(dtype, args.rows, args.repeats, queue))
        process.start()
        results.append(queue.get())
        process.join()
        print(json.dumps(results[-1]), flush=True)
    bf16, fp32 = results
    summary = {"machine": f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} CPUs",
               "rows": args.rows, "results": results,
               "float32_speedup": round(statistics.median(bf16["seconds"]) / statistics.median(fp32["seconds"]), 2),
               "loss_difference": round(abs(bf16["mean_answer_loss"] - fp32["mean_answer_loss"]), 5)}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
