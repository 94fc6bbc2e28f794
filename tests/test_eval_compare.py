"""`tapir eval compare` without a model: the plain-distillation baseline's plan and style, the rounds it is
sized by, and the table a person reads. The whole command runs in tests/test_run.py on a finished run."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.evaluation.compare import (
    BASELINE_STYLE,
    COMPARE_SCHEMA,
    baseline_config,
    baseline_name,
    format_compare,
    plan_baseline,
    row_means,
    trained_rounds,
)
from pipeline.evaluation.eval_dir import EvalError
from pipeline.planning import read_plan
from pipeline.stages.respond import style_prompts, styled_request

POOL_ROWS = 30


def _run(tmp_path, trained: dict[int, int]) -> RunConfig:
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")}})
    score = tmp_path / "run" / "round_0" / "score"
    score.mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [f"r{i:02d}" for i in range(POOL_ROWS)], "instruction": [f"Do task {i}." for i in range(POOL_ROWS)],
        "input": [""] * POOL_ROWS, "output": [f"Answer {i}." for i in range(POOL_ROWS)], "task": ["Math" if i % 3 == 0 else "Writing" for i in range(POOL_ROWS)],
        "mfd": [float(i % 5) for i in range(POOL_ROWS)]}), score / "part-0.parquet")
    rounds = {str(r): {"finished": ["score", "plan", "expand", "respond", "train_set", "train"],
                       "summaries": {"train_set": {"rows": rows}}} for r, rows in trained.items()}
    rounds["9"] = {"finished": ["score"], "summaries": {}}            # a round that has not trained yet
    (tmp_path / "run" / "state.json").write_text(json.dumps({"rounds": rounds}))
    return config


def test_the_baseline_trains_on_as_many_random_pool_rows_as_the_rounds_did_together(tmp_path):
    config = _run(tmp_path, {0: 14, 1: 20})
    assert trained_rounds(config) == {0: 14, 1: 20}
    summary = plan_baseline(config, 34)
    plan = read_plan(baseline_config(config), 0).to_pylist()
    assert sum(row["copies"] for row in plan) == 34 and summary["rows_planned"] == 34
    # 30 pool rows for 34 places: every row once, four of them twice; no difficulty in the choice
    assert len(plan) == POOL_ROWS and sorted(row["copies"] for row in plan).count(2) == 4
    assert {row["difficulty"] for row in plan} == {None}
    # with its reference answer, for respond.pool_answers 'reference': the same answers as the run's rounds
    assert all(row["instruction"] == f"Do task {int(row['id'][1:])}." and row["output"] == f"Answer {int(row['id'][1:])}."
               and row["task"] for row in plan)
    assert (tmp_path / "run" / "baseline" / "round_0" / "plan" / "plan.parquet").exists()
    assert plan_baseline(config, 34)["skipped"]
    with pytest.raises(EvalError, match="planned with 34 rows, the run's rounds now trained on 40; delete"):
        plan_baseline(config, 40)


def test_a_smaller_baseline_draws_distinct_rows_the_same_way_each_time(tmp_path):
    config = _run(tmp_path, {0: 12})
    plan_baseline(config, 12)
    plan = read_plan(baseline_config(config), 0).to_pylist()
    assert len(plan) == 12 and {row["copies"] for row in plan} == {1}
    assert [row["id"] for row in plan] != [f"r{i:02d}" for i in range(12)]      # drawn, not the first rows


def test_each_baseline_seed_draws_its_own_rows_into_its_own_directory(tmp_path):
    config = _run(tmp_path, {0: 12})
    plans = []
    for k in range(3):
        plan_baseline(config, 12, k)
        plans.append(sorted(row["id"] for row in read_plan(baseline_config(config, k), 0).to_pylist()))
    assert len({tuple(plan) for plan in plans}) == 3                  # three draws, not one thrice
    assert [baseline_name(k) for k in range(3)] == ["baseline", "baseline_1", "baseline_2"]
    assert all((tmp_path / "run" / name / "round_0" / "plan" / "plan.parquet").exists()
               for name in ("baseline", "baseline_1", "baseline_2"))
    # the first is the one a single-baseline comparison has always drawn
    assert baseline_config(config, 0).curriculum.seed == config.curriculum.seed
    assert plans[0] == sorted(row["id"] for row in read_plan(baseline_config(config), 0).to_pylist())


def test_several_baselines_are_compared_through_their_mean_on_each_row():
    assert row_means([{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0, "c": 9.0}]) == {"a": 2.0, "b": 3.0}
    assert row_means([{"a": 1.0}]) == {"a": 1.0} and row_means([]) == {}


def test_the_baseline_teacher_answers_every_task_with_one_plain_prompt(tmp_path):
    config = _run(tmp_path, {0: 5})
    baseline = baseline_config(config)
    assert baseline.storage.run_dir == str(tmp_path / "run") + "/baseline"
    assert baseline.training == config.training and baseline.teacher == config.teacher
    styles = style_prompts(baseline.respond)
    systems = {styled_request({"instruction": "x", "input": "", "task": task}, styles, baseline.respond)
               .messages[0]["content"] for task in ("Math", "Code Generation", "Writing", "Reasoning")}
    assert systems == {styles[BASELINE_STYLE]}
    tapir_styles = style_prompts(config.respond)
    assert styles[BASELINE_STYLE] not in tapir_styles.values()


def test_a_run_without_a_trained_round_has_nothing_to_compare(tmp_path):
    with pytest.raises(EvalError, match="no run here"):
        trained_rounds(RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "none")}}))
    config = _run(tmp_path, {})
    with pytest.raises(EvalError, match="no round has finished training yet"):
        trained_rounds(config)


def test_the_comparison_reads_as_points_with_each_model_against_the_baseline():
    table = pa.Table.from_pylist([
        {"model": "base_student", "round": None, "win_rate": 0.2, "standard_error": 0.05, "lc_win_rate": 0.25,
         "lc_standard_error": 0.06, "rows_judged": 40, "difference_to_baseline": -0.1,
         "difference_standard_error": 0.04, "rows_paired": 40, "trained_rows": 0, "model_path": "/m/base",
         "reference_loss": 1.4321, "reference_loss_standard_error": 0.0412, "reference_loss_rows": 40,
         "loss_difference_to_baseline": 0.0123, "loss_difference_standard_error": 0.0006, "loss_rows_paired": 40,
         "rows_overlapping_pool": 3},
        {"model": "baseline", "round": None, "win_rate": 0.3, "standard_error": 0.05, "lc_win_rate": None,
         "lc_standard_error": None, "rows_judged": 40, "difference_to_baseline": None,
         "difference_standard_error": None, "rows_paired": None, "trained_rows": 96, "model_path": "/m/b",
         "reference_loss": 1.42, "reference_loss_standard_error": 0.04, "reference_loss_rows": 40,
         "rows_overlapping_pool": 3},
        {"model": "round_1", "round": 1, "win_rate": 0.375, "standard_error": 0.06, "lc_win_rate": 0.4,
         "lc_standard_error": 0.07, "rows_judged": 39, "difference_to_baseline": 0.075,
         "difference_standard_error": 0.03, "rows_paired": 39, "trained_rows": 96, "model_path": "/m/r1",
         "reference_loss": 1.38, "reference_loss_standard_error": 0.04, "reference_loss_rows": 38,
         "loss_difference_to_baseline": -0.04, "loss_difference_standard_error": 0.0007, "loss_rows_paired": 38,
         "rows_overlapping_pool": 3},
    ], schema=COMPARE_SCHEMA)
    text = format_compare(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "trained", "rows"]
    assert lines[2].split()[:2] == ["base_student", "0"] and "-10.0 ± 4.0" in lines[2]
    assert "30.0 ± 5.0" in lines[3] and "n/a" in lines[3]
    assert "37.5 ± 6.0" in lines[4] and "+7.5 ± 3.0" in lines[4] and lines[4].split()[-8] == "39"
    # the reference loss in nats per token, each model against the baseline paired by row
    assert "1.4321 ± 0.0412" in lines[2] and "+0.0123 ± 0.0006" in lines[2]
    assert "1.4200 ± 0.0400" in lines[3] and lines[3].split()[-2:] == ["n/a", "40"]
    assert "-0.0400 ± 0.0007" in lines[4] and lines[4].split()[-1] == "38"
    assert "held-out rows overlapping the pool, dropped before evaluation: 3" in text


def test_the_runs_held_out_check_says_whether_the_student_moved_beyond_twice_its_standard_error():
    from pipeline.evaluation.heldout_loss import format_heldout, verdict

    assert verdict(-0.05, 0.01).startswith("lower: the student moved toward the references (5.0 standard errors)")
    assert verdict(0.05, 0.01).startswith("higher: the student moved away from the references")
    assert verdict(-0.015, 0.01) == verdict(0.0, 0.0) == "within twice its standard error: no measurable change"
    models = [{"name": "start", "round": None, "reference_loss": 2.0, "standard_error": 0.05, "rows_scored": 3,
               "rows_failed": {"too_long": 1}},
              {"name": "round_1", "round": 1, "reference_loss": 1.9, "standard_error": 0.05, "rows_scored": 3,
               "rows_failed": {"too_long": 1}}]
    text = format_heldout({"rows": 4, "eval_file": "bundled:sample", "rows_overlapping_pool": 98,
                           "rows_location": "runs/local/heldout_loss/input", "models": models,
                           "difference": -0.1, "standard_error": 0.02, "rows_paired": 3})
    assert "4 rows of bundled:sample (98 overlapping the pool dropped); the rows: runs/local/heldout_loss/input" in text
    assert "starting student       2.0000 ± 0.0500 nats/token over 3 rows (not measured: too_long: 1)" in text
    assert "round 1's student" in text and "-0.1000 ± 0.0200 over 3 rows: lower" in text
