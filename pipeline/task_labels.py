"""`tapir classifier label`: the teacher labels a sample of the pool with a task category.

The sample is deterministic for the config's seed. Labels are written in chunks as they come
(`classifier/labels/part-*.parquet`), so a killed run, run again, asks the teacher only about rows it
has no answer for: at most one chunk of paid calls is repeated. Rows the teacher cannot label are kept
with status 'failed' and the reason, and are not used for training; rows that failed in transport
(5xx, timeouts) are asked again by the next run, and their newer answer is the one used.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import store
from pipeline.config import RunConfig
from pipeline.llm.client import BUDGET_REFUSED, ChatClient, RequestFailed, unless_refused
from pipeline.llm.endpoint import OpenEndpoint
from pipeline.llm.judge import label_task
from pipeline.llm.limits import BudgetExceeded
from pipeline.llm.shared_limits import Limits, local_limits
from pipeline.llm.spend import spend_record

log = logging.getLogger(__name__)

LABELS_DIR = ("classifier", "labels")
_CHUNK_ROWS = 100
LABEL_SCHEMA = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
                          ("task", pa.string()), ("status", pa.string()), ("error", pa.string())])


def sample_rows(pool: pa.Table, size: int, seed: int) -> pa.Table:
    """A fixed random sample: rows ordered by a hash of (seed, id), the first `size` taken."""
    keys = [hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).hexdigest()
            for row_id in pool.column("id").to_pylist()]
    order = pc.sort_indices(pa.array(keys))
    return pool.take(order.slice(0, min(size, pool.num_rows)))


def labels_location(config: RunConfig) -> store.Location:
    return store.locate(config.storage.run_dir, config.storage.s3_endpoint_url).child(*LABELS_DIR)


def read_labels(location: store.Location) -> pa.Table:
    files = location.list_files(".parquet")
    if not files:
        return LABEL_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, filesystem=location.fs, schema=LABEL_SCHEMA) for f in files)


def _answered_ids(labels: pa.Table) -> set[str]:
    """Rows the teacher answered: labelled, or 'unlabelled' (asking again would cost the same answer).

    Rows that failed in transport (5xx, timeouts, budget) are asked again by a resumed run.
    """
    return {row_id for row_id, status, error in zip(labels.column("id").to_pylist(),
                                                    labels.column("status").to_pylist(),
                                                    labels.column("error").to_pylist())
            if status == "ok" or (error or "").startswith("unlabelled:")}


@dataclass
class LabelSummary:
    sampled: int = 0
    already_labelled: int = 0
    labelled: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)

    def text(self) -> str:
        failed = ", ".join(f"{k}: {v}" for k, v in self.failed.most_common()) or "none"
        cost = sum(u["cost_usd"] for u in self.usage.values())
        tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in self.usage.values())
        return (f"labelled {self.labelled} of {self.sampled} sampled rows ({self.already_labelled} from an earlier "
                f"run) in {self.seconds:.1f} s; failed: {failed}; {tokens} tokens, ${cost:.4f}")


async def _label_chunk(client: ChatClient, chunk: list[dict], categories: list[str]) -> list[dict]:
    # a refusal by the budget fails its row: the rest of the chunk was paid for, and is written before stopping
    results = await asyncio.gather(*(unless_refused(label_task(client, r["instruction"], r["input"], categories))
                                     for r in chunk))
    rows = []
    for row, result in zip(chunk, results):
        failed = isinstance(result, RequestFailed)
        rows.append({"id": row["id"], "instruction": row["instruction"], "input": row["input"],
                     "task": None if failed else result, "status": "failed" if failed else "ok",
                     "error": f"{result.reason}: {result.detail}" if failed else None})
    return rows


async def label_sample(config: RunConfig, endpoint: OpenEndpoint, pool: pa.Table, progress: bool = True,
                       limits: Optional[Limits] = None) -> LabelSummary:
    """`limits`: the run's, when a command holds them (`tapir run`); without, this process books the calls
    under the run's budget and spend record itself."""
    started = time.perf_counter()
    out = labels_location(config)
    out.makedirs()
    sample = sample_rows(pool, config.classifier.label_sample_size, config.curriculum.seed)
    done = _answered_ids(read_labels(out))
    todo = [r for r in sample.select(["id", "instruction", "input"]).to_pylist() if r["id"] not in done]
    summary = LabelSummary(sampled=sample.num_rows, already_labelled=sample.num_rows - len(todo))
    categories = list(config.curriculum.task_targets)
    limits = limits or local_limits([config.teacher], config.max_cost_usd, spend_record(config))
    next_part = len(out.list_files(".parquet"))
    bar = tqdm(total=len(todo), unit=" rows", desc="label", disable=not progress)
    async with ChatClient(config.teacher, endpoint.base_url, endpoint.api_key, limits, endpoint.model) as client:
        for start in range(0, len(todo), _CHUNK_ROWS):
            rows = await _label_chunk(client, todo[start:start + _CHUNK_ROWS], categories)
            store.write_parquet(out, f"part-{next_part:05d}.parquet", pa.Table.from_pylist(rows, LABEL_SCHEMA))
            next_part += 1
            refused = [row["error"] for row in rows if (row["error"] or "").startswith(f"{BUDGET_REFUSED}: ")]
            if refused:
                raise BudgetExceeded(refused[0].removeprefix(f"{BUDGET_REFUSED}: "))
            for row in rows:
                if row["status"] == "ok":
                    summary.labelled += 1
                else:
                    summary.failed[row["error"].split(":", 1)[0]] += 1
            bar.update(len(rows))
    bar.close()
    summary.usage = {stage: usage for stage, usage in (await limits.usage_by_stage()).items() if stage == "label"}
    summary.seconds = time.perf_counter() - started
    store.write_json(out, store.MANIFEST, {"stage": "label", "sampled": summary.sampled, "labelled_now": summary.labelled,
                                            "failed_now": dict(summary.failed), "usage": summary.usage,
                                            "wall_s": round(summary.seconds, 2)})
    return summary
