"""What one training checkpoint costs: the price of the checkpoint a round used to take after its last step.

Takes a finished run directory and its config, copies the run once per try, resets one round's training in each
copy (its sft manifest, model and checkpoints; the prepared data is kept) and runs `tapir train --round R` in
turns with `training.checkpoint_every_steps` 1 (a checkpoint after every step but the last) and 1000 (none).
A checkpoint costs the same wherever it is taken, so the difference of the medians' fit times over the steps
less one is what the old checkpoint after the last step cost each round. Printed and written as JSON.

    .venv/bin/python benchmarks/bench_train_end.py --config RUN/../config.yaml --round 0 --repeats 2 \\
        --out benchmarks/results/train_end.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))


def fresh_copy(config: dict, round_index: int, work: Path, name: str, every: int) -> Path:
    """A copy of the run whose round `round_index` has its training set but no training: its config's path."""
    source = Path(config["storage"]["run_dir"])
    run = work / name / "run"
    shutil.rmtree(run.parent, ignore_errors=True)
    shutil.copytree(source, run)
    round_dir = run / f"round_{round_index}"
    for path in ("model", "checkpoint/train"):
        shutil.rmtree(round_dir / path, ignore_errors=True)
    (round_dir / "sft" / "_manifest.json").unlink(missing_ok=True)
    (round_dir / "sft" / "metrics.jsonl").unlink(missing_ok=True)
    copied = {**config, "storage": {**config["storage"], "run_dir": str(run)},
              "training": {**config.get("training", {}), "checkpoint_every_steps": every}}
    path = run.parent / "config.yaml"
    path.write_text(yaml.safe_dump(copied))
    return path


def train(config_path: Path, round_index: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    done = subprocess.run([TAPIR, "train", str(config_path), "--round", str(round_index)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-3000:])
    manifest = json.loads((config_path.parent / "run" / f"round_{round_index}" / "sft" / "_manifest.json").read_text())
    return {"command_s": round(time.perf_counter() - started, 1), "fit_s": manifest["fit_s"],
            "wall_s": manifest["wall_s"], "train_s": manifest["training"]["train_s"],
            "steps": manifest["steps"]["total_steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the config of a finished run")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-train-end"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    tries = {"no_checkpoint": [], "checkpoint_every_step": []}
    for repeat in range(args.repeats):
        for name, every in (("no_checkpoint", 1000), ("checkpoint_every_step", 1)):
            result = train(fresh_copy(config, args.round, args.work, f"{name}-{repeat}", every), args.round)
            tries[name].append(result)
            print(name, repeat, json.dumps(result), flush=True)
    medians = {name: {key: statistics.median(t[key] for t in runs) for key in ("fit_s", "wall_s", "train_s")}
               for name, runs in tries.items()}
    checkpoints = tries["checkpoint_every_step"][0]["steps"] - 1
    per_checkpoint = (medians["checkpoint_every_step"]["fit_s"] - medians["no_checkpoint"]["fit_s"]) / checkpoints
    result = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "round": args.round, "tries": tries, "medians": medians,
              "checkpoints_taken": checkpoints, "seconds_per_checkpoint": round(per_checkpoint, 1),
              "share_of_no_checkpoint_fit": round(per_checkpoint / medians["no_checkpoint"]["fit_s"], 3)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
