"""The relabel stage: rows the classifier is unsure of (confidence under the threshold) get the teacher's label.

Rows at or above the threshold pass through untouched, with no call. A row the teacher cannot label keeps
the classifier's label, and `task_error` says why. A row refused by the budget is left out (endpoint_stage).
"""
from __future__ import annotations

import asyncio

import pyarrow as pa

from pipeline.config import EndpointConfig
from pipeline.llm.client import RequestFailed, unless_refused
from pipeline.llm.judge import label_task
from pipeline.stages.columns import check_columns
from pipeline.stages.endpoint_stage import EndpointStage, paid_rows, refused_rows

REQUIRED_COLUMNS = ("instruction", "input", "task", "task_confidence")


class TeacherRelabel(EndpointStage):
    """Async Ray Data callable class over the teacher endpoint."""

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits, categories: list[str],
                 threshold: float):
        super().__init__(endpoint, base_url, model, limits, "teacher")
        self.categories, self.threshold = categories, threshold

    async def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "relabel")
        client = await self.client()
        rows = batch.to_pylist()
        unsure = [r for r in rows if r["task_confidence"] < self.threshold]
        answers = await asyncio.gather(*(unless_refused(label_task(
            client, r["instruction"], r["input"] or "", self.categories, stage="relabel")) for r in unsure))
        by_id = {id(r): a for r, a in zip(unsure, answers)}
        refused = refused_rows({i: by_id.get(id(row)) for i, row in enumerate(rows)})
        tasks, sources, errors = [], [], []
        for row in rows:
            answer = by_id.get(id(row))
            task, source, error = row["task"], "classifier", None
            if isinstance(answer, RequestFailed):
                error = f"{answer.reason}: {answer.detail}"
            elif answer is not None:
                task, source = answer, "teacher"
            tasks.append(task)
            sources.append(source)
            errors.append(error)
        batch = batch.set_column(batch.column_names.index("task"), "task", pa.array(tasks, pa.string()))
        return paid_rows(batch.append_column("task_source", pa.array(sources, pa.string())).append_column(
            "task_error", pa.array(errors, pa.string())), refused)
