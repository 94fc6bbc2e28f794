"""The scoring round's endpoint stages (teacher answers, pairwise judge) over real HTTP, and its input checks."""
import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.config import EndpointConfig, RunConfig, ScoringConfig
from pipeline.difficulty import verdicts
from pipeline.llm.carried import carried_replies
from pipeline.llm.emulated_api import EmulatedAPI, Faults
from pipeline.llm.shared_limits import local_limits
from pipeline.pool import PoolImportError, check_shards
from pipeline.schema import POOL_SCHEMA
from pipeline.scoring import needs_teacher, summarise, summary_rows
from pipeline.stages.judge import PairJudge
from pipeline.stages.teacher import TeacherAnswer

KEY_ENV = "TAPIR_TEST_STAGE_KEY"


def endpoint(api: EmulatedAPI, **overrides) -> EndpointConfig:
    return EndpointConfig(kind="remote", base_url=api.base_url, model="teacher", api_key_env=KEY_ENV,
                          **{"max_attempts": 2, "timeout_s": 5, **overrides})


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def pool_rows(outputs: list[str]) -> pa.Table:
    return rows_table([{"id": f"r{i}", "instruction": f"Question {i}?", "input": "", "output": o}
                       for i, o in enumerate(outputs)])


def run_stage(monkeypatch, make_stage, batch: pa.Table, **api_options) -> tuple[pa.Table, int]:
    """Runs a stage's batch against a fresh loopback API; returns the batch out and the calls answered."""
    async def scenario():
        async with EmulatedAPI(**api_options) as api:
            monkeypatch.setenv(KEY_ENV, api.api_key)
            config = endpoint(api)
            stage = make_stage(config, api.base_url, local_limits([config], None))
            out = await stage(batch)
            await (await stage.client()).__aexit__(None, None, None)
            return out, api.stats.answered

    return asyncio.run(scenario())


def teacher(keep_reference_outputs: bool):
    return lambda config, url, limits: TeacherAnswer(config, url, "teacher", limits, ScoringConfig(),
                                                     keep_reference_outputs=keep_reference_outputs)


def judge(config, url, limits):
    return PairJudge(config, url, "judge", limits)


def test_teacher_keeps_reference_outputs_and_answers_only_the_rest(monkeypatch):
    out, answered = run_stage(monkeypatch, teacher(True), pool_rows(["Paris.", "", "42"]))
    assert answered == 1                                            # only the row without a reference
    assert out.column("teacher_source").to_pylist() == ["reference", "teacher", "reference"]
    assert out.column("teacher_response").to_pylist()[0] == "Paris."
    assert out.column("teacher_response").to_pylist()[1]            # the teacher's own answer
    assert out.column("teacher_completion_tokens").to_pylist()[1] > 0
    assert out.column("teacher_status").to_pylist() == ["ok"] * 3
    assert out.column("id").to_pylist() == ["r0", "r1", "r2"]       # rows kept, in order


def test_a_round_whose_rows_all_keep_their_reference_needs_no_teacher(tmp_path):
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")}, "curriculum": {
        "difficulty": "ifd"}, "classifier": {"labels_path": "bundled:sample"}})
    pool = store.locate(str(tmp_path / "pool"))
    store.write_parquet(pool, "part-00000.parquet", pool_rows(["Paris.", "42"]))
    assert not needs_teacher(config, 0, pool)
    # ... and its teacher stage, given no endpoint at all, answers every row from the pool without a call
    stage = TeacherAnswer(EndpointConfig(kind="remote", base_url="http://127.0.0.1:9/v1", model="teacher",
                                         api_key_env=KEY_ENV), None, "teacher", None, ScoringConfig(), True)
    out = asyncio.run(stage(pool_rows(["Paris.", "42"])))
    assert out.column("teacher_source").to_pylist() == ["reference"] * 2 and stage._client is None

    # a row without a reference (seen in one file's footer), references not kept, or labels to ask for: needed
    store.write_parquet(pool, "part-00001.parquet", pool_rows([None, "7"]))     # as the import stores no answer
    assert needs_teacher(config, 0, pool)
    one_file = store.locate(str(tmp_path / "one"))
    store.write_parquet(one_file, "part-00000.parquet", pool_rows(["Paris.", "42"]))
    unkept = config.model_copy(update={"curriculum": config.curriculum.model_copy(
        update={"keep_reference_outputs": False})})
    assert needs_teacher(unkept, 0, one_file)
    unlabelled = config.model_copy(update={"classifier": config.classifier.model_copy(update={"labels_path": None})})
    assert needs_teacher(unlabelled, 0, one_file) and not needs_teacher(unlabelled, 1, one_file)
    # a file whose footer has no statistics cannot say it has no null: the teacher is counted as needed
    pq.write_table(pool_rows(["Paris.", "42"]), tmp_path / "one" / "part-00001.parquet", write_statistics=False)
    assert needs_teacher(config, 0, one_file)


def test_teacher_answers_everything_when_references_are_not_kept(monkeypatch):
    out, answered = run_stage(monkeypatch, teacher(False), pool_rows(["Paris.", "42"]))
    assert answered == 2 and out.column("teacher_source").to_pylist() == ["teacher", "teacher"]


def test_a_row_the_teacher_cannot_answer_is_kept_with_its_reason(monkeypatch):
    out, _ = run_stage(monkeypatch, teacher(False), pool_rows(["x"]), faults=Faults(server_error=1.0))
    row = out.to_pylist()[0]
    assert row["teacher_status"] == "http_500" and "500" in row["teacher_error"]
    assert row["teacher_response"] is None and row["id"] == "r0"


def judged_rows() -> pa.Table:
    base = {"instruction": "Explain tides.", "input": "", "teacher_response": "TEACHER says",
            "student_response": "STUDENT says", "student_status": "ok", "student_error": None,
            "teacher_status": "ok", "teacher_error": None}
    return rows_table([
        {**base, "id": "both"},
        {**base, "id": "long", "student_response": None, "student_status": "too_long",
         "student_error": "prompt of 3000 tokens"},
        {**base, "id": "no-teacher", "teacher_response": None, "teacher_status": "timeout",
         "teacher_error": "no answer"},
    ])


def position_biased_judge(body: dict) -> str:
    """Prefers the teacher (8 vs 4) and adds +1 to whichever answer comes first."""
    prompt = body["messages"][0]["content"]
    teacher_first = prompt.index("TEACHER") < prompt.index("STUDENT")
    return json.dumps({"score_1": 9, "score_2": 4} if teacher_first else {"score_1": 5, "score_2": 8})


def test_judge_scores_rows_with_both_answers_and_passes_upstream_failures_on(monkeypatch):
    out, answered = run_stage(monkeypatch, judge, judged_rows(), reply=position_biased_judge)
    assert answered == 2                                  # both orders of the one judgeable row, nothing else
    rows = {r["id"]: r for r in out.to_pylist()}
    assert (rows["both"]["teacher_score"], rows["both"]["student_score"], rows["both"]["mfd"]) == (8.5, 4.5, 4.0)
    assert rows["both"]["status"] == "ok" and rows["both"]["judge_prompt_tokens"] > 0
    assert rows["long"]["status"] == "student_too_long" and "3000" in rows["long"]["error"]
    assert rows["no-teacher"]["status"] == "teacher_timeout" and rows["no-teacher"]["mfd"] is None


def test_an_unreadable_verdict_fails_the_row_not_the_batch(monkeypatch):
    out, _ = run_stage(monkeypatch, judge, judged_rows(), reply=lambda body: "no idea")
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows["both"]["status"] == "judge_unparseable" and "no idea" in rows["both"]["error"]
    assert len(rows) == 3


def write_shard(directory, name: str, table: pa.Table) -> None:
    pq.write_table(table, directory / name)


def test_pool_shards_are_checked_before_any_work_naming_the_shard(tmp_path):
    good = pa.Table.from_pylist([{"id": "a", "instruction": "Hi", "input": "", "output": "", "source": "x:1",
                                  "meta": "{}"}], POOL_SCHEMA)
    write_shard(tmp_path, "part-00000.parquet", good)
    assert check_shards(store.locate(str(tmp_path))) == 1

    write_shard(tmp_path, "part-00001.parquet", good.drop_columns(["input"]))
    with pytest.raises(PoolImportError, match=r"part-00001\.parquet: pool file lacks column\(s\) input"):
        check_shards(store.locate(str(tmp_path)))

    (tmp_path / "part-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PoolImportError, match=r"part-00001\.parquet: unreadable pool file"):
        check_shards(store.locate(str(tmp_path)))


def test_an_empty_pool_or_a_directory_without_shards_stops_with_its_path(tmp_path):
    with pytest.raises(PoolImportError, match="no pool shards"):
        check_shards(store.locate(str(tmp_path)))
    write_shard(tmp_path, "part-00000.parquet", POOL_SCHEMA.empty_table())
    with pytest.raises(PoolImportError, match="the pool is empty"):
        check_shards(store.locate(str(tmp_path)))


def scored(ids: list[str], statuses: list[str], mfds: list) -> pa.Table:
    """Rows as the judge stage writes them, with their verdicts and usage (scoring.summary_rows)."""
    config = RunConfig()
    n = len(ids)
    rows = pa.table({"id": ids, "status": statuses, "error": pa.nulls(n, pa.string()),
                     "mfd": pa.array(mfds, pa.float32()), "student_tokens": [10] * n,
                     "teacher_prompt_tokens": [100] * n, "teacher_completion_tokens": [50] * n,
                     "judge_prompt_tokens": [1000] * n, "judge_completion_tokens": [20] * n})
    return summary_rows(verdicts(config, rows), rows, None)


def test_the_summary_counts_failures_tokens_and_cost_and_flags_duplicates():
    config = RunConfig.model_validate({"teacher": {"price": {"input_per_million_usd": 1.0,
                                                             "output_per_million_usd": 2.0}}})
    summary = summarise(config, 0, 3, scored(["a", "b", "c"], ["ok", "ok", "student_too_long"], [2.0, 0.5, None]),
                        [], {}, {"wall_s": 1.0})
    assert summary["complete"] and summary["rows_ok"] == 2 and summary["failed"] == {"student_too_long": 1}
    assert summary["hard_rows"] == 1 and summary["difficulty"]["mean"] == 1.25
    assert summary["difficulty"]["measure"] == "mfd" and summary["judge_requests_per_row"] == 2.0
    assert summary["tokens"]["teacher"] == {"prompt": 300, "completion": 150}
    # the judge defaults to the teacher, so it is billed at the teacher's price too
    assert summary["cost_usd"]["total"] == pytest.approx((300 + 3000) / 1e6 + 2 * (150 + 60) / 1e6)

    twice = summarise(config, 0, 3, scored(["a", "a", "b"], ["ok"] * 3, [1.0] * 3), [], {}, {"wall_s": 1.0})
    assert not twice["complete"] and twice["duplicate_rows"] == 1


def test_verdicts_and_usage_stay_with_their_rows_through_a_large_round():
    """More rows than the driver turns into Python objects at once (difficulty._BATCH_ROWS): the verdicts keep the
    scored rows' order, so each row's usage is taken by position, and the summary counts every row."""
    config = RunConfig()
    n = 70_001
    failed = [k % 7 == 0 for k in range(n)]
    mfds = [None if bad else float(k % 9 - 4) for k, bad in enumerate(failed)]
    rows = pa.table({"id": [f"r{(k * 7919) % n:06d}" for k in range(n)],
                     "status": ["judge_unparseable" if bad else "ok" for bad in failed],
                     "error": [("no score in the reply" if bad else None) for bad in failed],
                     "mfd": pa.array(mfds, pa.float32()), "student_tokens": list(range(n)),
                     "teacher_prompt_tokens": list(range(n)), "teacher_completion_tokens": [1] * n,
                     "judge_prompt_tokens": [2 * k for k in range(n)], "judge_completion_tokens": [1] * n})
    table = summary_rows(verdicts(config, rows), rows, None)
    assert table.column("id").to_pylist() == rows.column("id").to_pylist()
    expected = [None if mfd is None else mfd >= config.curriculum.mfd_threshold for mfd in mfds]
    assert table.column("hard").to_pylist() == expected
    assert table.column("judge_prompt_tokens").to_pylist() == [2 * k for k in range(n)]
    summary = summarise(config, 0, n, table, [], {}, {})
    assert summary["complete"] and summary["failed"] == {"judge_unparseable": sum(failed)}
    assert summary["hard_rows"] == sum(v is True for v in expected)
    assert summary["easy_rows"] == sum(v is False for v in expected)
    assert summary["tokens"]["teacher"] == {"prompt": n * (n - 1) // 2, "completion": n}
    assert summary["difficulty"]["rows"] == n - sum(failed)


def test_a_budget_or_key_error_inside_a_stage_reaches_the_user_unwrapped():
    from pipeline.jobs import stopping_cause
    from pipeline.llm.limits import BudgetExceeded

    budget = BudgetExceeded("the next request could take the run past max_cost_usd=$1.00")
    try:
        try:
            raise budget
        except BudgetExceeded as err:
            raise RuntimeError("UDF failed to process a data block") from err    # as Ray Data wraps it
    except RuntimeError as wrapped:
        assert stopping_cause(wrapped) is budget
    assert stopping_cause(RuntimeError("a bug")) is None


def test_a_batch_the_budget_stops_keeps_the_answers_it_paid_for_and_leaves_the_rest_for_the_next_command(
        monkeypatch):
    """A refusal inside a stage threw the whole batch away, answers already paid for included."""
    price = {"input_per_million_usd": 10_000.0, "output_per_million_usd": 10_000.0}

    async def scenario():
        async with EmulatedAPI(latency_s=0.05) as api:
            monkeypatch.setenv(KEY_ENV, api.api_key)
            config = endpoint(api, price=price, max_concurrency=2)
            # a worst case (max_tokens 512) is about $5.2, an answer about $0.75: the cap stops it part-way
            limits = local_limits([config], max_cost_usd=16.0)
            stage = teacher(False)(config, api.base_url, limits)
            out = await stage(pool_rows([""] * 12))
            await (await stage.client()).__aexit__(None, None, None)
            return out, api, limits

    out, api, limits = asyncio.run(scenario())
    assert 0 < out.num_rows == api.stats.answered < 12                 # every paid answer is in the output
    assert set(out.column("teacher_status").to_pylist()) == {"ok"}
    assert limits.limits.refusal                                       # and the job stops after writing them


def test_rows_the_budget_refuses_to_judge_are_judged_by_the_next_command_without_paying_any_call_twice(
        monkeypatch, tmp_path):
    """A judge call refused by the budget left its row out, and the next command paid for its teacher answer
    and the other judge order again."""
    price = {"input_per_million_usd": 10_000.0, "output_per_million_usd": 10_000.0}
    scoring = ScoringConfig(teacher_max_tokens=16)
    carried = carried_replies(store.locate(str(tmp_path)))
    rows = pool_rows([""] * 8)

    def student_answers(table: pa.Table) -> pa.Table:
        return table.append_column("student_response", pa.array(["STUDENT says"] * table.num_rows)).append_column(
            "student_status", pa.array(["ok"] * table.num_rows)).append_column(
            "student_error", pa.array([None] * table.num_rows, pa.string()))

    async def command(api: EmulatedAPI, rows: pa.Table, max_cost_usd) -> tuple[pa.Table, object]:
        config = endpoint(api, price=price, max_concurrency=2)
        limits = local_limits([config], max_cost_usd=max_cost_usd)
        teacher_stage = TeacherAnswer(config, api.base_url, "teacher", limits, scoring, False, carried)
        judge_stage = PairJudge(config, api.base_url, "teacher", limits, carried, ("teacher", scoring))
        answered = await teacher_stage(rows)
        out = await judge_stage(student_answers(answered))
        for stage in (teacher_stage, judge_stage):
            await (await stage.client()).__aexit__(None, None, None)
        return out, limits

    async def scenario():
        def teacher_or_judge(body: dict) -> str:
            prompt = body["messages"][0]["content"]
            return position_biased_judge(body) if "STUDENT" in prompt else "TEACHER says " + prompt

        async with EmulatedAPI(latency_s=0.02, reply=teacher_or_judge) as api:
            monkeypatch.setenv(KEY_ENV, api.api_key)
            first, limits = await command(api, rows, max_cost_usd=16.0)
            left = rows.filter(pa.compute.invert(pa.compute.is_in(rows.column("id"), first.column("id"))))
            second, _ = await command(api, left, max_cost_usd=None)
            return first, limits, left, second, api.stats

    first, limits, left, second, stats = asyncio.run(scenario())
    assert limits.limits.refusal and 0 < left.num_rows < 8
    assert set(second.column("status").to_pylist()) == {"ok"} and second.num_rows == left.num_rows
    assert max(stats.answered_prompts.values()) == 1              # no call was paid twice
    assert stats.answered == 8 * 3                                # one teacher answer and two judge orders a row
    assert not carried.keys()                                     # each kept reply was used once
