"""`tapir eval mtbench`: the model's conversation turn by turn, graded turns become per question × turn results
and per-category means (fast, no model), the grading stage against a loopback judge (fast), and the command end
to end with the real vLLM model and the paid API played by a loopback server (slow)."""
import asyncio
import json
import os
import re
import secrets
import sys
from pathlib import Path
from statistics import fmean

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_no_file_holds, run_and_run_again

from pipeline.config import EndpointConfig, PriceConfig, RunConfig
from pipeline.evaluation.eval_dir import EvalError
from pipeline.evaluation.mtbench import Question, grading_request_text
from pipeline.evaluation.mtbench_run import (
    categories_table,
    format_summary,
    mtbench,
    question_rows,
    results_table,
    summarise,
    summary_table,
)
from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.llm.shared_limits import local_limits
from pipeline.report import CATEGORY_COLUMNS
from pipeline.stages.grade import TurnGrader
from pipeline.stages.multiturn import conversation

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY_ENV = "TAPIR_TEST_MTBENCH_KEY"
PRICE = PriceConfig(input_per_million_usd=1.0, output_per_million_usd=4.0)

QUESTIONS = [Question(1, "math", ("What is 3 + 4?", "Now multiply that by 2.")),
             Question(2, "writing", ("Write a haiku about rivers.", "Rewrite it about mountains.")),
             Question(3, "coding", ("Write a Python function that squares x.",)),
             Question(4, "roleplay", ("Pretend you are a pirate and greet me.", "Now say goodbye as the pirate."))]
# the writing reference must never reach the judge: its category is graded without one
REFERENCES = {1: ["REF-MATH-1: 7", "REF-MATH-2: 14"], 2: ["REF-WRITING-1", "REF-WRITING-2"],
              3: ["REF-CODING-1: def square(x): return x * x"]}
UNGRADEABLE = "Now say goodbye as the pirate."       # the judge's reply to this turn has no rating


def test_each_turn_is_asked_with_the_whole_conversation_before_it():
    assert conversation(["q1"], []) == [{"role": "user", "content": "q1"}]
    assert conversation(["q1", "q2", "q3"], ["a1", "a2"]) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}]
    with pytest.raises(ValueError, match="need 1 earlier answers, got 0"):
        conversation(["q1", "q2"], [])


def test_questions_become_rows_with_string_ids_and_their_references():
    rows = question_rows([QUESTIONS[0], Question("custom", "coding", ("x",))], {1: ["7", "14"]}).to_pylist()
    assert [(r["id"], r["question_id"]) for r in rows] == [("1", "1"), ("custom", "custom")]
    assert rows[0]["turns"] == list(QUESTIONS[0].turns) and rows[0]["reference_turns"] == ["7", "14"]
    assert rows[1]["reference_turns"] is None


def _graded(row: dict, scores, answered=None, student_status="ok"):
    """A question's row as the grading stage writes it: one score per turn, None for an unreadable grade."""
    answered = len(row["turns"]) if answered is None else answered
    statuses = [("ok" if s is not None else "judge_unparseable") if k < answered else f"student_{student_status}"
                for k, s in enumerate(scores)]
    return {**row, "student_answers": [f"answer {k}" for k in range(answered)],
            "student_turn_tokens": [5] * answered, "student_status": student_status,
            "student_error": None if student_status == "ok" else "turn 2: the conversation is too long",
            "judge_scores": scores, "judge_statuses": statuses,
            "judge_errors": [None if s == "ok" else ("no rating found: meh" if s.startswith("judge") else
                                                     "turn 2: the conversation is too long") for s in statuses],
            "judge_replies": [None if k >= answered else f"Rating: [[{s}]]" if s else "meh"
                              for k, s in enumerate(scores)],
            "judge_prompt_tokens": [100 if k < answered else 0 for k in range(len(scores))],
            "judge_completion_tokens": [10 if k < answered else 0 for k in range(len(scores))]}


def _results(with_unwritten: bool = False):
    rows = question_rows(QUESTIONS, REFERENCES)
    by_id = {r["id"]: r for r in rows.to_pylist()}
    graded = [_graded(by_id["1"], [8.0, 6.0]), _graded(by_id["2"], [5.0, None]), _graded(by_id["3"], [9.0])]
    if not with_unwritten:
        graded.append(_graded(by_id["4"], [4.0, None], answered=1, student_status="too_long"))
    return results_table(rows, pa.Table.from_pylist(graded))


def test_every_question_and_turn_gets_a_result_with_its_score_or_the_reason_it_has_none():
    results = _results().to_pylist()
    assert [(r["question_id"], r["turn"]) for r in results] == [("1", 1), ("1", 2), ("2", 1), ("2", 2), ("3", 1),
                                                                ("4", 1), ("4", 2)]
    assert [r["score"] for r in results] == [8, 6, 5, None, 9, 4, None]
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "judge_unparseable", "ok", "ok", "student_too_long"]
    assert results[3]["error"] == "no rating found: meh" and results[3]["judge_reply"] == "meh"
    assert results[6]["model_answer"] is None and "too long" in results[6]["error"]
    assert results[1]["model_answer"] == "answer 1" and results[1]["question"] == "Now multiply that by 2."
    # shown for math and coding only, and only when the file has a reference
    assert [r["reference_shown"] for r in results] == [True, True, False, False, True, False, False]
    unwritten = _results(with_unwritten=True).to_pylist()[-2:]
    assert [r["status"] for r in unwritten] == ["not_written", "not_written"]
    assert "run the same command again" in unwritten[0]["error"]


def test_the_means_are_over_the_graded_turns_overall_per_turn_and_per_category():
    summary = summarise(_results(), PRICE)
    assert summary["score"] == pytest.approx(fmean([8, 6, 5, 9, 4]))
    assert summary["turn_scores"] == {1: pytest.approx(fmean([8, 5, 9, 4])), 2: 6.0}
    assert (summary["turn_1_score"], summary["turn_2_score"]) == (pytest.approx(6.5), 6.0)
    assert summary["categories"] == {"coding": {"score": 9.0, "n": 1}, "math": {"score": 7.0, "n": 2},
                                     "roleplay": {"score": 4.0, "n": 1}, "writing": {"score": 5.0, "n": 1}}
    assert (summary["questions"], summary["turns"], summary["turns_judged"], summary["turns_failed"]) == (4, 7, 5, 2)
    assert summary["failed"] == {"judge_unparseable": 1, "student_too_long": 1} and summary["complete"]
    assert summary["failures"][0] == {"question_id": "2", "turn": 2, "status": "judge_unparseable",
                                      "error": "no rating found: meh"}
    assert summary["references_shown"] == 3 and summary["student_tokens"] == 6 * 5
    assert summary["judge_prompt_tokens"] == 6 * 100
    assert summary["cost_usd"] == pytest.approx((6 * 100 + 6 * 10 * 4) / 1e6)


def test_no_graded_turn_gives_no_score_and_an_unwritten_question_makes_it_incomplete():
    rows = question_rows(QUESTIONS[:2], {})
    summary = summarise(results_table(rows, pa.Table.from_pylist([_graded(rows.to_pylist()[0], [None, None])])),
                        PRICE)
    assert summary["score"] is None and summary["turn_scores"] == {} and summary["categories"] == {}
    assert summary["failed"] == {"judge_unparseable": 2, "not_written": 2} and not summary["complete"]
    text = format_summary({**summary, "model": "m", "wall_s": 1.0}, "/out")
    assert "m on MT-Bench: score n/a / 10" in text and "INCOMPLETE" in text
    assert "question 1 turn 1: judge_unparseable: no rating found: meh" in text


def test_the_summary_and_category_tables_carry_what_a_comparison_of_models_reads():
    summary = {**summarise(_results(), PRICE), "model": "round_1", "round": 1, "model_path": "/m",
               "questions_file": "/q.jsonl", "references_file": None, "wall_s": 2.5}
    row = summary_table(summary).to_pylist()
    assert len(row) == 1 and (row[0]["model"], row[0]["round"], row[0]["turns_judged"]) == ("round_1", 1, 5)
    assert row[0]["score"] == pytest.approx(6.4) and row[0]["turn_2_score"] == 6.0
    categories = categories_table(summary)
    assert set(CATEGORY_COLUMNS) <= set(categories.column_names)
    assert categories.to_pylist()[0] == {"model": "round_1", "category": "coding", "score": 9.0, "n": 1}
    text = format_summary(summary, "/out/")
    assert "round_1 on MT-Bench: score 6.40 / 10 (turn 1 6.50, turn 2 6.00)" in text
    assert "questions 4, turns 7: 5 judged (3 with a reference answer); failed: judge_unparseable 1, " \
           "student_too_long 1" in text
    assert "by category: coding 9.00 (n 1), math 7.00 (n 2), roleplay 4.00 (n 1), writing 5.00 (n 1)" in text
    assert "results in /out/results.parquet" in text


def test_an_evaluation_needs_questions_and_names_the_line_of_a_bad_one(tmp_path):
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(EvalError, match="--questions FILE or set eval.mtbench_questions"):
        mtbench(config, "bundled:smollm2-135m-instruct")
    bad = tmp_path / "questions.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["q"]}) + "\n"
                   + json.dumps({"question_id": 2, "category": "math", "turns": "q"}) + "\n")
    with pytest.raises(EvalError, match="questions.jsonl line 2: 'turns' must be"):
        mtbench(config, "bundled:smollm2-135m-instruct", questions_file=str(bad))


def _rating(prompt: str) -> int:
    """The loopback judge's rating of a grading prompt: any number 1..10 that depends on the prompt."""
    return 1 + len(prompt) % 10


def _judge_reply(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    if f"### User:\n{UNGRADEABLE}" in prompt:
        return "I would rather not grade this."
    return f"The reply is fine.\nRating: [[{_rating(prompt)}]]"


def test_the_grading_stage_rates_every_answered_turn_and_keeps_an_unreadable_reply(monkeypatch):
    rows = question_rows(QUESTIONS, REFERENCES).to_pylist()
    # question 2's conversation outgrew the model's context at turn 2: that turn was never answered
    answers = {"1": ["7", "14"], "2": ["Water runs."], "3": ["def square(x): return x*x"], "4": ["Ahoy!", "Bye!"]}
    batch = pa.Table.from_pylist([
        {**row, "student_answers": answers[row["id"]], "student_status": "ok" if row["id"] != "2" else "too_long",
         "student_error": None if row["id"] != "2" else "turn 2: too long"} for row in rows])
    monkeypatch.setenv(KEY_ENV, "k-123")

    async def scenario():
        async with EmulatedAPI(reply=_judge_reply, api_key="k-123") as api:
            endpoint = EndpointConfig(kind="remote", base_url=api.base_url, model="judge", api_key_env=KEY_ENV)
            grader = TurnGrader(endpoint, api.base_url, "judge", local_limits([endpoint], None), max_tokens=64)
            try:
                return await grader(batch), api.stats
            finally:
                await (await grader.client()).__aexit__(None, None, None)

    out, stats = asyncio.run(scenario())
    prompts = [json.loads(p)[-1]["content"] for p in stats.answered_prompts]
    assert len(prompts) == 6 and all(stats.answered_prompts[p] == 1 for p in stats.answered_prompts)
    expected = {(row["id"], k): grading_request_text(Question(row["question_id"], row["category"],
                                                              tuple(row["turns"])),
                                                     answers[row["id"]][:k + 1], k, row["reference_turns"])
                for row in rows for k in range(len(answers[row["id"]]))}
    assert sorted(prompts) == sorted(expected.values())
    graded = {row["id"]: row for row in out.to_pylist()}
    assert graded["1"]["judge_scores"] == [_rating(expected["1", 0]), _rating(expected["1", 1])]
    assert graded["1"]["judge_statuses"] == ["ok", "ok"] and graded["1"]["judge_prompt_tokens"][0] > 0
    assert graded["2"]["judge_statuses"] == ["ok", "student_too_long"]
    assert graded["2"]["judge_errors"][1] == "turn 2: too long" and graded["2"]["judge_scores"][1] is None
    assert graded["4"]["judge_statuses"] == ["ok", "judge_unparseable"] and graded["4"]["judge_scores"][1] is None
    assert graded["4"]["judge_replies"][1] == "I would rather not grade this."
    assert graded["4"]["judge_errors"][1] == "no rating found: I would rather not grade this."
    assert graded["4"]["judge_completion_tokens"][1] > 0          # paid for, so counted
    assert "REF-MATH-2: 14" in expected["1", 1] and not any("REF-WRITING" in p for p in prompts)


# ---------------------------------------------------------------- end to end


def _write_files(tmp_path: Path, api: EmulatedAPI, cache_dir: Path) -> tuple[Path, Path, Path]:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category,
                                             "turns": list(q.turns)}) + "\n" for q in QUESTIONS))
    references = tmp_path / "references.jsonl"
    references.write_text("".join(json.dumps({"question_id": i, "model_id": "gpt-4",
                                              "choices": [{"index": 0, "turns": turns}]}) + "\n"
                                  for i, turns in REFERENCES.items()))
    endpoint = {"kind": "remote", "base_url": api.base_url, "model": "paid-judge", "api_key_env": KEY_ENV,
                "price": {"input_per_million_usd": 1.0, "output_per_million_usd": 4.0}}
    config = {"storage": {"run_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)}, "ray": {"num_cpus": 2},
              "student": {"batch_size": 4, "num_actors": 1, "sampling": {"max_tokens": 24, "temperature": 0.0}},
              "teacher": endpoint, "scoring": {"batch_size": 4}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, questions, references


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_mtbench_grades_every_turn_of_the_models_conversation_and_reports_consistent_means(
        tmp_path, prepared_student):
    api = EmulatedAPI(reply=_judge_reply, api_key=secrets.token_hex(16))
    with api.serving_in_thread():
        config, questions, references = _write_files(tmp_path, api, prepared_student.parent.parent)
        env = {**os.environ, KEY_ENV: api.api_key}
        command = [TAPIR, "eval", "mtbench", str(config), "--model", "bundled:smollm2-135m-instruct",
                   "--questions", str(questions), "--references", str(references)]
        stdout = run_and_run_again(command, api, env, REPO, timeout_s=540)

    out = tmp_path / "run" / "eval" / "smollm2-135m-instruct-mtbench"
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert [(r["question_id"], r["turn"]) for r in results] == [
        (str(q.question_id), k + 1) for q in QUESTIONS for k in range(len(q.turns))]
    prompts = [json.loads(p)[-1]["content"] for p in api.stats.answered_prompts]
    assert len(prompts) == len(results) == sum(api.stats.answered_prompts.values())   # one call per turn, once
    answers = {}
    for row in results:
        question = next(q for q in QUESTIONS if str(q.question_id) == row["question_id"])
        assert row["model_answer"] and row["model_tokens"] > 0
        answers.setdefault(row["question_id"], []).append(row["model_answer"])
        k = row["turn"] - 1
        # the judge saw the conversation the model had: every earlier turn with the model's own answer
        prompt = grading_request_text(question, answers[row["question_id"]], k,
                                      REFERENCES.get(question.question_id))
        assert prompt in prompts
        if k == 1:
            assert (f"### User:\n{question.turns[0]}\n\n### Assistant:\n{answers[row['question_id']][0]}\n\n"
                    f"### User:\n{question.turns[1]}") in prompt
        assert ("REF-" in prompt) == (question.category in ("math", "coding"))
        assert row["reference_shown"] == (question.category in ("math", "coding"))
        if question.turns[k] == UNGRADEABLE:
            assert row["status"] == "judge_unparseable" and row["score"] is None
            assert "no rating found" in row["error"] and row["judge_reply"] == "I would rather not grade this."
        else:
            assert row["status"] == "ok" and row["score"] == _rating(prompt)
    assert not any("REF-WRITING" in p for p in prompts)

    judged = [r for r in results if r["status"] == "ok"]
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert len(summary) == 1
    row = summary[0]
    assert (row["model"], row["questions"], row["turns"], row["turns_judged"], row["turns_failed"]) == (
        "smollm2-135m-instruct", 4, 7, 6, 1)
    assert row["score"] == pytest.approx(fmean(r["score"] for r in judged))
    assert row["turn_2_score"] == pytest.approx(fmean(r["score"] for r in judged if r["turn"] == 2))
    assert row["judge_prompt_tokens"] > 0 and row["student_tokens"] > 0 and row["cost_usd"] > 0
    categories = {r["category"]: r for r in pq.read_table(out / "categories.parquet").to_pylist()}
    assert set(categories) == {"math", "writing", "coding", "roleplay"}
    for name, category in categories.items():
        assert category["score"] == pytest.approx(fmean(r["score"] for r in judged if r["category"] == name))
    assert re.search(rf"score {row['score']:.2f} / 10 \(turn 1 [\d.]+, turn 2 {row['turn_2_score']:.2f}\)",
                     stdout)
    assert "failed: judge_unparseable 1" in stdout and "question 4 turn 2: judge_unparseable" in stdout
    assert "by category: coding" in stdout
    # the key reached the API and nothing that was written
    assert api.stats.answered > 0
    assert_no_file_holds(out, api.api_key)
