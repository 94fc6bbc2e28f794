"""The end of `tapir run`: did the student move toward the references?

With `eval.held_out_path` set (and `eval.reference_loss_after_run`), the run ends by measuring the reference loss
(pipeline/evaluation/winrate_run.py: the model's mean loss per token on a held-out row's reference answer, under
its chat template and training's system prompt) of the student it started from and of its last round's student,
on the same held-out rows, and their paired difference. It needs no judge and no API call: the answer-loss stage
on one engine per model, prefill only. Held-out rows that overlap the pool or a round's new rows are dropped and
counted, as `tapir eval` does.

RUN_DIR/heldout_loss/
  heldout/          the imported file (its quarantine, and the rows dropped as overlapping in _overlap.json)
  input/            the rows measured: the first eval.num_rows in id order (a sample spread over the file, the
                    same every time) of those that do not overlap
  MODEL/rows/       per model (start, round_R): each row's loss, tokens and status (answer-loss columns)
  results.parquet   one row per measured row: id, task, start's loss, the last round's loss, their difference
  _manifest.json    the summary: both means with their standard errors, the paired difference and its error

A model already measured on the same rows is not measured again; another file or row count starts over.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Optional

import pyarrow as pa

from pipeline import store
from pipeline.classification import model_location, run_dir
from pipeline.config import RunConfig
from pipeline.evaluation.eval_dir import absolute
from pipeline.evaluation.winrate import mean_and_error, paired_difference
from pipeline.evaluation.winrate_run import REFERENCE_COLUMN, input_rows
from pipeline.models import Model, model_key, resolve_model, run_model

HELDOUT_DIR = "heldout_loss"
START = "start"
_INPUTS_FILE = "_inputs.json"
_LOSS_COLUMNS = ["id", "answer_loss", "answer_tokens", "answer_status", "answer_error"]


def heldout_location(config: RunConfig) -> store.Location:
    return run_dir(config).child(HELDOUT_DIR)


def measure(config: RunConfig, last_round: int) -> dict:
    """Measures the starting student and round `last_round`'s student on the held-out rows and returns the
    summary (also RUN_DIR/heldout_loss/_manifest.json)."""
    started = time.perf_counter()
    out = heldout_location(config)
    eval_file, num_rows = config.eval.held_out_path, config.eval.num_rows
    inputs = {"eval_file": absolute(eval_file), "num_rows": num_rows,
              "system_prompt": config.training.system_prompt}
    if store.read_json(out, _INPUTS_FILE) not in (None, inputs):     # other rows: nothing measured applies
        out.fs.delete_dir_contents(out.path, missing_dir_ok=True)
    if store.read_json(out, _INPUTS_FILE) is None:
        out.makedirs()
        store.write_json(out, _INPUTS_FILE, inputs)
    rows, quarantined, overlap = input_rows(config, out, eval_file, num_rows, by_id=True)
    models = {START: (resolve_model(config.student.model, config.storage.cache_dir, config.storage.s3_endpoint_url),
                      None),
              f"round_{last_round}": (run_model(model_location(config, last_round), config.storage.cache_dir),
                                      last_round)}
    measured = [_measured(config, out, name, model, round_index) for name, (model, round_index) in models.items()]
    start, last = ({row["id"]: row["answer_loss"] for row in model_rows if row["answer_status"] == "ok"}
                   for model_rows in (m.pop("rows") for m in measured))
    paired = paired_difference(last, start)
    tasks = dict(zip(rows.column("id").to_pylist(), rows.column("task").to_pylist()))
    shared = sorted(start.keys() & last.keys())
    store.write_parquet(out, "results.parquet", pa.table({
        "id": pa.array(shared, pa.string()), "task": pa.array([tasks.get(row) for row in shared], pa.string()),
        "start_loss": pa.array([start[row] for row in shared], pa.float64()),
        "last_loss": pa.array([last[row] for row in shared], pa.float64()),
        "difference": pa.array([last[row] - start[row] for row in shared], pa.float64())}))
    summary = {"complete": True, **inputs, "rows": rows.num_rows, "rows_quarantined": quarantined, **overlap,
               "rows_location": out.child("input").uri, "models": measured,
               "difference": paired.difference if paired else None,
               "standard_error": paired.standard_error if paired else None, "rows_paired": paired.n if paired else 0,
               "wall_s": round(time.perf_counter() - started, 2)}
    store.write_json(out, store.MANIFEST, summary)
    return summary


def _measured(config: RunConfig, out: store.Location, name: str, model: Model, round_index: Optional[int]) -> dict:
    """One model's losses on the held-out rows (RUN_DIR/heldout_loss/NAME/rows/), measured unless they were for
    the same model, and what they come to: {name, round, model_path, reference_loss, standard_error, rows_scored,
    rows_failed, rows (id, answer_loss, answer_status)}."""
    location = out.child(name)
    key = model_key(model)
    if (store.read_json(location, _INPUTS_FILE) or {}).get("model_path") != key:
        location.fs.delete_dir_contents(location.path, missing_dir_ok=True)
        location.makedirs()
        store.write_json(location, _INPUTS_FILE, {"model_path": key})
    if store.read_json(location, store.MANIFEST) is None:
        _losses(config, out, location, model)
        store.write_json(location, store.MANIFEST, {"complete": True, "model_path": key})
    rows = store.read_table(location.child("rows"), _LOSS_COLUMNS).to_pylist()
    losses = [row["answer_loss"] for row in rows if row["answer_status"] == "ok"]
    mean, error = mean_and_error(losses) if losses else (None, None)
    return {"name": name, "round": round_index, "model_path": key, "reference_loss": mean, "standard_error": error,
            "rows_scored": len(losses),
            "rows_failed": dict(Counter(row["answer_status"] for row in rows if row["answer_status"] != "ok")),
            "rows": rows}


def _losses(config: RunConfig, out: store.Location, location: store.Location, model: Model) -> None:
    from pipeline.jobs import job_cpus, read_parquet, write_checkpointed
    from pipeline.ray_runtime import init_ray
    from pipeline.stages.answer_loss import answer_losses

    init_ray(config.ray, min_cpus=job_cpus(config, endpoint_stages=0))
    write_checkpointed(lambda: answer_losses(read_parquet(out.child("input")), model, config.student,
                                             REFERENCE_COLUMN, False, config.training.system_prompt),
                       location.child("rows"), location.child("_checkpoint"))


def format_heldout(summary: dict) -> str:
    """What the console and summary.txt say: both losses, the paired difference, and which rows."""
    start, last = summary["models"]
    dropped = summary["rows_overlapping_pool"]
    lines = [f"held-out reference loss: {summary['rows']} rows of {summary['eval_file']}"
             + (f" ({dropped} overlapping the pool dropped)" if dropped else "")
             + f"; the rows: {summary['rows_location']}"]
    for model, label in ((start, "starting student"), (last, f"round {last['round']}'s student")):
        value = "no row measured" if model["reference_loss"] is None else (
            f"{model['reference_loss']:.4f} ± {model['standard_error']:.4f} nats/token over {model['rows_scored']} rows")
        failed = ", ".join(f"{reason}: {n}" for reason, n in model["rows_failed"].items())
        lines.append(f"  {label:<22} {value}" + (f" (not measured: {failed})" if failed else ""))
    if summary["difference"] is None:
        lines.append("  no row was measured for both models")
    else:
        difference, error = summary["difference"], summary["standard_error"]
        lines.append(f"  {'difference (paired)':<22} {difference:+.4f} ± {error:.4f} over {summary['rows_paired']} rows: "
                     + verdict(difference, error))
    return "\n".join(lines)


def verdict(difference: float, error: float) -> str:
    """Whether a paired loss difference is more than twice its standard error, in words."""
    if error > 0 and abs(difference) > 2 * error:
        direction = "lower: the student moved toward" if difference < 0 else "higher: the student moved away from"
        return f"{direction} the references ({abs(difference) / error:.1f} standard errors)"
    return "within twice its standard error: no measurable change"
