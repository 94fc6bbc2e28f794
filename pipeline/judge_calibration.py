"""Judge calibration: before a run pays for scoring, the judge shows whether it can tell a good answer from a bad one.

Pairs whose better answer is known are built from the pool's own rows that carry a reference answer: the answer
intact against the same answer damaged three ways (cut to its first third; another calibration row's answer; a
refusal). Each pair is judged exactly as scoring judges a row (pipeline/llm/judge.py's `judge_pair`: the same
prompt, both orders, the same parser), the intact answer in the teacher's place. Its discrimination is the share
of pairs whose MFD is positive, ties counting half: 0.5 is a judge that cannot tell, 1.0 one that always can.

The calls are paid under the run's limits and budget; the result is kept in RUN_DIR/judge_calibration.json with
the inputs it was measured on, so a resumed run (or a run after `tapir check judge`) does not pay for it again.
A pool with fewer than two rows with a long enough reference answer cannot be calibrated: the record says so.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import store
from pipeline.config import RunConfig
from pipeline.llm.carried import carried_replies
from pipeline.llm.client import BUDGET_REFUSED, ChatClient, RequestFailed, unless_refused
from pipeline.llm.endpoint import OpenEndpoint
from pipeline.llm.judge import PairScores, judge_pair
from pipeline.llm.limits import BudgetExceeded
from pipeline.pool import pool_shards
from pipeline.task_labels import sample_rows

log = logging.getLogger(__name__)

CALIBRATION_FILE = "judge_calibration.json"      # in RUN_DIR
STAGE = "calibration"                            # the stage its calls are booked under
DAMAGES = ("first_third", "other_answer", "refusal")
REFUSAL = "I'm sorry, but I can't help with that request."
# An answer this short cut to its first third is a few words, which a judge may fairly find as good as the whole.
MIN_ANSWER_CHARS = 60


@dataclass(frozen=True)
class Pair:
    row_id: str
    instruction: str
    input: str
    intact: str
    damaged: str
    damage: str


def first_third(answer: str) -> str:
    """The answer's first third, ended at a word boundary."""
    cut = answer[:len(answer) // 3]
    return cut.rsplit(None, 1)[0] if len(cut.split()) > 1 else cut


def build_pairs(rows: pa.Table, count: int, seed: int) -> list[Pair]:
    """`count` rows with a reference answer of at least MIN_ANSWER_CHARS (a fixed sample for the seed), each
    against its three damaged answers; none when fewer than two such rows exist (another row's answer needs one)."""
    outputs = rows.column("output")
    usable = rows.filter(pc.fill_null(pc.greater_equal(pc.utf8_length(outputs), MIN_ANSWER_CHARS), False))
    chosen = sample_rows(usable, count, seed).select(["id", "instruction", "input", "output"]).to_pylist()
    if len(chosen) < 2:
        return []
    pairs = []
    for index, row in enumerate(chosen):
        other = chosen[(index + 1) % len(chosen)]["output"]
        for damage, damaged in zip(DAMAGES, (first_third(row["output"]), other, REFUSAL)):
            pairs.append(Pair(row["id"], row["instruction"], row["input"] or "", row["output"], damaged, damage))
    return pairs


def _share(verdicts: list[PairScores]) -> Optional[float]:
    if not verdicts:
        return None
    wins = sum(1.0 if v.mfd > 0 else 0.5 if v.mfd == 0 else 0.0 for v in verdicts)
    return round(wins / len(verdicts), 4)


def _tally(verdicts: list[Union[PairScores, RequestFailed]]) -> dict:
    judged = [v for v in verdicts if isinstance(v, PairScores)]
    return {"pairs": len(verdicts), "judged": len(judged),
            "intact_wins": sum(v.mfd > 0 for v in judged), "ties": sum(v.mfd == 0 for v in judged),
            "discrimination": _share(judged),
            "mean_gap": round(sum(v.mfd for v in judged) / len(judged), 3) if judged else None}


def discrimination(pairs: list[Pair], verdicts: list[Union[PairScores, RequestFailed]]) -> dict:
    """Per damage kind and over all pairs: pairs, judged, intact wins, ties, discrimination (wins + ties/2 over
    judged pairs) and the mean score gap; pairs the judge failed on are counted by reason, not scored."""
    by_damage = {damage: _tally([v for p, v in zip(pairs, verdicts) if p.damage == damage]) for damage in DAMAGES}
    failed = Counter(v.reason for v in verdicts if isinstance(v, RequestFailed))
    return {**_tally(verdicts), "by_damage": by_damage, "failed": dict(failed.most_common())}


def trusted(calibration: Optional[dict], bar: float) -> bool:
    """Whether a calibration shows a judge that can tell: its discrimination over all pairs at least `bar`.
    A judge that was not calibrated, or could not be, is not known to be trustworthy."""
    share = (calibration or {}).get("discrimination")
    return share is not None and share >= bar


def _with_verdict(calibration: dict, bar: float) -> dict:
    ok = trusted(calibration, bar)
    warning = None
    if not ok:
        why = calibration.get("skipped") or (
            f"it preferred the intact answer in {calibration['discrimination']:.0%} of {calibration['judged']} "
            f"known-quality pairs (0.5 is chance), under the bar of {bar:.0%}"
            if calibration.get("discrimination") is not None else "none of its replies could be scored")
        warning = f"the judge cannot be trusted to tell a good answer from a bad one: {why}"
    return {**calibration, "bar": bar, "trusted": ok, "warning": warning}


def _inputs_key(config: RunConfig, pairs: list[Pair]) -> str:
    """What the stored result was measured on: the judge as configured, the prompt's inputs and the pairs."""
    judge = config.effective_judge
    what = {"judge": [judge.kind, judge.base_url, judge.served_model, judge.local.model],
            "pairs": [(p.row_id, p.damage, p.intact, p.damaged) for p in pairs]}
    return hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=8).hexdigest()


def first_shard(pool_dir: store.Location) -> pa.Table:
    """The pool rows calibration draws from: its first shard (at most pool.rows_per_shard rows), so a pool of
    millions is not read for a few dozen calls."""
    return pq.read_table(pool_shards(pool_dir)[0], filesystem=pool_dir.fs,
                         columns=["id", "instruction", "input", "output"])


async def _judge_all(config: RunConfig, endpoint: OpenEndpoint, limits, pairs: list[Pair]) -> tuple[list, dict]:
    run = store.locate(config.storage.run_dir, config.storage.s3_endpoint_url)
    judge = config.effective_judge
    # a budget refusal keeps the order already paid in RUN_DIR/carried_replies/ for the next command's same request
    async with ChatClient(judge, endpoint.base_url, endpoint.api_key, limits, endpoint.model,
                          carried_replies(run)) as client:
        verdicts = await asyncio.gather(*(unless_refused(judge_pair(client, p.instruction, p.input, p.intact,
                                                                    p.damaged, STAGE)) for p in pairs))
    # what was paid, failed replies included (an unparseable one was billed too)
    return verdicts, (await limits.usage_by_stage()).get(STAGE, {})


def calibrate(config: RunConfig, endpoint: OpenEndpoint, limits, pool_dir: store.Location) -> dict:
    """The judge's calibration with `trusted` and `warning` for the configured bar (the warning is logged too): the
    stored one when it was measured on the same judge and pairs, else measured now under `limits` (the run's) and
    stored. Raises BudgetExceeded when the budget refuses a call; nothing is stored then."""
    settings = config.judge_calibration
    run = store.locate(config.storage.run_dir, config.storage.s3_endpoint_url)
    pairs = build_pairs(first_shard(pool_dir), settings.rows, config.curriculum.seed)
    key = _inputs_key(config, pairs)
    result = store.read_json(run, CALIBRATION_FILE)
    if not (result and result.get("inputs_key") == key):
        result = _measure(config, endpoint, limits, pairs) if pairs else {
            "pairs": 0, "discrimination": None,
            "skipped": f"fewer than 2 rows of the pool's first shard have a reference answer of at least "
                       f"{MIN_ANSWER_CHARS} characters to build known-quality pairs from"}
        store.write_json(run, CALIBRATION_FILE, {**result, "inputs_key": key})
    calibration = _with_verdict(result, settings.bar)
    if calibration["warning"]:
        log.warning("%s (RUN_DIR/%s)", calibration["warning"], CALIBRATION_FILE)
    return calibration


def _measure(config: RunConfig, endpoint: OpenEndpoint, limits, pairs: list[Pair]) -> dict:
    started = time.perf_counter()
    verdicts, usage = asyncio.run(_judge_all(config, endpoint, limits, pairs))
    refused = [v for v in verdicts if isinstance(v, RequestFailed) and v.reason == BUDGET_REFUSED]
    if refused:
        raise BudgetExceeded(refused[0].detail)
    return {"judge_model": endpoint.model, "rows": len(pairs) // len(DAMAGES), **discrimination(pairs, verdicts),
            "calls": 2 * len(pairs), "usage": usage, "wall_s": round(time.perf_counter() - started, 2)}


def format_calibration(calibration: dict) -> str:
    """The calibration as the console shows it: one line a damage kind, and the verdict."""
    if calibration.get("skipped"):
        return f"judge calibration: not measured; {calibration['warning']}"
    kinds = ", ".join(f"{damage} {_shown(tally['discrimination'])} ({tally['intact_wins']} won, {tally['ties']} tied "
                      f"of {tally['judged']})" for damage, tally in calibration["by_damage"].items())
    failed = ", ".join(f"{reason} {n}" for reason, n in calibration["failed"].items())
    lines = [f"judge calibration: discrimination {_shown(calibration['discrimination'])} over {calibration['judged']} "
             f"of {calibration['pairs']} known-quality pairs, each judged in both orders (0.5 is chance; bar "
             f"{calibration['bar']})" + (f"; failed: {failed}" if failed else ""),
             f"  by damage: {kinds}"]
    lines.append("  the judge can be trusted" if calibration["trusted"] else f"  WARNING: {calibration['warning']}")
    return "\n".join(lines)


def _shown(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"
