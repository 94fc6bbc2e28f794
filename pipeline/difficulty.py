"""A round's difficulty verdicts: one generic score and a hard/easy verdict per scored row, whatever measured it.

The score step's stages write their own columns (the judge's `mfd`, the answer-loss stage's `ifd`); this module
turns them into `round_R/difficulty/part-0.parquet`: `difficulty_score` (the measure's value: MFD with the judge,
IFD otherwise), `hard` (None for a row that could not be scored), `difficulty_source` (what decided the verdict)
and the row's final `status`/`error`. Planning, the summaries and the report read only these, so a new measure is
its stage and its case in `verdicts` (and the score step's list of stages).

The driver builds the table from a few small columns of each row, never the answers.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline import store
from pipeline.classification import round_location, run_dir
from pipeline.config import RunConfig
from pipeline.curriculum import is_hard, rank_verdicts
from pipeline.judge_calibration import CALIBRATION_FILE, trusted

STAGE = "difficulty"
VERDICT_SCHEMA = pa.schema([("id", pa.string()), ("difficulty_score", pa.float32()), ("hard", pa.bool_()),
                            ("difficulty_source", pa.string()), ("status", pa.string()), ("error", pa.string())])
# What the judge stage leaves on a row it judged (or could not), read back for the verdicts and the summary.
JUDGE_COLUMNS = ["id", "status", "error", "mfd", "student_tokens", "judge_prompt_tokens", "judge_completion_tokens"]
_IFD_COLUMNS = ["id", "teacher_status", "teacher_error", "answer_status", "answer_error", "ifd"]
# Histogram bins of each measure: MFD runs from -9 to 9 in 0.5 steps; IFD from 0 to about 1, misaligned above.
BINS = {"mfd": [-10.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 9.0],
        "ifd": [0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 100.0]}


def difficulty_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child(STAGE)


def method(config: RunConfig) -> str:
    """How this run calls a row hard: judge, ifd or hybrid as configured; with 'auto', the judge when its
    calibration (RUN_DIR/judge_calibration.json, measured before round 0 is scored) reached the bar, else ifd.
    Read from the stored calibration each time, so every command of the run, resumed or not, decides alike."""
    chosen = config.curriculum.difficulty
    if chosen != "auto":
        return chosen
    return "judge" if trusted(store.read_json(run_dir(config), CALIBRATION_FILE), config.judge_calibration.bar) \
        else "ifd"


def measure(config: RunConfig) -> str:
    """The name of `difficulty_score`'s measure in this run."""
    return "mfd" if method(config) == "judge" else "ifd"


def score_columns(config: RunConfig) -> list[str]:
    """The columns of the score step's rows the verdicts are built from."""
    return JUDGE_COLUMNS[:4] if method(config) == "judge" else _IFD_COLUMNS


def ifd_status(row: dict, misaligned_above: Optional[float]) -> tuple[str, Optional[str]]:
    """(status, error) of a row measured by IFD: the first stage that failed it, or a misaligned pair."""
    for stage in ("teacher", "answer"):
        if row[f"{stage}_status"] != "ok":
            return f"{stage}_{row[f'{stage}_status']}", row[f"{stage}_error"]
    if misaligned_above is not None and row["ifd"] > misaligned_above:
        return "ifd_misaligned", (f"IFD {row['ifd']:.3f} > {misaligned_above:g}: the instruction does not help the "
                                  "student predict the answer; the IFD authors drop such pairs as misaligned")
    return "ok", None


def ifd_ranks(config: RunConfig, rows: Iterable[dict]) -> dict[str, Optional[bool]]:
    """IFD verdicts of the rows scored ok; None for those in the hybrid band, which the judge decides."""
    curriculum = config.curriculum
    band = curriculum.hybrid_band if method(config) == "hybrid" else 0.0
    valid = [(row["id"], row["ifd"]) for row in rows if ifd_status(row, curriculum.ifd_misaligned_above)[0] == "ok"]
    return rank_verdicts(valid, curriculum.ifd_hard_share, band)


def band_ids(config: RunConfig, scored: pa.Table) -> list[str]:
    """Hybrid: the rows the judge decides (their IFD is nearest the round's hard/easy boundary)."""
    return sorted(row_id for row_id, verdict in ifd_ranks(config, _rows(scored.select(_IFD_COLUMNS))).items()
                  if verdict is None)


def verdicts(config: RunConfig, scored: pa.Table, judged: Optional[pa.Table] = None) -> pa.Table:
    """One verdict row per scored row. `scored`: the score step's rows (score_columns); `judged`: hybrid's band
    rows as the judge stage left them (JUDGE_COLUMNS)."""
    scored = scored.select(score_columns(config))
    if method(config) == "judge":
        threshold = config.curriculum.mfd_threshold
        return _verdict_table((row["id"], row["mfd"], is_hard(row["mfd"], threshold) if row["status"] == "ok" else None,
                               "judge", row["status"], row["error"]) for row in _rows(scored))
    return _verdict_table(_ifd_verdicts(config, scored, judged))


def _ifd_verdicts(config: RunConfig, scored: pa.Table, judged: Optional[pa.Table]) -> Iterator[tuple]:
    curriculum = config.curriculum
    ranks = ifd_ranks(config, _rows(scored))
    band = {row["id"]: row for row in judged.select(JUDGE_COLUMNS[:4]).to_pylist()} if judged is not None else {}
    for row in _rows(scored):
        status, error = ifd_status(row, curriculum.ifd_misaligned_above)
        hard, source = ranks.get(row["id"]), "ifd"
        if status == "ok" and hard is None:             # in the hybrid band: the judge's MFD decides
            judge = band.get(row["id"])
            if judge is None:
                status, error = "not_judged", "in the hybrid band, but the judge's rows have no verdict for it"
            elif judge["status"] != "ok":
                status, error = judge["status"], judge["error"]
            else:
                hard, source = is_hard(judge["mfd"], curriculum.mfd_threshold), "judge"
        yield row["id"], row["ifd"], hard if status == "ok" else None, source, status, error


# Rows become Python dicts a batch at a time: at a million rows, dicts of them all would take the driver about a
# gigabyte (benchmarks/bench_verdicts_memory.py).
_BATCH_ROWS = 65_536


def _rows(table: pa.Table) -> Iterator[dict]:
    for batch in table.to_batches(max_chunksize=_BATCH_ROWS):
        yield from batch.to_pylist()


def _verdict_table(rows: Iterable[tuple]) -> pa.Table:
    rows, batches = iter(rows), []
    while chunk := list(itertools.islice(rows, _BATCH_ROWS)):
        batches.append(pa.RecordBatch.from_arrays(
            [pa.array(values, kind) for values, kind in zip(zip(*chunk), VERDICT_SCHEMA.types)], schema=VERDICT_SCHEMA))
    return pa.Table.from_batches(batches, VERDICT_SCHEMA)


def distribution(values: Sequence[float], measure_name: str) -> dict:
    """Quantiles and a histogram of a round's difficulty scores (for the summaries and the report)."""
    if not len(values):
        return {"measure": measure_name, "rows": 0}
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)
    quantile = {f"p{int(q * 100)}": round(float(ordered[min(n - 1, int(q * n))]), 3) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    edges = BINS[measure_name]
    # (low, high]: values above low, up to and including high
    above = np.searchsorted(ordered, edges, side="right")
    histogram = {f"({low:g}, {high:g}]": int(above[k + 1] - above[k]) for k, (low, high) in enumerate(zip(edges, edges[1:]))}
    return {"measure": measure_name, "rows": n, "mean": round(float(ordered.sum() / n), 3), **quantile,
            "histogram": histogram}


def format_distribution(summary: dict) -> str:
    name = summary["measure"].upper()
    if not summary["rows"]:
        return f"{name}: none scored"
    return (f"{name} over {summary['rows']} rows: mean {summary['mean']}, p10 {summary['p10']}, median "
            f"{summary['p50']}, p90 {summary['p90']}")


def read_verdicts(config: RunConfig, round_index: int) -> Optional[pa.Table]:
    return store.read_table(difficulty_location(config, round_index))


def write_verdicts(config: RunConfig, round_index: int, table: pa.Table) -> None:
    store.write_parquet(difficulty_location(config, round_index), "part-0.parquet", table)
