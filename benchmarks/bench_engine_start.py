"""How long a vLLM engine of the bundled student takes from a fresh process to its first answer, with vLLM's
default process layout on CPU (the engine core in a process of its own, the model worker in a third) against
the engine core and its worker in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` and the `uni`
executor), and how fast each then generates (24 prompts, 48 tokens each). Each start is a new Python process, as in a Ray actor or `tapir train`'s smoke check; the variants
alternate so the machine's noise falls on both.

    .venv/bin/python benchmarks/bench_engine_start.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
from vllm import LLM, SamplingParams
started = time.perf_counter()
kwargs = {"model": sys.argv[1], "max_model_len": 1024, "enforce_eager": True, "seed": 0}
if sys.argv[2] == "in_process":
    kwargs["distributed_executor_backend"] = "uni"
llm = LLM(**kwargs)
text = llm.generate(["Name three colors."], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
engine_s = time.perf_counter() - started
started = time.perf_counter()
outputs = llm.generate([f"Write a sentence about the number {i}." for i in range(24)],
                       SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
print("ENGINE_S", engine_s, tokens / (time.perf_counter() - started), repr(text))
"""
VARIANTS = {"separate_processes": {}, "in_process": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}


def one_start(model: str, variant: str) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", **VARIANTS[variant]}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, model, variant], capture_output=True, text=True, env=env,
                          timeout=600)
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: {done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("ENGINE_S")).split(" ", 3)
    return {"variant": variant, "process_to_answer_s": round(total, 2), "engine_s": round(float(line[1]), 2),
            "generate_tokens_per_s": round(float(line[2]), 1), "answer": line[3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default="~/.cache/tapir")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine_start.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline.models import prepare_bundled_student

    model = str(prepare_bundled_student(Path(args.cache_dir).expanduser()))
    runs = []
    for _ in range(args.repeats):
        for variant in VARIANTS:
            runs.append(one_start(model, variant))
            print(runs[-1], flush=True)
    def median(key: str) -> dict:
        return {v: statistics.median(r[key] for r in runs if r["variant"] == v) for v in VARIANTS}

    starts, speeds = median("process_to_answer_s"), median("generate_tokens_per_s")
    result = {"command": " ".join(sys.argv), "runs": runs, "median_process_to_answer_s": starts,
              "median_generate_tokens_per_s": speeds,
              "start_ratio_in_process_to_separate": round(starts["in_process"] / starts["separate_processes"], 3),
              "speed_ratio_in_process_to_separate": round(speeds["in_process"] / speeds["separate_processes"], 3),
              "same_answers": len({r["answer"] for r in runs}) == 1, "load_after": os.getloadavg()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
