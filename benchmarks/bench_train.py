"""`tapir train` on real Alpaca rows: throughput with 1 and 2 workers, packed against unpacked, the held-out
perplexity after one epoch, and a kill -9 in the middle of the epoch.

Every configuration runs the real command (Ray Train, DeepSpeed ZeRO-2, gloo) on the same rows, one after the
other in this run, and its numbers come from the command's own manifest and metrics.jsonl. The packed run is
killed with SIGKILL once it has logged `--kill-after` steps and started again.

Also measured without training, on all rows of the file at max_len 1024: the share of non-pad tokens with
packing (sequences padded to max_len: the worst case) and without it (micro-batches of 4 in random order,
each padded to its longest row).

    .venv/bin/python benchmarks/bench_train.py --data ../shared/data/alpaca_dev_4000.jsonl --rows 160
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import yaml

from pipeline.config import RunConfig
from pipeline.models import resolve_model
from training.chat_format import ChatTokenizer
from training.packing import pack

TAPIR = str(Path(sys.executable).with_name("tapir"))


def fill_on_whole_file(rows: list[dict], model_dir: str, max_len: int, micro_batch: int) -> dict:
    table = pa.Table.from_pylist([{"id": str(i), **r} for i, r in enumerate(rows)])
    tokenized = ChatTokenizer(model_dir, max_len, "drop", None, 0.0)(table)
    tokenized = tokenized.filter(pa.compute.equal(tokenized.column("status"), "ok")).select(["input_ids", "labels"])
    lengths = [len(x) for x in tokenized.column("input_ids").to_pylist()]
    packed = pack(tokenized, max_len, packing=True)
    packed_lengths = [len(x) for x in packed.column("input_ids").to_pylist()]
    shuffled = lengths[:]
    random.Random(0).shuffle(shuffled)
    padded = sum(max(shuffled[i:i + micro_batch]) * len(shuffled[i:i + micro_batch])
                 for i in range(0, len(shuffled), micro_batch))
    return {"rows": len(lengths), "tokens": sum(lengths), "sequences_packed": len(packed_lengths),
            "packed_fill_at_max_len": round(sum(lengths) / (len(packed_lengths) * max_len), 4),
            "unpacked_non_pad_share": round(sum(lengths) / padded, 4)}


def write_config(directory: Path, name: str, training: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"storage": {"run_dir": str(directory / name)}, "ray": {"num_cpus": 4},
                                    "training": training}))
    return path


def train(config: Path, data: Path, kill_after: int = 0) -> dict:
    command = [TAPIR, "train", str(config), "--data", str(data)]
    run = Path(yaml.safe_load(config.read_text())["storage"]["run_dir"])
    started = time.perf_counter()
    killed_at = None
    if kill_after:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = run / "round_0" / "sft" / "metrics.jsonl"
        while process.poll() is None:
            steps = [r for r in _records(metrics) if r["kind"] == "step"]
            if len(steps) >= kill_after:
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed_at = steps[-1]["step"]
                break
            time.sleep(0.5)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{config}: tapir train failed:\n{(result.stdout + result.stderr)[-4000:]}")
    output = result.stdout + result.stderr
    manifest = json.loads((run / "round_0" / "sft" / "_manifest.json").read_text())
    resumed_at = int(output.split("resuming at step ")[1].split()[0]) if "resuming at step " in output else None
    steps = [r for r in _records(run / "round_0" / "sft" / "metrics.jsonl") if r["kind"] == "step"]
    return {"wall_s": round(time.perf_counter() - started, 1), "manifest": manifest, "killed_after_step": killed_at,
            "resumed_at_step": resumed_at, "step_log": [r["step"] for r in steps]}


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=160, help="rows trained on (the first of the file)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--kill-after", type=int, default=4, help="steps logged before the packed run is killed")
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    defaults = RunConfig()
    model_dir = resolve_model(defaults.student.model, defaults.storage.cache_dir)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "command": " ".join(sys.argv), "fill_whole_file_max_len_1024": fill_on_whole_file(
                  rows, model_dir, 1024, 4)}
    print(json.dumps(report["fill_whole_file_max_len_1024"]), flush=True)
    base = {"epochs": 1, "max_len": args.max_len, "micro_batch_size": 2, "effective_batch_size": 4,
            "checkpoint_every_steps": 2, "eval_fraction": 0.1, "learning_rate": 5e-5}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        directory = Path(tmp)
        data = directory / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[:args.rows]))
        runs = {"packed_1_worker_killed": ({**base}, args.kill_after),
                "unpacked_1_worker": ({**base, "packing": False}, 0),
                "packed_2_workers": ({**base, "num_workers": 2}, 0)}
        report["runs"] = {}
        for name, (training, kill_after) in runs.items():
            result = train(write_config(directory, name, training), data, kill_after)
            manifest = result.pop("manifest")
            report["runs"][name] = {**result, "training": manifest["training"], "steps": manifest["steps"],
                                    "eval": manifest["eval"], "data": {k: manifest["data"][k] for k in (
                                        "rows_in", "rows_trainable", "rows_over_max_len", "train_sequences")},
                                    "fit_s": manifest["fit_s"], "settings": training}
            print(name, json.dumps(report["runs"][name]["training"]), flush=True)
    runs = report["runs"]
    packed, unpacked = runs["packed_1_worker_killed"]["training"], runs["unpacked_1_worker"]["training"]
    report["ratios"] = {
        "packed_over_unpacked_tokens_per_s": round(packed["tokens_per_s"] / unpacked["tokens_per_s"], 3),
        "packed_over_unpacked_train_time": round(unpacked["train_s"] / packed["train_s"], 3),
        "two_over_one_worker_tokens_per_s": round(runs["packed_2_workers"]["training"]["tokens_per_s"]
                                                  / packed["tokens_per_s"], 3)}
    print(json.dumps(report["ratios"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
