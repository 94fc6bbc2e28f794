"""The curriculum math without Ray: hard share per round, task quotas, the cap on copies, exact sizes, determinism,
edge cases; and the planner's steps on a run directory (still without Ray)."""
import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import expansion, planning, store
from pipeline.config import DEFAULT_TASK_TARGETS, CurriculumConfig, RunConfig
from pipeline.curriculum import (
    UNLISTED,
    baseline_copies,
    hard_share,
    is_hard,
    plan_round,
    quotas,
    rank_verdicts,
    resample,
    total_variation,
)
from pipeline.difficulty import band_ids, verdicts, write_verdicts
from pipeline.scoring import score_location, summarise, summary_rows


def by_mfd(mfd: list) -> list:
    """Verdicts as the judge gives them, with δ = 1."""
    return [is_hard(value, 1.0) for value in mfd]


def test_the_hard_share_rises_by_beta_each_round_up_to_one():
    assert [hard_share(r, 0.5, 0.25) for r in range(4)] == [0.5, 0.75, 1.0, 1.0]
    assert is_hard(1.5, 1.0) and is_hard(0.5, 1.0) is False and is_hard(None, 1.0) is None
    assert is_hard(1.0, 1.0) is True               # Lion counts a gap of exactly δ as hard; MFD moves in 0.5 steps
    assert is_hard(float("nan"), 1.0) is None
    assert is_hard(np.float32("nan"), 1.0) is None and is_hard(np.float32(2.0), 1.0)       # as numpy gives it


def test_quotas_sum_exactly_and_give_an_empty_or_full_categorys_share_to_the_others():
    targets = {"Math": 0.5, "Code": 0.3, "Art": 0.2}
    assert quotas(targets, {"Math": 10, "Code": 10, "Art": 10}, 10) == {"Math": 5, "Code": 3, "Art": 2}
    assert sum(quotas(targets, {"Math": 7, "Code": 7, "Art": 7}, 7).values()) == 7
    # no Art rows: its 0.2 goes to Math and Code in proportion 5:3
    assert quotas(targets, {"Math": 10, "Code": 10}, 8) == {"Math": 5, "Code": 3}
    # Math can take only 2: the rest is shared 3:2 between Code and Art
    assert quotas(targets, {"Math": 2, "Code": 10, "Art": 10}, 10) == {"Math": 2, "Code": 5, "Art": 3}
    # less room than rows wanted: every category full, and no more
    assert quotas(targets, {"Math": 1, "Code": 1, "Art": 1}, 7) == {"Math": 1, "Code": 1, "Art": 1}


def test_resampling_down_samples_full_categories_and_repeats_thin_ones():
    by_task = {"Math": [0, 1], "Code": list(range(2, 102))}
    chosen = resample(by_task, {"Math": 0.5, "Code": 0.5}, 20, max_copies=5, rng=random.Random(0))
    mix = Counter("Math" if i < 2 else "Code" for i in chosen)
    assert mix == {"Math": 10, "Code": 10}
    assert Counter(i for i in chosen if i < 2) == {0: 5, 1: 5}     # every thin row kept, then repeated evenly
    code = [i for i in chosen if i >= 2]
    assert len(set(code)) == len(code)                            # down-sampled without replacement


def test_a_round_plan_mixes_hard_and_easy_at_alpha_with_the_exact_size():
    rng = random.Random(3)
    tasks = [rng.choice(["Math", "Reasoning", "Writing"]) for _ in range(300)]
    mfd = [rng.uniform(-2, 4) if i % 10 else None for i in range(300)]
    targets = {"Math": 0.5, "Reasoning": 0.3, "Writing": 0.2}
    plan = plan_round(tasks, by_mfd(mfd), 1, 100, 0.5, 0.25, targets, seed=7, max_copies=3)
    assert len(plan.indices) == 100 and plan.hard_share_target == 0.75 and plan.warnings() == []
    assert (plan.hard_rows_planned, plan.easy_rows_planned) == (75, 25)
    assert plan.unscored_rows == 30
    assert all(mfd[i] is not None for i in plan.indices)
    assert sum(mfd[i] >= 1.0 for i in plan.indices) == 75
    assert plan == plan_round(tasks, by_mfd(mfd), 1, 100, 0.5, 0.25, targets, seed=7, max_copies=3)   # deterministic
    assert plan.indices != plan_round(tasks, by_mfd(mfd), 1, 100, 0.5, 0.25, targets, seed=8, max_copies=3).indices
    assert total_variation(plan.task_mix, targets) < 0.02


def test_without_hard_rows_the_easy_part_fills_the_round():
    plan = plan_round(["Math"] * 5, [False] * 5, 0, 8, 0.5, 0.25, {"Math": 1.0}, seed=0, max_copies=3)
    assert len(plan.indices) == 8 and plan.hard_rows_planned == 0 and plan.easy_rows_planned == 8


def test_task_resampling_on_the_alpaca_pool_moves_the_mix_toward_the_target(shared_data):
    # Alpaca has no task labels; a keyword labelling stands in, so the test is about resampling, not labels
    rows = [json.loads(line) for line in (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()]
    words = {"Math": ("calculate", "number", "sum"), "Code Generation": ("code", "program", "function"),
             "Writing": ("write", "story", "poem"), "Paraphrase": ("rewrite", "paraphrase")}
    tasks = [next((t for t, keys in words.items() if any(k in r["instruction"].lower() for k in keys)), "Others")
             for r in rows]
    targets = CurriculumConfig().task_targets
    before = total_variation(Counter(tasks), targets)
    plan = plan_round(tasks, [True] * len(tasks), 0, 1000, 1.0, 0.0, targets, seed=0, max_copies=1000)
    # the categories with rows share the whole target between them, in proportion
    present = {t: s for t, s in DEFAULT_TASK_TARGETS.items() if t in set(tasks)}
    reachable = {t: s / sum(present.values()) for t, s in present.items()}
    assert len(plan.indices) == 1000
    assert total_variation(plan.task_mix, reachable) < 0.005 < 0.1 < total_variation(Counter(tasks), reachable)
    assert before > 0.5


def test_expansion_seeds_split_by_the_hard_share_and_cycle_through_every_seed():
    from pipeline.curriculum import expansion_seeds

    hard, easy = ["h1", "h2", "h3"], [f"e{i}" for i in range(10)]
    seeds = expansion_seeds(hard, easy, 10, 0.75, round_index=1, seed=0)
    assert Counter(d for _, d in seeds) == {"hard": 8, "easy": 2}
    hard_seeds = Counter(s for s, d in seeds if d == "hard")
    assert set(hard_seeds) == set(hard) and max(hard_seeds.values()) - min(hard_seeds.values()) <= 1
    assert seeds == expansion_seeds(hard, easy, 10, 0.75, round_index=1, seed=0)        # deterministic
    assert seeds != expansion_seeds(hard, easy, 10, 0.75, round_index=1, seed=1)
    # a side with no seeds gives its requests to the other; nothing at all without seeds
    assert Counter(d for _, d in expansion_seeds([], easy, 5, 0.75, 0, 0)) == {"easy": 5}
    assert Counter(d for _, d in expansion_seeds(hard, [], 5, 0.25, 0, 0)) == {"hard": 5}
    assert expansion_seeds([], [], 5, 0.5, 0, 0) == []


def test_the_baseline_draws_its_rows_at_random_without_repeats_until_the_pool_runs_out():
    few = baseline_copies(count=100, size=30, seed=3)
    assert sum(few.values()) == 30 and set(few.values()) == {1} and all(0 <= i < 100 for i in few)
    assert few == baseline_copies(count=100, size=30, seed=3) != baseline_copies(count=100, size=30, seed=4)
    # not the first rows, nor any order the pool happens to have
    assert sorted(few) != list(range(30))
    more = baseline_copies(count=10, size=25, seed=3)
    assert sum(more.values()) == 25 and set(more) == set(range(10)) and sorted(Counter(more.values())) == [2, 3]
    assert Counter(more.values()) == {2: 5, 3: 5}
    assert baseline_copies(count=0, size=5, seed=1) == Counter() == baseline_copies(count=5, size=0, seed=1)


def plan_of(tasks, mfd, size=48, round_index=1, start=0.5, step=0.25, targets=None, max_copies=3):
    return plan_round(tasks, by_mfd(mfd), round_index, size, start, step, targets or {"Math": 0.5, "Writing": 0.5},
                      seed=0, max_copies=max_copies)


def test_one_hard_row_is_not_copied_past_the_cap_and_the_missed_hard_share_is_reported():
    # the case seen on the demo: one hard row filled 36 of 48 planned rows
    tasks = ["Math"] * 30 + ["Writing"] * 30
    plan = plan_of(tasks, [2.0] + [0.0] * 59)
    assert len(plan.indices) == 48 and max(Counter(plan.indices).values()) <= 3
    assert (plan.hard_rows_planned, plan.easy_rows_planned) == (3, 45)
    assert plan.hard_share_target == 0.75 and plan.hard_share_planned == 0.062
    assert plan.warnings() == ["hard share planned 0.062, target 0.750: only 1 row scored hard, at most 3 copies "
                               "of a row (curriculum.max_copies_per_row)"]


def test_a_thin_task_category_is_repeated_up_to_the_cap_and_the_rest_goes_to_the_others():
    tasks = ["Math"] + ["Writing"] * 100
    plan = plan_of(tasks, [0.0] * 101, size=40, round_index=0, start=0.0)
    assert Counter(tasks[i] for i in plan.indices) == {"Math": 3, "Writing": 37}
    assert Counter(plan.indices)[0] == 3 and plan.warnings() == []


def test_a_pool_too_small_for_the_round_gives_a_shorter_plan_and_says_so():
    plan = plan_of(["Math", "Writing"], [2.0, 0.0], size=10)
    assert len(plan.indices) == 6 and set(Counter(plan.indices).values()) == {3}
    assert plan.warnings()[0] == ("planned 6 of 10 rows: 1 row scored hard and 1 row easy, at most 3 copies of a "
                                  "row (curriculum.max_copies_per_row)")


def test_legal_edge_cases_plan_without_crashing():
    tasks = ["Math"] * 10
    # α = 1: every row from the hard part
    full = plan_of(tasks, [2.0] * 5 + [0.0] * 5, size=8, start=1.0)
    assert (full.hard_rows_planned, full.easy_rows_planned) == (8, 0) and full.warnings() == []
    # no easy rows: the hard part fills the round
    hard_only = plan_of(tasks, [3.0] * 10, size=8, round_index=0)
    assert (hard_only.hard_rows_planned, hard_only.easy_rows_planned) == (8, 0)
    # every row one task, under a target table of many: that task takes the whole round
    one_task = plan_of(tasks, [0.0, 2.0] * 5, size=8, targets=dict(DEFAULT_TASK_TARGETS))
    assert one_task.task_mix == {"Math": 8}
    # nothing scored ok: an empty plan, said so
    nothing = plan_of(tasks, [None] * 10, size=8)
    assert nothing.indices == [] and nothing.unscored_rows == 10 and nothing.hard_share_planned is None
    assert nothing.warnings() == ["planned 0 of 8 rows: 0 rows scored hard and 0 rows easy, at most 3 copies of a "
                                  "row (curriculum.max_copies_per_row)"]


def test_rows_of_tasks_outside_the_targets_are_planned_as_others_and_counted():
    tasks = ["Math"] * 20 + ["Mystery"] * 20
    mfd = [0.0] * 40
    with_others = plan_of(tasks, mfd, size=20, start=0.0, step=0.0, targets={"Math": 0.5, "Others": 0.5})
    assert with_others.rows_outside_targets == 20 and with_others.task_mix == {"Math": 10, "Mystery": 10}
    # without an Others category they form one with the smallest listed share (here Writing's 0.2, a quarter of
    # the present Math + unlisted total)
    without = plan_of(tasks, mfd, size=20, start=0.0, step=0.0, targets={"Math": 0.6, "Writing": 0.2, "Art": 0.2})
    assert without.rows_outside_targets == 20 and without.task_mix == {"Math": 15, "Mystery": 5}
    assert UNLISTED not in without.task_mix


def test_a_gap_of_exactly_delta_is_hard_in_the_plan():
    plan = plan_of(["Math"] * 4, [1.0, 1.0, 0.5, None], size=4, round_index=0)
    assert (plan.hard_rows_available, plan.easy_rows_available, plan.unscored_rows) == (2, 1, 1)


def scored_round(tmp_path, mfd: list, statuses: list, **curriculum) -> RunConfig:
    """A run directory whose round 0 holds scored rows, as the score stage writes them."""
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")},
                                       "curriculum": {"task_targets": {"Math": 1.0}, **curriculum}})
    n = len(mfd)
    scored = pa.table({
        "id": [f"r{i:02d}" for i in range(n)], "instruction": [f"Question {i}?" for i in range(n)],
        "input": [""] * n, "output": [f"Answer {i}." for i in range(n)], "task": ["Math"] * n,
        "mfd": pa.array(mfd, pa.float32()), "status": statuses,
        "error": pa.nulls(n, pa.string())})
    store.write_parquet(score_location(config, 0), "part-0.parquet", scored)
    write_verdicts(config, 0, verdicts(config, scored))
    return config


def test_the_plan_manifest_reports_the_hard_share_planned_beside_the_target_with_a_warning(tmp_path):
    config = scored_round(tmp_path, [2.0] + [0.0] * 9, ["ok"] * 10, rows_per_round=8)
    manifest = planning.plan(config, 0)
    assert (manifest["hard_share_target"], manifest["hard_share_planned"]) == (0.5, 0.375)
    assert manifest["max_copies_per_row"] == 3 and manifest["most_copies_of_a_row"] == 3
    assert manifest["warnings"][0].startswith("hard share planned 0.375, target 0.500: only 1 row scored hard")
    assert json.loads((tmp_path / "run/round_0/plan/_manifest.json").read_text())["warnings"] == manifest["warnings"]


def test_a_round_without_expansion_still_gets_its_training_set(tmp_path):
    # expansion_per_round: 0 sends no request; the training-set step used to fail with a KeyError
    config = scored_round(tmp_path, [2.0, 0.0, 1.0, 0.5], ["ok"] * 4, rows_per_round=4, expansion_per_round=0)
    planning.plan(config, 0)
    new_rows = expansion.judged_rows(config, 0, None)
    assert new_rows.num_rows == 0 and {"id", "instruction", "task", "seed_id", "status"} <= set(new_rows.column_names)
    planned = planning.read_plan(config, 0)
    answers = pa.table({"id": planned.column("id"), "respond_response": ["An answer."] * planned.num_rows,
                        "respond_status": ["ok"] * planned.num_rows,
                        "respond_finish_reason": ["stop"] * planned.num_rows,
                        "style": ["style_detailed"] * planned.num_rows})
    summary = planning.write_training_set(config, 0, new_rows.filter(pc.equal(new_rows.column("status"), "ok")),
                                          answers)
    assert summary["rows"] == 4 and summary["rows_from_expansion"] == 0


def test_a_round_with_no_row_scored_ok_stops_with_the_failures_by_reason(tmp_path):
    config = scored_round(tmp_path, [None, None, None], ["teacher_timeout", "teacher_timeout", "student_too_long"])
    with pytest.raises(planning.PlanError, match=r"round 0 has no row scored ok \(teacher_timeout: 2, "
                                                  r"student_too_long: 1\)"):
        planning.plan(config, 0)


def test_ifd_calls_the_highest_share_hard_and_leaves_a_band_around_the_boundary_to_the_judge():
    values = [(f"r{i}", i / 10) for i in range(10)]
    assert rank_verdicts(values, 0.3, 0.0) == {f"r{i}": i >= 7 for i in range(10)}
    assert rank_verdicts(list(reversed(values)), 0.3, 0.0) == rank_verdicts(values, 0.3, 0.0)   # order-free
    # a band of 4 rows: two each side of the boundary (between r6 and r7)
    band = rank_verdicts(values, 0.3, 0.4)
    assert [band[f"r{i}"] for i in range(10)] == [False] * 5 + [None] * 4 + [True]
    # ties are ranked by id, so the same values give the same verdicts whatever the rows' order
    assert rank_verdicts([("b", 0.5), ("a", 0.5)], 0.5, 0.0) == {"a": False, "b": True}
    assert rank_verdicts([], 0.5, 0.2) == {}


def ifd_scored(tmp_path, ifd: list, difficulty: str, **curriculum) -> tuple[RunConfig, pa.Table]:
    """A round scored by IFD: the answer-loss stage's columns, one teacher failure and one misaligned pair."""
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / difficulty)}, "curriculum": {
        "task_targets": {"Math": 1.0}, "difficulty": difficulty, "ifd_hard_share": 0.5, **curriculum}})
    n = len(ifd)
    teacher_ok = [value is not None for value in ifd]
    return config, pa.table({
        "id": [f"r{i:02d}" for i in range(n)], "instruction": [f"Question {i}?" for i in range(n)],
        "input": [""] * n, "output": [f"Answer {i}." for i in range(n)], "task": ["Math"] * n,
        "ifd": pa.array(ifd, pa.float32()),
        "teacher_status": ["ok" if ok else "timeout" for ok in teacher_ok],
        "teacher_error": [None if ok else "no answer in 60 s" for ok in teacher_ok],
        "answer_status": ["ok" if ok else "no_answer" for ok in teacher_ok],
        "answer_error": [None if ok else "column 'teacher_response' is empty" for ok in teacher_ok]})


def test_ifd_verdicts_mark_misaligned_and_failed_rows_with_a_reason_and_plan_the_rest(tmp_path):
    ifd = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.2, None]
    config, scored = ifd_scored(tmp_path, ifd, "ifd", rows_per_round=8)
    table = verdicts(config, scored).to_pylist()
    assert [row["status"] for row in table][-2:] == ["ifd_misaligned", "teacher_timeout"]
    assert "IFD 1.200 > 1" in table[8]["error"] and table[9]["error"] == "no answer in 60 s"
    assert [row["hard"] for row in table] == [False] * 4 + [True] * 4 + [None, None]   # the top half of 8 valid
    assert {row["difficulty_source"] for row in table} == {"ifd"}
    store.write_parquet(score_location(config, 0), "part-0.parquet", scored)
    write_verdicts(config, 0, verdicts(config, scored))
    manifest = planning.plan(config, 0)
    assert (manifest["hard_rows_available"], manifest["easy_rows_available"], manifest["rows_unscored"]) == (4, 4, 2)
    assert manifest["difficulty"]["measure"] == "ifd" and manifest["difficulty"]["rows"] == 8
    planned = planning.read_plan(config, 0).to_pylist()
    assert all((row["difficulty"] == "hard") == (row["difficulty_score"] > 0.45) for row in planned)


def test_the_plan_is_the_same_whether_the_verdicts_line_up_with_the_scored_files_or_not(tmp_path):
    """Verdicts written from the scored files in their order are joined by position; any others by id."""
    ifd = [0.05 * i for i in range(16)]
    plans = []
    for order in ("same", "reversed"):
        config, scored = ifd_scored(tmp_path / order, ifd, "ifd", rows_per_round=8)
        store.write_parquet(score_location(config, 0), "part-0.parquet", scored.slice(0, 9))
        store.write_parquet(score_location(config, 0), "part-1.parquet", scored.slice(9))
        verdict = verdicts(config, scored)
        write_verdicts(config, 0, verdict if order == "same" else verdict.take(list(reversed(range(16)))))
        planning.plan(config, 0)
        plans.append(planning.read_plan(config, 0))
    assert plans[0].equals(plans[1]) and plans[0].num_rows > 0
    assert plans[0].column("instruction").to_pylist() == [f"Question {int(i[1:])}?" for i in plans[0].column("id").to_pylist()]


def test_hybrid_asks_the_judge_only_about_the_band_and_takes_its_verdict_there(tmp_path):
    ifd = [i / 20 for i in range(20)]
    config, scored = ifd_scored(tmp_path, ifd, "hybrid", hybrid_band=0.2)
    band = band_ids(config, scored)
    assert band == ["r08", "r09", "r10", "r11"]                     # 20 % of 20 rows, around the boundary r09|r10
    judged = pa.table({"id": band, "status": ["ok", "ok", "ok", "judge_unparseable"],
                       "error": [None, None, None, "no score in the reply"], "mfd": pa.array([2.0, 0.0, 0.5, None])})
    table = {row["id"]: row for row in verdicts(config, scored, judged).to_pylist()}
    assert [table[i]["hard"] for i in band] == [True, False, False, None]     # the judge's MFD ≥ δ decides there
    assert table["r11"]["status"] == "judge_unparseable"
    assert [table[i]["difficulty_source"] for i in band[:3]] == ["judge"] * 3
    assert table["r07"]["hard"] is False and table["r12"]["hard"] is True      # outside the band IFD decides
    assert sum(row["difficulty_source"] == "judge" for row in table.values()) == 3

    # the round's summary counts the judge's usage on the band's rows only, a row written twice at its larger usage
    usage = {"student_tokens": [30, 31, 32, 33], "judge_prompt_tokens": [100, 101, 102, 103],
             "judge_completion_tokens": [5, 6, 7, 8]}
    band_rows = pa.concat_tables([judged.append_column("student_tokens", pa.array(usage["student_tokens"]))
                                  .append_column("judge_prompt_tokens", pa.array(usage["judge_prompt_tokens"]))
                                  .append_column("judge_completion_tokens", pa.array(usage["judge_completion_tokens"]))]
                                 * 2)
    teacher = {"teacher_prompt_tokens": list(range(20)), "teacher_completion_tokens": [1] * 20}
    scored = scored.append_column("teacher_prompt_tokens", pa.array(teacher["teacher_prompt_tokens"])) \
        .append_column("teacher_completion_tokens", pa.array(teacher["teacher_completion_tokens"]))
    rows = {row["id"]: row for row in summary_rows(verdicts(config, scored, band_rows), scored, band_rows).to_pylist()}
    assert [i for i, row in sorted(rows.items()) if row["judged"]] == band
    assert [rows[i]["judge_prompt_tokens"] for i in band] == usage["judge_prompt_tokens"]
    assert rows["r07"]["judge_prompt_tokens"] == 0 and rows["r07"]["teacher_prompt_tokens"] == 7
    summary = summarise(config, 0, 20, summary_rows(verdicts(config, scored, band_rows), scored, band_rows), [], {},
                        {})
    assert summary["judged_rows"] == 4 and summary["tokens"]["judge"] == {"prompt": 406, "completion": 26}
    assert summary["tokens"]["teacher"] == {"prompt": sum(range(20)), "completion": 20}
