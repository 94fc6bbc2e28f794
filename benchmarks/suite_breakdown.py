"""Where the end-to-end tests' time goes: reads the run directories a test session left under pytest's
`--basetemp` and prints, for each `tapir` run in them, the wall time of each stage and the phases inside it
(scoring's start-up and streaming job, training's data preparation, Ray Train fit, optimizer steps and the
vLLM smoke check) from the manifests and state the pipeline writes anyway.

    make test PYTEST_ARGS="--durations=0 --basetemp=/tmp/suite"
    .venv/bin/python benchmarks/suite_breakdown.py /tmp/suite

What no manifest holds (process start, imports, Ray start, vLLM engine start inside scoring) is the difference
between a test's duration and the sum printed here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PHASES = ("setup_s", "job_s", "prepare_s", "fit_s", "smoke_s")


def stage_line(name: str, summary: dict) -> str:
    phases = {key: summary[key] for key in PHASES if summary.get(key) is not None}
    steps = (summary.get("training") or {}).get("train_s")
    if steps is not None:
        phases["steps_s"] = steps
    text = f"    {name:<10} {summary.get('wall_s') or 0:8.1f} s"
    return text + ("  (" + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in phases.items()) + ")" if phases else "")


def runs(base: Path):
    for state_file in sorted(base.rglob("state.json")):
        state = json.loads(state_file.read_text())
        # a run the pipeline wrote (a test may write a state file of its own shape without one)
        if state.get("rounds") and (state_file.parent / "round_0" / "score" / "_manifest.json").exists():
            yield state_file.parent, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("basetemp", type=Path)
    base = parser.parse_args().basetemp
    for run, state in runs(base):
        print(f"{run.relative_to(base)}: {state.get('status')}")
        for round_index, done in sorted(state["rounds"].items()):
            summaries = done.get("summaries", {})
            total = sum(s.get("wall_s") or 0 for s in summaries.values())
            print(f"  round {round_index}: stages with a wall time {total:.1f} s")
            for name, summary in summaries.items():
                print(stage_line(name, summary))
        for sft in sorted(run.rglob("sft/_manifest.json")):
            if "baseline" in sft.parts:
                print(f"  {sft.parent.parent.relative_to(run)} (baseline)")
                print(stage_line("train", json.loads(sft.read_text())))


if __name__ == "__main__":
    main()
