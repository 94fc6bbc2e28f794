"""The judge stage: the judge scores teacher vs student in both orders → `teacher_score`, `student_score`, `mfd`.

It is the round's last stage, so it also sets the row's `status`/`error`: `ok`, or the first stage that
could not finish the row and why (`student_too_long`, `teacher_timeout`, `judge_unparseable`, …).
Rows without both answers are not sent to the judge.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import pyarrow as pa

from pipeline.config import EndpointConfig, ScoringConfig
from pipeline.llm.carried import CarriedReplies
from pipeline.llm.client import ChatReply, RequestFailed, unless_refused
from pipeline.llm.judge import PairScores, judge_pair
from pipeline.stages.columns import check_columns, with_columns
from pipeline.stages.endpoint_stage import EndpointStage, endpoint_stage_options, paid_rows, refused_rows
from pipeline.stages.teacher import teacher_request

REQUIRED_COLUMNS = ("id", "instruction", "input", "student_response", "student_status", "student_error",
                    "teacher_response", "teacher_status", "teacher_error")
# what the teacher stage says of its answer's cost, kept with the answer when the budget refuses its judging
TEACHER_PAID_COLUMNS = ("teacher_source", "teacher_prompt_tokens", "teacher_completion_tokens")


def upstream_failure(row: dict) -> Optional[tuple[str, str]]:
    """(status, error) of the first stage that failed the row, or None when both answers are there."""
    for stage in ("student", "teacher"):
        if row[f"{stage}_status"] != "ok":
            return f"{stage}_{row[f'{stage}_status']}", row[f"{stage}_error"]
    return None


class PairJudge(EndpointStage):
    """Async Ray Data callable class over the judge endpoint."""

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits,
                 carried: Optional[CarriedReplies] = None, teacher: Optional[tuple[str, ScoringConfig]] = None):
        """`teacher`: the teacher's model and scoring settings, to keep the paid answer of a row the budget
        refuses to judge (see endpoint_stage)."""
        super().__init__(endpoint, base_url, model, limits, "judge", carried)
        self.teacher = teacher

    async def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "judge")
        rows = batch.select(list(REQUIRED_COLUMNS) + [c for c in TEACHER_PAID_COLUMNS if c in batch.column_names]
                            ).to_pylist()
        client = await self.client()
        judged = [i for i, row in enumerate(rows) if upstream_failure(row) is None]

        verdicts = dict(zip(judged, await asyncio.gather(*(unless_refused(
            judge_pair(client, rows[i]["instruction"], rows[i]["input"] or "", rows[i]["teacher_response"],
                       rows[i]["student_response"])) for i in judged))))
        teacher, student, mfd, prompt_tokens, completion_tokens, status, error = ([] for _ in range(7))
        for i, row in enumerate(rows):
            verdict = verdicts.get(i)
            if isinstance(verdict, PairScores):
                values = (verdict.teacher_score, verdict.student_score, verdict.mfd, verdict.prompt_tokens,
                          verdict.completion_tokens, "ok", None)
            elif isinstance(verdict, RequestFailed):
                values = (None, None, None, 0, 0, f"judge_{verdict.reason}", str(verdict))
            else:
                values = (None, None, None, 0, 0, *upstream_failure(row))
            for column, value in zip((teacher, student, mfd, prompt_tokens, completion_tokens, status, error), values):
                column.append(value)
        refused = refused_rows(verdicts)
        self._keep_teacher_answers([rows[i] for i in sorted(refused)])
        return paid_rows(with_columns(batch, {
            "teacher_score": pa.array(teacher, pa.float32()), "student_score": pa.array(student, pa.float32()),
            "mfd": pa.array(mfd, pa.float32()), "judge_prompt_tokens": pa.array(prompt_tokens, pa.int32()),
            "judge_completion_tokens": pa.array(completion_tokens, pa.int32()),
            "status": pa.array(status, pa.string()), "error": pa.array(error, pa.string())}), refused)

    def _keep_teacher_answers(self, rows: list[dict]) -> None:
        """The next command asks these rows again, teacher included: the answers paid this round wait for it."""
        if self.carried is None or self.teacher is None:
            return
        model, scoring = self.teacher
        for row in rows:
            if row.get("teacher_source") == "teacher":
                self.carried.keep(model, teacher_request(row, scoring), ChatReply(
                    row["teacher_response"], None, row["teacher_prompt_tokens"], row["teacher_completion_tokens"], 1))


def judged(dataset, endpoint: EndpointConfig, base_url: str, model: str, limits, scoring: ScoringConfig,
           carried: Optional[CarriedReplies] = None, teacher_model: Optional[str] = None):
    return dataset.repartition(target_num_rows_per_block=scoring.batch_size).map_batches(
        PairJudge, fn_constructor_kwargs={
            "endpoint": endpoint, "base_url": base_url, "model": model, "limits": limits, "carried": carried,
            "teacher": (teacher_model, scoring) if teacher_model else None}, **endpoint_stage_options(scoring))
