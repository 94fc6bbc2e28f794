"""Where an evaluation (`tapir eval winrate`, `tapir eval mtbench`) lives and what it leaves there.

Every evaluation has its own directory, RUN_DIR/eval/NAME/ by default. `_inputs.json` claims it for one set
of inputs, so a resumed evaluation never mixes its checkpoint with another's; `_manifest.json` is written last,
with the summary, and a finished evaluation of the same inputs is not run again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa

from pipeline import store
from pipeline.classification import run_dir
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.jobs import finish

EVAL_DIR = "eval"
RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.parquet"
CATEGORIES_FILE = "categories.parquet"
_INPUTS_FILE = "_inputs.json"


class EvalError(UserError, ValueError):
    """An evaluation that cannot start as asked; the message says what to change."""


def model_name(spec: str) -> tuple[str, Optional[int]]:
    """The name an evaluated model is filed under, and its round when it is a round's trained student
    (RUN_DIR/round_R/model → 'round_R', R). `bundled:NAME` → NAME; a directory or hub id → its last part."""
    if spec.startswith("bundled:"):
        return spec.removeprefix("bundled:"), None
    parts = Path(spec.rstrip("/")).parts
    if len(parts) >= 2 and parts[-1] == "model" and parts[-2].startswith("round_") and parts[-2][6:].isdigit():
        return parts[-2], int(parts[-2][6:])
    return (parts[-1] if parts else spec), None


def eval_location(config: RunConfig, name: str, out: Optional[str] = None) -> store.Location:
    """`out` when given, else RUN_DIR/eval/NAME."""
    if out:
        return store.locate(out, config.storage.s3_endpoint_url)
    return run_dir(config).child(EVAL_DIR, name)


def absolute(path: str) -> str:
    """A file's name as the inputs record it: URLs and bundled names as they are, local paths resolved."""
    return path if "://" in path or path.startswith("bundled:") else str(Path(path).expanduser().resolve())


def finished_summary(location: store.Location, inputs: dict) -> Optional[dict]:
    """The summary of a finished evaluation of these inputs in `location`, marked skipped; None if there is none."""
    finished = store.read_json(location, store.MANIFEST)
    if finished and finished.get("complete") and finished.get("inputs") == inputs:
        return {**finished, "skipped": True}
    return None


def claim(location: store.Location, inputs: dict) -> None:
    """Marks OUT as this evaluation's, or refuses one that holds another's (its checkpoint would skip rows)."""
    claimed = store.read_json(location, _INPUTS_FILE)
    if claimed is not None and claimed != inputs:
        differing = ", ".join(key for key in inputs if claimed.get(key) != inputs[key])
        raise EvalError(f"{location.uri}: holds an evaluation of other inputs (they differ in {differing}); pass "
                        "--out with a new directory (or --name), or delete this one to start it again")
    if claimed is None:
        store.write_json(location, _INPUTS_FILE, inputs)


def write_outputs(location: store.Location, results: pa.Table, summary: dict,
                  summary_table: Callable[[dict], pa.Table], categories_table: Callable[[dict], pa.Table]) -> None:
    """results, summary and categories Parquet, then the manifest; a complete evaluation's checkpoint goes."""
    store.write_parquet(location, RESULTS_FILE, results)
    store.write_parquet(location, SUMMARY_FILE, summary_table(summary))
    store.write_parquet(location, CATEGORIES_FILE, categories_table(summary))
    store.write_json(location, store.MANIFEST, summary)
    if summary["complete"]:
        finish(location.child("_checkpoint"))


def closing_lines(summary: dict, location: str, unit: str) -> list[str]:
    """The last lines of a printed evaluation summary: time, where the results are, and whether it finished.
    `unit`: what the evaluation is made of ("rows", "questions")."""
    lines = [f"  wall time {summary['wall_s']:.1f} s; results in {location.rstrip('/')}/{RESULTS_FILE}"]
    if not summary["complete"]:
        lines.append(f"  INCOMPLETE: some {unit} were not written; run the same command again")
    return lines
