"""`tapir eval winrate`: judged rows become per-row results and a summary (fast, no model), and the command end to
end with the real vLLM model, the scoring stages and the paid API played by a loopback server (slow)."""
import json
import os
import secrets
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_no_file_holds, run_and_run_again

from pipeline.config import PriceConfig, RunConfig
from pipeline.evaluation.eval_dir import EvalError, model_name
from pipeline.evaluation.winrate import by_category, length_controlled_win_rate, preference, win_rate
from pipeline.evaluation.winrate_run import (
    categories_table,
    evaluated_rows,
    format_summary,
    overlap_summary,
    overlapping_rows,
    results_table,
    summarise,
    summary_table,
    winrate,
)
from pipeline.llm.emulated_api import EmulatedAPI, default_reply
from pipeline.llm.judge import request_text
from pipeline.report import CATEGORY_COLUMNS, COMPARE_COLUMNS

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY_ENV = "TAPIR_TEST_EVAL_KEY"
PRICE = PriceConfig(input_per_million_usd=1.0, output_per_million_usd=4.0)


def _rows(tasks):
    return pa.table({"id": [f"r{i}" for i in range(len(tasks))], "instruction": [f"do {i}" for i in range(len(tasks))],
                     "input": [""] * len(tasks), "task": pa.array(tasks, pa.string())})


def _judged(ids, scores, sources=None, losses=None):
    """Rows as the judge stage writes them: (model score, reference score) per id, None fails the row; with
    the reference loss of each (1.0 + k / 10 unless given; None: the file has no reference answer)."""
    sources = sources or ["reference"] * len(ids)
    losses = losses or [1.0 + k / 10 for k in range(len(ids))]
    rows = []
    for k, (i, s, source, loss) in enumerate(zip(ids, scores, sources, losses)):
        asked = source == "teacher"
        rows.append({"id": i, "student_response": "m" * (10 + k), "teacher_response": "r" * 20,
                     "teacher_source": source, "student_score": s and s[0], "teacher_score": s and s[1],
                     "student_tokens": 3, "teacher_prompt_tokens": 100 * asked, "teacher_completion_tokens": 50 * asked,
                     "judge_prompt_tokens": 400, "judge_completion_tokens": 20,
                     "status": "ok" if s else "judge_unparseable", "error": None if s else "no pair of scores found",
                     "answer_loss": loss, "answer_tokens": 7 if loss else 0,
                     "answer_status": "ok" if loss else "no_answer",
                     "answer_error": None if loss else "column 'output' is empty"})
    return pa.Table.from_pylist(rows)


def test_every_row_gets_a_result_with_its_preference_or_the_reason_it_has_none():
    rows = _rows(["Math", "Math", "Writing", None, "Writing"])
    judged = _judged(["r0", "r1", "r2", "r3"], [(8, 6), (5, 5), None, (2, 7)],
                     sources=["reference", "teacher", "teacher", "reference"])
    results = results_table(rows, judged).to_pylist()
    assert [r["id"] for r in results] == ["r0", "r1", "r2", "r3", "r4"]        # the file's order
    assert [r["preference"] for r in results] == [1.0, 0.5, None, 0.0, None]
    assert [r["status"] for r in results] == ["ok", "ok", "judge_unparseable", "ok", "not_written"]
    assert results[2]["error"] and "run the same command again" in results[4]["error"]
    assert [r["reference_source"] for r in results] == ["file", "teacher", "teacher", "file", None]
    assert results[1]["model_length"] == 11 and results[1]["reference_length"] == 20
    assert results[0]["model_score"] == 8 and results[0]["reference_score"] == 6


def test_the_summary_is_the_win_rate_math_over_the_judged_rows_only():
    tasks = ["Math", "Math", "Writing", None, "Writing", "Math"]
    scores = [(8, 6), (5, 5), None, (2, 7), (9, 3), (4, 4.5)]
    results = results_table(_rows(tasks), _judged([f"r{i}" for i in range(6)], scores))
    summary = summarise(results, PRICE, PRICE)
    judged = [(s, t) for s, t in zip(scores, tasks) if s is not None]
    prefs = [preference(*s) for s, _ in judged]
    expected = win_rate(prefs)
    assert (summary["win_rate"], summary["standard_error"]) == (expected.rate, expected.standard_error)
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 2)
    lengths = [10 + k for k, s in enumerate(scores) if s is not None]
    assert summary["lc_win_rate"] == length_controlled_win_rate(prefs, lengths, [20] * 5).rate
    assert {name: {key: value[key] for key in ("win_rate", "standard_error", "n")}
            for name, value in summary["categories"].items()} == {
        name: {"win_rate": r.rate, "standard_error": r.standard_error, "n": r.n}
        for name, r in by_category(prefs, [t for _, t in judged]).items()}
    assert set(summary["categories"]) == {"Math", "Writing", "unlabelled"}
    assert (summary["rows"], summary["rows_judged"], summary["rows_failed"]) == (6, 5, 1)
    assert summary["failed"] == {"judge_unparseable": 1} and summary["complete"]
    assert summary["judge_prompt_tokens"] == 6 * 400
    assert summary["cost_usd"] == pytest.approx((6 * 400 + 6 * 20 * 4) / 1e6)


def test_the_reference_loss_is_the_mean_over_the_rows_it_was_computed_for_whatever_the_judge_said():
    tasks = ["Math", "Math", "Writing", None, "Writing"]
    losses = [1.0, 1.5, 2.0, None, 3.0]                        # r3: the file has no reference answer for it
    rows = _rows(tasks + ["Math"])                              # r5: not written yet
    results = results_table(rows, _judged([f"r{i}" for i in range(5)], [(8, 6), None, (2, 7), (5, 5), (9, 3)],
                                          losses=losses))
    assert results.column("reference_loss").to_pylist() == [1.0, 1.5, 2.0, None, 3.0, None]
    assert results.column("reference_loss_status").to_pylist() == ["ok", "ok", "ok", "no_answer", "ok", None]
    summary = summarise(results, PRICE, PRICE)
    assert summary["reference_loss"] == pytest.approx(1.875) and summary["reference_loss_rows"] == 4
    assert summary["reference_loss_standard_error"] == pytest.approx(np.std([1.0, 1.5, 2.0, 3.0], ddof=1) / 2)
    assert summary["reference_loss_failed"] == {"no_answer": 1, "not_written": 1}
    # the judge could not read r1: it counts in Math's loss, not in its win rate
    math_row = summary["categories"]["Math"]
    assert (math_row["n"], math_row["reference_loss_n"], math_row["reference_loss"]) == (1, 2, pytest.approx(1.25))
    assert summary["categories"]["unlabelled"]["reference_loss"] is None
    assert summary["categories"]["unlabelled"]["reference_loss_n"] == 0
    table = summary_table({**summary, "model": "m", "round": None, **overlap_summary({})})
    assert table.to_pylist()[0]["reference_loss"] == pytest.approx(1.875)
    text = format_summary({**summary, "model": "m", "wall_s": 1.0, **overlap_summary({"x": "same_id"})}, "/out")
    assert "reference loss 1.8750 ± 0.4270 nats/token (4 rows; without: no_answer 1, not_written 1)" in text
    assert "1 row(s) of the file overlap the pool and were dropped (same_id 1)" in text


def test_held_out_rows_in_the_pool_or_near_duplicates_of_it_are_found_with_their_reason():
    pool = [(["p0", "p1"], ["Name three primary colors.", "Write a haiku about autumn leaves falling."]),
            (["p2"], ["Translate 'good morning' into French."])]
    ids = ["p1", "h1", "h2", "h3", "h4"]
    requests = ["Write a haiku about autumn leaves falling.",        # the pool's own row (same id)
                "Translate 'good morning' into French, please.",     # a near-duplicate of p2
                "Explain how a rainbow forms.",                      # new
                "Explain how a rainbow forms, briefly.",             # a near-duplicate of h2 only: kept
                "Name three primary colours of paint used by painters today."]   # shares words, not enough
    dropped = overlapping_rows(ids, requests, iter(pool), threshold=0.7)
    assert dropped == {"p1": "same_id", "h1": "near_duplicate"}
    assert overlap_summary(dropped) == {"overlap_checked": True, "rows_overlapping_pool": 2,
                                        "overlapping": {"same_id": 1, "near_duplicate": 1}}
    assert overlap_summary(None) == {"overlap_checked": False, "rows_overlapping_pool": 0, "overlapping": {}}


def test_no_judged_row_gives_no_rate_and_an_unwritten_row_makes_it_incomplete():
    summary = summarise(results_table(_rows(["Math", "Math"]), _judged(["r0"], [None], losses=[None])), PRICE,
                        PRICE)
    assert summary["win_rate"] is None and summary["lc_win_rate"] is None and summary["categories"] == {}
    assert summary["failed"] == {"judge_unparseable": 1, "not_written": 1} and not summary["complete"]
    assert summary["reference_loss"] is None and summary["reference_loss_rows"] == 0
    text = format_summary({**summary, "model": "m", "wall_s": 1.0, **overlap_summary(None)}, "/out")
    assert "win rate n/a" in text and "INCOMPLETE" in text and "reference loss n/a" in text
    assert "overlap with the pool not checked" in text


def test_the_summary_row_carries_what_a_comparison_of_models_reads():
    results = results_table(_rows(["Math", "Code"]), _judged(["r0", "r1"], [(8, 6), (3, 6)]))
    summary = {**summarise(results, PRICE, PRICE), "model": "round_1", "round": 1, "model_path": "/m",
               "eval_file": "/e.jsonl", "wall_s": 2.5}
    table = summary_table(summary)
    assert table.num_rows == 1 and set(COMPARE_COLUMNS) <= set(table.column_names)
    row = table.to_pylist()[0]
    assert (row["model"], row["round"], row["win_rate"]) == ("round_1", 1, 0.5)
    categories = categories_table(summary)
    assert set(CATEGORY_COLUMNS) <= set(categories.column_names)
    assert categories.to_pylist()[0] == {"model": "round_1", "category": "Code", "score": 0.0,
                                         "standard_error": 0.0, "n": 1, "reference_loss": pytest.approx(1.1),
                                         "reference_loss_standard_error": 0.0, "reference_loss_n": 1}
    text = format_summary({**summary, **overlap_summary({})}, "/out/")
    assert "round_1 vs references: win rate 50.0% ± 50.0%" in text
    assert "by category: Code 0.0% ± 0.0% (n 1), loss 1.1000 ± 0.0000, Math 100.0% ± 0.0% (n 1), loss 1.0000" in text
    assert "0 row(s) of the file overlap the pool and were dropped" in text
    assert "results in /out/results.parquet" in text


def test_a_model_is_filed_under_its_bundled_name_its_round_or_its_directory():
    assert model_name("bundled:smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    assert model_name("runs/local/round_1/model") == ("round_1", 1)
    assert model_name("/models/my-student/") == ("my-student", None)
    assert model_name("HuggingFaceTB/SmolLM2-360M-Instruct") == ("SmolLM2-360M-Instruct", None)


def test_the_first_rows_of_the_file_are_evaluated_with_their_task_or_category():
    meta = [json.dumps({"task": "Math"}), None, json.dumps({"category": "writing"}), json.dumps({"task": 3})]
    heldout = pa.table({"id": list("abcd"), "instruction": list("wxyz"), "input": [""] * 4,
                        "output": ["o", None, None, "p"], "source": ["f:1"] * 4, "meta": meta})
    rows = evaluated_rows(heldout, 3)
    assert rows.column("id").to_pylist() == ["a", "b", "c"]
    assert rows.column("task").to_pylist() == ["Math", None, "writing"]
    assert evaluated_rows(heldout, 10).column("task").to_pylist()[-1] == "3"


def test_an_evaluation_needs_a_file_and_will_not_mix_with_another_in_the_same_directory(tmp_path):
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(EvalError, match="--eval FILE or set eval.held_out_path"):
        winrate(config, "bundled:smollm2-135m-instruct")
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "run" / "eval" / "student"
    out.mkdir(parents=True)
    (out / "_inputs.json").write_text(json.dumps({"model": "student", "eval_file": "/elsewhere.jsonl"}))
    # (an evaluation from before the reference loss has no reference_loss_of: it is not continued either)
    with pytest.raises(EvalError, match=r"differ in .*eval_file.*reference_loss_of\); pass --out"):
        winrate(config, str(model), eval_file=str(tmp_path / "heldout.jsonl"))


# ---------------------------------------------------------------- end to end

ROWS = 12
WITH_REFERENCE = 8          # the first 8 rows keep their reference output; the teacher answers the other 4
UNJUDGEABLE = 5             # the judge cannot be read on this row: it fails with the reason


def _eval_file(tmp_path: Path, shared_data: Path) -> tuple[Path, list[dict]]:
    records = [json.loads(line) for line in (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:ROWS]]
    for i, record in enumerate(records):
        record["task"] = ("Writing", "Reasoning")[i % 2]
        if i >= WITH_REFERENCE:
            del record["output"]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def _write_config(tmp_path: Path, api: EmulatedAPI, cache_dir: Path) -> Path:
    endpoint = {"kind": "remote", "base_url": api.base_url, "model": "paid-teacher", "api_key_env": KEY_ENV,
                "price": {"input_per_million_usd": 1.0, "output_per_million_usd": 4.0}}
    config = {"storage": {"run_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)}, "ray": {"num_cpus": 2},
              "student": {"batch_size": 6, "num_actors": 1, "sampling": {"max_tokens": 16}},
              "teacher": endpoint, "scoring": {"batch_size": 6, "teacher_max_tokens": 32}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_winrate_judges_every_row_against_the_file_or_the_teacher_and_reports_consistent_rates(
        tmp_path, shared_data, prepared_student):
    eval_file, records = _eval_file(tmp_path, shared_data)
    unjudgeable = records[UNJUDGEABLE]["instruction"]

    def reply(body: dict) -> str:
        if body.get("response_format") and unjudgeable in body["messages"][-1]["content"]:
            return "Both answers have merit."
        return default_reply(body)

    api = EmulatedAPI(reply=reply, api_key=secrets.token_hex(16))
    with api.serving_in_thread():
        config = _write_config(tmp_path, api, prepared_student.parent.parent)
        env = {**os.environ, KEY_ENV: api.api_key}
        command = [TAPIR, "eval", "winrate", str(config), "--model", "bundled:smollm2-135m-instruct",
                   "--eval", str(eval_file)]
        stdout = run_and_run_again(command, api, env, REPO, timeout_s=540)

    out = tmp_path / "run" / "eval" / "smollm2-135m-instruct"
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert len(results) == ROWS and [r["instruction"] for r in results] == [r["instruction"] for r in records]
    for i, row in enumerate(results):
        assert row["task"] == records[i]["task"] and row["model_answer"] is not None
        if i < WITH_REFERENCE:
            assert row["reference_source"] == "file" and row["reference_answer"] == records[i]["output"]
        else:
            assert row["reference_source"] == "teacher" and row["reference_answer"]
        # the reference loss: of the file's answer where it has one, whatever the judge made of the row
        if i < WITH_REFERENCE:
            assert row["reference_loss_status"] == "ok" and row["reference_loss"] > 0
        else:
            assert row["reference_loss_status"] == "no_answer" and row["reference_loss"] is None
        if i == UNJUDGEABLE:
            assert row["status"] == "judge_unparseable" and "no pair of scores" in row["error"]
            assert row["preference"] is None
        else:
            assert row["status"] == "ok" and row["preference"] == preference(row["model_score"],
                                                                             row["reference_score"])
    # the teacher was asked exactly once for each row without a reference, and for nothing else
    requests = {request_text(r["instruction"], r.get("input", "")) for r in records}
    teacher_asked = [json.loads(p)[-1]["content"] for p in api.stats.answered_prompts
                     if json.loads(p)[-1]["content"] in requests]
    assert sorted(teacher_asked) == sorted(request_text(r["instruction"], r["input"]) for r in records[WITH_REFERENCE:])
    assert all(api.stats.answered_prompts[p] == 1 for p in api.stats.answered_prompts
               if json.loads(p)[-1]["content"] in requests)

    judged = [r for r in results if r["status"] == "ok"]
    expected = win_rate([r["preference"] for r in judged])
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert len(summary) == 1
    row = summary[0]
    assert (row["model"], row["round"], row["rows"], row["rows_judged"]) == ("smollm2-135m-instruct", None, ROWS,
                                                                            ROWS - 1)
    assert row["win_rate"] == pytest.approx(expected.rate) and row["standard_error"] == pytest.approx(
        expected.standard_error)
    assert 0 <= row["lc_win_rate"] <= 1
    assert (row["references_from_file"], row["references_from_teacher"]) == (WITH_REFERENCE, ROWS - WITH_REFERENCE)
    assert row["teacher_prompt_tokens"] > 0 and row["judge_prompt_tokens"] > 0 and row["cost_usd"] > 0
    categories = {r["category"]: r for r in pq.read_table(out / "categories.parquet").to_pylist()}
    assert set(categories) == {"Writing", "Reasoning"} and sum(r["n"] for r in categories.values()) == ROWS - 1
    assert f"win rate {100 * expected.rate:.1f}%" in stdout and "by category: Reasoning" in stdout
    assert "failed: judge_unparseable 1" in stdout
    assert row["reference_loss_rows"] == WITH_REFERENCE and row["reference_loss"] > 0
    assert "overlap with the pool not checked" in stdout          # no run here: no pool any model trained on
    # the key reached the API and nothing that was written
    assert api.stats.answered > 0
    assert_no_file_holds(out, api.api_key)
