"""The student stage inside the pipeline, against bare vLLM and against HF `generate`, on the same prompts.

One run, same machine, side by side:
  1. bare: `vllm.LLM(...)` + one `llm.chat` over all prompts, in a fresh process (as a script would).
  2. pipeline: the student stage on Ray Data (read Parquet → StudentGenerator actor → write Parquet).
  3. HF: transformers `generate`, batched (left padding), same chat template and sampling, on a subset.
Each reports generated tokens per second over its whole wall time, engine start included, and over the
generation alone (for the pipeline: the stage's summed task time, from Ray Data's stats).

    .venv/bin/python benchmarks/bench_student.py --alpaca ../shared/data/alpaca_dev_4000.jsonl --rows 512
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import queue
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StudentConfig
from pipeline.llm.judge import request_text
from pipeline.models import prepare_bundled_student


def prompts(alpaca: Path, rows: int) -> list[dict]:
    records = [json.loads(line) for line in alpaca.read_text().splitlines()[:rows]]
    return [{"id": str(i), "instruction": r["instruction"], "input": r.get("input") or ""}
            for i, r in enumerate(records)]


def conversation(row: dict) -> list[dict]:
    return [{"role": "user", "content": request_text(row["instruction"], row["input"])}]


def _bare(config: StudentConfig, model_dir: str, rows: list[dict], results) -> None:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.engine.kv_cache_space_gib))
    from vllm import LLM

    from pipeline.stages.student import engine_kwargs, sampling_params

    started = time.perf_counter()
    llm = LLM(**engine_kwargs(config, model_dir))
    loaded = time.perf_counter()
    outputs = llm.chat([conversation(r) for r in rows], sampling_params(config), use_tqdm=False)
    done = time.perf_counter()
    results.put({"tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "wall_s": done - started,
                 "generate_s": done - loaded})


def bare(config: StudentConfig, model_dir: str, rows: list[dict]) -> dict:
    """In a child process (as a script would run it), ended once it has reported: vLLM's engine processes
    are spawned from it and must be gone before Ray starts; its exit-time shutdown can hang on CPU."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_bare, args=(config, model_dir, rows, results))
    process.start()
    while True:
        try:
            result = results.get(timeout=5)
            break
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"the bare vLLM run exited with code {process.exitcode} before reporting")
    process.kill()
    process.join()
    return result


def pipeline(config: StudentConfig, model_dir: str, rows: list[dict], work: Path) -> dict:
    import ray
    import ray.data

    from pipeline.jobs import stage_times
    from pipeline.stages.student import generate

    source = work / "prompts"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), source / "part-00000.parquet")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    dataset = generate(ray.data.read_parquet(str(source)), model_dir, config)
    dataset.write_parquet(str(work / "out"))
    wall = time.perf_counter() - started
    student = next(s for s in stage_times(dataset) if "StudentGenerator" in s["stage"])
    ray.shutdown()
    tokens = sum(pq.read_table(str(work / "out"), columns=["student_tokens"]).column("student_tokens").to_pylist())
    return {"tokens": tokens, "wall_s": wall, "generate_s": student["task_s"]}


def hf_generate(config: StudentConfig, model_dir: str, rows: list[dict], batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter()
    torch.manual_seed(config.sampling.seed or 0)
    tokens = 0
    for start in range(0, len(rows), batch_size):
        texts = [tokenizer.apply_chat_template(conversation(r), add_generation_prompt=True, tokenize=False)
                 for r in rows[start:start + batch_size]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**encoded, do_sample=True, temperature=config.sampling.temperature,
                                 top_p=config.sampling.top_p, max_new_tokens=config.sampling.max_tokens,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[:, encoded["input_ids"].shape[1]:]
        stop = torch.tensor([tokenizer.eos_token_id, tokenizer.pad_token_id or tokenizer.eos_token_id])
        # generated tokens up to and including the first end token, as vLLM counts them
        for sequence in new:
            ends = torch.isin(sequence, stop).nonzero()
            tokens += int(ends[0]) + 1 if len(ends) else len(sequence)
    done = time.perf_counter()
    return {"tokens": tokens, "wall_s": done - started, "generate_s": done - loaded}


def rates(result: dict) -> dict:
    return {**{k: round(v, 2) for k, v in result.items()},
            "tokens_per_s": round(result["tokens"] / result["wall_s"], 1),
            "generate_tokens_per_s": round(result["tokens"] / result["generate_s"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alpaca", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hf-rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per Ray Data batch (one llm.chat call)")
    args = parser.parse_args()
    model_dir = str(prepare_bundled_student("~/.cache/tapir"))
    config = StudentConfig.model_validate({"batch_size": args.batch_size, "sampling": {"max_tokens": args.max_tokens}})
    rows = prompts(args.alpaca, args.rows)
    with tempfile.TemporaryDirectory() as work:
        results = {"bare_vllm": rates(bare(config, model_dir, rows)),
                   "pipeline": rates(pipeline(config, model_dir, rows, Path(work))),
                   "hf_generate": rates(hf_generate(config, model_dir, rows[:args.hf_rows], 16))}
    results["ratio_pipeline_vs_bare"] = {
        "wall": round(results["pipeline"]["tokens_per_s"] / results["bare_vllm"]["tokens_per_s"], 3),
        "generation": round(results["pipeline"]["generate_tokens_per_s"] / results["bare_vllm"]["generate_tokens_per_s"], 3)}
    results["ratio_pipeline_vs_hf"] = {
        "wall": round(results["pipeline"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"], 2),
        "generation": round(results["pipeline"]["generate_tokens_per_s"] / results["hf_generate"]["generate_tokens_per_s"], 2)}
    results["machine"] = f"{platform.machine()}, {multiprocessing.cpu_count()} cores"
    results["settings"] = {"rows": args.rows, "hf_rows": args.hf_rows, "max_tokens": args.max_tokens,
                           "batch_size": args.batch_size, "sampling": config.sampling.model_dump()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
