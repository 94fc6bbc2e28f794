"""`tapir eval compare [CONFIG] --eval FILE`: did the curriculum beat plain distillation?

Every model of a run is scored the same way, `tapir eval winrate` on the same held-out rows against the same
references (the file's answers, else the teacher's): the student the run started from, each round's trained
student, and a plain-distillation baseline. The baseline is trained here once, into RUN_DIR/baseline/, from
the student the run started from: as many training rows as the run's rounds trained on together, drawn at
random from the scored pool (no difficulty, no task resampling, no expansion), answered by the same teacher
with one plain system prompt for every task (no task-aware style; with respond.pool_answers 'reference', the
same reference answers as the rounds), and trained with the same training settings. With eval.baseline_seeds
above 1 there are that many baselines, each drawn with its own seed (curriculum.seed + k, in
RUN_DIR/baseline_K/), so the spread of plain distillation itself is seen; each is a row of the table. Each
model's difference to the baseline is paired by row, against the baselines' mean on that row, which takes the
rows' own difficulty out of its standard error: in win rate, and in reference loss (the model's mean loss per
token on the file's reference answers; lower: closer to the references), which a judge that calls most pairs
ties cannot hide.

Writes RUN_DIR/eval/compare.parquet (one row per model) and RUN_DIR/eval/categories.parquet, which the run's
report plots, then the report. Every step is skipped when it finished before, so the same command continues
an interrupted comparison without paying twice.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import planning, responding, store
from pipeline.classification import model_location, run_dir
from pipeline.config import RunConfig
from pipeline.curriculum import baseline_copies
from pipeline.evaluation.eval_dir import CATEGORIES_FILE, EVAL_DIR, RESULTS_FILE, EvalError, eval_location
from pipeline.evaluation.winrate import paired_difference
from pipeline.llm.endpoint import RunEndpoints
from pipeline.report import COMPARE_FILE
from pipeline.rounds import STATE_FILE

BASELINE = "baseline"
BASE_STUDENT = "base_student"
BASELINE_STYLE = "style_plain"
_POOL_COLUMNS = ["id", "instruction", "input", "output", "task"]
COMPARE_SCHEMA = pa.schema([
    ("model", pa.string()), ("round", pa.int64()), ("win_rate", pa.float64()), ("standard_error", pa.float64()),
    ("lc_win_rate", pa.float64()), ("lc_standard_error", pa.float64()), ("rows_judged", pa.int64()),
    ("difference_to_baseline", pa.float64()), ("difference_standard_error", pa.float64()),
    ("rows_paired", pa.int64()), ("trained_rows", pa.int64()), ("model_path", pa.string()),
    ("reference_loss", pa.float64()), ("reference_loss_standard_error", pa.float64()),
    ("reference_loss_rows", pa.int64()), ("loss_difference_to_baseline", pa.float64()),
    ("loss_difference_standard_error", pa.float64()), ("loss_rows_paired", pa.int64()),
    ("rows_overlapping_pool", pa.int64())])


def baseline_name(seed_index: int) -> str:
    """The k-th baseline's name: 'baseline', then 'baseline_1', 'baseline_2', …"""
    return BASELINE if seed_index == 0 else f"{BASELINE}_{seed_index}"


def baseline_config(config: RunConfig, seed_index: int = 0) -> RunConfig:
    """The k-th baseline as a one-round run of its own in RUN_DIR/NAME/ (baseline_name), drawn with seed
    curriculum.seed + k: its plan, answers, training set and model sit where a round's would, so the respond,
    training-set and training steps run unchanged."""
    storage = config.storage.model_copy(update={
        "run_dir": config.storage.run_dir.rstrip("/") + "/" + baseline_name(seed_index)})
    respond = config.respond.model_copy(update={"styles": {}, "default_style": BASELINE_STYLE})
    curriculum = config.curriculum.model_copy(update={"seed": config.curriculum.seed + seed_index})
    return config.model_copy(update={"storage": storage, "respond": respond, "curriculum": curriculum})


def trained_rounds(config: RunConfig) -> dict[int, int]:
    """Round → rows of its training set, for each round of the run whose training finished."""
    state = store.read_json(run_dir(config), STATE_FILE)
    if not state:
        raise EvalError(f"{run_dir(config).child(STATE_FILE).uri}: no run here; `tapir run` it first")
    rounds = {int(r): done["summaries"]["train_set"]["rows"] for r, done in state["rounds"].items()
              if "train" in done["finished"]}
    if not rounds:
        raise EvalError(f"{run_dir(config).uri}: no round has finished training yet; nothing to compare")
    return dict(sorted(rounds.items()))


def plan_baseline(config: RunConfig, size: int, seed_index: int = 0) -> dict:
    """RUN_DIR/NAME/round_0/plan/: `size` rows of round 0's scored pool, drawn at random with the k-th baseline's
    seed (the pool as the run saw it, each row with its task). A baseline planned for another size is refused,
    not mixed."""
    baseline = baseline_config(config, seed_index)
    out = planning.plan_location(baseline, 0)
    planned = store.read_json(out, store.MANIFEST)
    if planned and planned.get("complete"):
        if planned["rows_planned"] != size:
            raise EvalError(f"{out.uri}: the baseline was planned with {planned['rows_planned']} rows, the run's "
                            f"rounds now trained on {size}; delete {run_dir(baseline).uri} to train it again")
        return {**planned, "skipped": True}
    from pipeline.scoring import score_location

    scored = store.read_table(score_location(config, 0), _POOL_COLUMNS)
    scored = scored.take(pc.sort_indices(scored, [("id", "ascending")]))     # not Ray's write order
    copies = baseline_copies(scored.num_rows, size, baseline.curriculum.seed)
    chosen = sorted(copies)
    table = scored.take(chosen)
    table = table.append_column("difficulty", pa.nulls(len(chosen), pa.string()))
    table = table.append_column("copies", pa.array([copies[i] for i in chosen], pa.int32()))
    store.write_parquet(out, "plan.parquet", table)
    summary = {"stage": planning.PLAN, "round": 0, "complete": True, "baseline": True,
               "rows_in_pool": scored.num_rows, "rows_planned": size, "distinct_rows": len(chosen)}
    store.write_json(out, store.MANIFEST, summary)
    return summary


def train_baseline(config: RunConfig, size: int, endpoints: RunEndpoints, seed_index: int = 0) -> dict:
    """Plans, answers and trains the k-th baseline; returns its training summary."""
    from training import sft

    baseline = baseline_config(config, seed_index)
    plan_baseline(config, size, seed_index)
    responding.respond(baseline, 0, None, endpoints)
    planning.write_training_set(baseline, 0, None, responding.read_answers(baseline, 0))
    return sft.train(baseline, 0, "the evaluation loads it in vLLM")


def compare(config: RunConfig, eval_file: Optional[str] = None, num_rows: Optional[int] = None,
            endpoints: Optional[RunEndpoints] = None) -> pa.Table:
    """Trains the baseline if it is not yet, evaluates every model, and writes and returns compare.parquet."""
    from pipeline.evaluation.winrate_run import eval_cpus, winrate
    from pipeline.ray_runtime import init_ray

    eval_file = eval_file or config.eval.held_out_path
    if not eval_file:
        raise EvalError("no held-out file: pass --eval FILE or set eval.held_out_path in the config")
    rounds = trained_rounds(config)
    baselines = [baseline_name(k) for k in range(config.eval.baseline_seeds)]
    models = [(BASE_STUDENT, config.student.model, None, 0)]
    models += [(name, model_location(baseline_config(config, k), 0).uri, None, sum(rounds.values()))
               for k, name in enumerate(baselines)]
    models += [(f"round_{r}", model_location(config, r).uri, r, sum(rows for q, rows in rounds.items() if q <= r))
               for r in rounds]
    summaries = {}
    with contextlib.ExitStack() as stack:
        # before Ray starts: see rounds.run
        endpoints = endpoints or RunEndpoints(config.teacher, config.judge, config.storage.cache_dir, stack)
        init_ray(config.ray, min_cpus=max(eval_cpus(config), config.training.num_workers + 3))
        baseline_training = [train_baseline(config, sum(rounds.values()), endpoints, k)
                             for k in range(len(baselines))]
        for name, model, round_index, _ in models:
            summaries[name] = winrate(config, model, eval_file, num_rows=num_rows, name=name,
                                      round_index=round_index, endpoints=endpoints)
            if not summaries[name]["complete"]:
                raise EvalError(f"{name}: its evaluation stopped before every row was written; run the same "
                                "command again to continue it")
    preferences, losses = {}, {}
    for name in summaries:
        preferences[name], losses[name] = per_row_results(eval_location(config, name))
    baseline_preferences = row_means([preferences[name] for name in baselines])
    baseline_losses = row_means([losses[name] for name in baselines])
    rows = []
    for name, _, round_index, trained in models:
        summary = summaries[name]
        paired = paired_difference(preferences[name], baseline_preferences) if name not in baselines else None
        loss_paired = paired_difference(losses[name], baseline_losses) if name not in baselines else None
        rows.append({"model": name, "round": round_index, "win_rate": summary["win_rate"],
                     "standard_error": summary["standard_error"], "lc_win_rate": summary["lc_win_rate"],
                     "lc_standard_error": summary["lc_standard_error"], "rows_judged": summary["rows_judged"],
                     "difference_to_baseline": paired.difference if paired else None,
                     "difference_standard_error": paired.standard_error if paired else None,
                     "rows_paired": paired.n if paired else None, "trained_rows": trained,
                     "model_path": summary["model_path"], "reference_loss": summary["reference_loss"],
                     "reference_loss_standard_error": summary["reference_loss_standard_error"],
                     "reference_loss_rows": summary["reference_loss_rows"],
                     "loss_difference_to_baseline": loss_paired.difference if loss_paired else None,
                     "loss_difference_standard_error": loss_paired.standard_error if loss_paired else None,
                     "loss_rows_paired": loss_paired.n if loss_paired else None,
                     "rows_overlapping_pool": summary["rows_overlapping_pool"]})
    table = pa.Table.from_pylist(rows, schema=COMPARE_SCHEMA)
    out = run_dir(config).child(EVAL_DIR)
    store.write_parquet(out, COMPARE_FILE, table)
    categories = [store.read_parquet_file(eval_location(config, name), CATEGORIES_FILE)
                  for name in summaries]
    store.write_parquet(out, CATEGORIES_FILE, pa.concat_tables(categories))
    store.write_json(out, "_compare.json", {"eval_file": eval_file, "baselines": baselines, "baseline_training": [
        {key: training.get(key) for key in ("steps", "data", "training", "wall_s")} for training in baseline_training]})
    return table


def row_means(per_model: list[dict[str, float]]) -> dict[str, float]:
    """Row id → the mean of the models' values on it, over the rows every model has a value for."""
    shared = set.intersection(*(set(values) for values in per_model)) if per_model else set()
    return {row: sum(values[row] for values in per_model) / len(per_model) for row in shared}


def per_row_results(location: store.Location) -> tuple[dict[str, float], dict[str, float]]:
    """Row id → the model's preference against the reference, over the rows the judge could read; and row id →
    its reference loss, over the rows it was computed for."""
    results = store.read_parquet_file(location, RESULTS_FILE).select(
        ["id", "status", "preference", "reference_loss_status", "reference_loss"]).to_pylist()
    return ({row["id"]: row["preference"] for row in results if row["status"] == "ok"},
            {row["id"]: row["reference_loss"] for row in results if row["reference_loss_status"] == "ok"})


def _percent(value: Optional[float], error: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:{'+' if signed else ''}.1f} ± {100 * (error or 0):.1f}"


def _loss(value: Optional[float], error: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:{'+' if signed else ''}.4f} ± {error or 0:.4f}"


def format_compare(table: pa.Table) -> str:
    """The comparison as a table a person reads: win rates in points and reference losses in nats per token,
    and each model against the baseline in both."""
    header = (f"{'model':<14} {'trained rows':>12} {'win rate':>14} {'LC win rate':>14} {'vs baseline':>14} "
              f"{'judged':>7} {'reference loss':>17} {'loss vs baseline':>18} {'scored':>7}")
    lines = [header, "-" * len(header)]
    for row in table.to_pylist():
        lines.append(f"{row['model']:<14} {row['trained_rows']:>12} "
                     f"{_percent(row['win_rate'], row['standard_error']):>14} "
                     f"{_percent(row['lc_win_rate'], row['lc_standard_error']):>14} "
                     f"{_percent(row['difference_to_baseline'], row['difference_standard_error'], True):>14} "
                     f"{row['rows_judged']:>7} "
                     f"{_loss(row['reference_loss'], row['reference_loss_standard_error']):>17} "
                     f"{_loss(row['loss_difference_to_baseline'], row['loss_difference_standard_error'], True):>18} "
                     f"{row['reference_loss_rows']:>7}")
    lines.append("win rates in points against the same references (ties half); vs baseline: the paired "
                 "difference over the rows both were judged on, ± its standard error (with several baselines, "
                 "against their mean on each row)")
    lines.append("reference loss: mean nats per token of the file's reference answers under each model (lower: "
                 "closer to them); loss vs baseline: paired over the rows both were scored on, ± its standard error")
    overlapping = {row["rows_overlapping_pool"] for row in table.to_pylist()}
    lines.append(f"held-out rows overlapping the pool, dropped before evaluation: {', '.join(map(str, sorted(overlapping)))}"
                 " (their ids and reasons: eval/MODEL/heldout/_overlap.json)")
    return "\n".join(lines)
