"""The expand and respond stages over real HTTP (the loopback API), and the planner's two driver steps on a
run directory, without Ray."""
import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import planning, responding, store
from pipeline.config import ConfigError, EndpointConfig, ExpansionConfig, RespondConfig, RunConfig, load_config
from pipeline.difficulty import verdicts, write_verdicts
from pipeline.llm.emulated_api import EmulatedAPI, Faults
from pipeline.llm.prompts import prompt_template
from pipeline.llm.shared_limits import local_limits
from pipeline.stages.expand import SeedExpander, cleaned
from pipeline.stages.respond import StyledAnswer, style_for

KEY_ENV = "TAPIR_TEST_EXPAND_KEY"


def run_stage(monkeypatch, make_stage, batch: pa.Table, **api_options) -> tuple[pa.Table, list]:
    """One batch through a stage against a fresh loopback API; the batch out and the messages it was sent."""
    async def scenario():
        async with EmulatedAPI(**api_options) as api:
            monkeypatch.setenv(KEY_ENV, api.api_key)
            config = EndpointConfig(kind="remote", base_url=api.base_url, model="teacher", api_key_env=KEY_ENV,
                                    max_attempts=2, timeout_s=5)
            stage = make_stage(config, api.base_url, local_limits([config], None))
            out = await stage(batch)
            await (await stage.client()).__aexit__(None, None, None)
            return out, [json.loads(p) for p in api.stats.answered_prompts]

    return asyncio.run(scenario())


def test_the_new_instruction_is_kept_without_the_labels_and_quotes_small_models_add():
    assert cleaned('New task: "Name three rivers in Africa."') == "Name three rivers in Africa."
    assert cleaned("#Created Prompt#: Sort the list.") == "Sort the list."
    assert cleaned("  Task: Explain tides.  ") == "Explain tides."
    assert cleaned("Tasks for a weekend: list five.") == "Tasks for a weekend: list five."


def test_hard_and_easy_seeds_get_their_own_prompt_with_the_seed_in_it(monkeypatch):
    seeds = pa.Table.from_pylist([
        {"id": "q1", "seed_id": "s1", "seed_instruction": "Solve 2x + 3 = 9.", "seed_input": "", "difficulty": "hard"},
        {"id": "q2", "seed_id": "s2", "seed_instruction": "Translate this.", "seed_input": "Bonjour", "difficulty": "easy"}])
    out, sent = run_stage(monkeypatch, lambda c, url, limits: SeedExpander(c, url, "teacher", limits, ExpansionConfig()),
                          seeds, reply=lambda body: "New task: Write a haiku about the sea.")
    rows = out.to_pylist()
    assert [r["instruction"] for r in rows] == ["Write a haiku about the sea."] * 2
    assert all(r["expand_status"] == "ok" and r["expand_finish_reason"] == "stop" and r["input"] == "" for r in rows)
    assert [r["seed_id"] for r in rows] == ["s1", "s2"]                    # the request's columns are kept
    prompts = sorted(m[0]["content"] for m in sent)
    easy, hard = prompts if "rarer" in prompts[0] else prompts[::-1]
    assert "Solve 2x + 3 = 9." in hard and "same task type" in hard
    assert "Translate this.\n\nBonjour" in easy and "rarer" in easy


def test_an_expansion_request_that_fails_keeps_its_row_with_the_reason(monkeypatch):
    seeds = pa.Table.from_pylist([{"id": "q1", "seed_id": "s1", "seed_instruction": "Name a color.", "seed_input": "",
                                   "difficulty": "hard"}])
    out, _ = run_stage(monkeypatch, lambda c, url, limits: SeedExpander(c, url, "teacher", limits, ExpansionConfig()),
                       seeds, faults=Faults(server_error=1.0))
    row = out.to_pylist()[0]
    assert row["expand_status"] != "ok" and "500" in row["expand_error"] and row["instruction"] == ""


def test_a_prompt_file_without_the_seed_placeholder_or_a_style_that_is_missing_is_refused_with_the_config(tmp_path):
    prompt = tmp_path / "mine.txt"
    prompt.write_text("Write a new task.")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"expansion:\n  hard_prompt: {prompt}\n")
    with pytest.raises(ConfigError, match=r"expansion.hard_prompt.*mine.txt.*\$seed"):
        load_config(config_file)
    config_file.write_text(f"respond:\n  styles:\n    Law: {tmp_path / 'law.txt'}\n")
    with pytest.raises(ConfigError, match=r"respond.*law.txt: cannot read the prompt file"):
        load_config(config_file)
    config_file.write_text("respond:\n  default_style: style_nope\n")
    with pytest.raises(ConfigError, match=r"respond.*no bundled prompt 'style_nope'"):
        load_config(config_file)
    with pytest.raises(FileNotFoundError, match="no bundled prompt 'nope'.*style_code"):
        prompt_template("nope")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prompt_template(str(tmp_path / "missing.txt"))


def test_each_task_is_answered_in_its_style_as_a_system_prompt(monkeypatch, tmp_path):
    mine = tmp_path / "law.txt"
    mine.write_text("Answer as a careful lawyer.")
    respond = RespondConfig(styles={**RespondConfig().styles, "Law": str(mine)})
    rows = pa.Table.from_pylist([
        {"id": "a", "instruction": "What is 17 * 3?", "input": "", "task": "Math"},
        {"id": "b", "instruction": "Fix this loop.", "input": "for i in range(3) print(i)", "task": "Code Debug"},
        {"id": "c", "instruction": "Describe a sunset.", "input": "", "task": "Writing"},
        {"id": "d", "instruction": "Is a verbal contract binding?", "input": "", "task": "Law"}])
    out, sent = run_stage(monkeypatch, lambda c, url, limits: StyledAnswer(c, url, "teacher", limits, respond), rows)
    assert out.column("style").to_pylist() == ["style_step_by_step", "style_code", "style_detailed", str(mine)]
    assert out.column("respond_status").to_pylist() == ["ok"] * 4
    system = {m[1]["content"]: m[0]["content"] for m in sent}
    assert "step by step" in system["What is 17 * 3?"]
    assert "code" in system["Fix this loop.\n\nfor i in range(3) print(i)"]
    assert "well-structured" in system["Describe a sunset."]
    assert system["Is a verbal contract binding?"] == "Answer as a careful lawyer."
    assert style_for("Unknown task", respond) == "style_detailed"


def test_a_request_an_earlier_round_sent_is_answered_from_there_not_sent_again(monkeypatch, tmp_path):
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")}})
    rows = [{"id": i, "instruction": f"Question {i}", "input": "", "task": "Math"} for i in "abc"]
    answered, _ = run_stage(monkeypatch, lambda c, url, limits: StyledAnswer(c, url, "teacher", limits, config.respond),
                            pa.Table.from_pylist(rows))
    failed = pa.array([s if i != "c" else "server_error" for i, s in zip("abc", answered["respond_status"].to_pylist())])
    answered = answered.set_column(answered.schema.get_field_index("respond_status"), "respond_status", failed)
    store.write_parquet(responding.respond_location(config, 0).child("answers"), "part-0.parquet", answered)

    # round 1 plans a and c again (c failed in round 0), b with another input, and a new row d
    again = pa.Table.from_pylist([rows[0], {**rows[1], "input": "more context"}, rows[2],
                                  {"id": "d", "instruction": "Question d", "input": "", "task": "Math"}])
    reused, to_ask = responding.reused_answers(config, 1, again, "teacher")
    assert reused["id"].to_pylist() == ["a"] and to_ask["id"].to_pylist() == ["b", "c", "d"]
    assert reused.to_pylist()[0] == {**answered.to_pylist()[0], "respond_prompt_tokens": 0,
                                     "respond_completion_tokens": 0}
    store.write_parquet(responding.respond_location(config, 1).child("reused"), "reused.parquet", reused)
    assert responding.read_answers(config, 1)["id"].to_pylist() == ["a"]
    # another model or other sampling settings make another call
    assert responding.reused_answers(config, 1, again, "another-teacher")[0].num_rows == 0
    longer = config.model_copy(update={"respond": RespondConfig(max_tokens=config.respond.max_tokens + 1)})
    assert responding.reused_answers(longer, 1, again, "teacher")[0].num_rows == 0


def scored_round(tmp_path) -> RunConfig:
    config = RunConfig.model_validate({
        "storage": {"run_dir": str(tmp_path / "run")},
        "curriculum": {"rows_per_round": 12, "mfd_threshold": 1.0, "hard_share_start": 0.5,
                       "task_targets": {"Math": 0.5, "Writing": 0.5}}})
    rows = [{"id": f"r{i:02d}", "instruction": f"Question {i}", "input": "", "output": f"Reference {i}" if i % 4 else None,
             "task": "Math" if i % 3 else "Writing",
             "mfd": [3.0, 0.0, -1.0][i % 3] if i != 7 else None, "status": "ok" if i != 7 else "judge_unparseable",
             "error": None if i != 7 else "no score in the reply"} for i in range(12)]
    store.write_parquet(store.locate(str(tmp_path / "run" / "round_0" / "score")), "part-0.parquet",
                        pa.Table.from_pylist(rows))
    write_verdicts(config, 0, verdicts(config, pa.Table.from_pylist(rows)))
    return config


def test_the_plan_keeps_each_row_once_with_its_copies_and_says_why(tmp_path):
    config = scored_round(tmp_path)
    summary = planning.plan(config, 0)
    planned = planning.read_plan(config, 0).to_pylist()
    assert sum(r["copies"] for r in planned) == summary["rows_planned"] == 12
    assert len({r["id"] for r in planned}) == len(planned) == summary["distinct_rows"]
    assert "r07" not in {r["id"] for r in planned} and summary["rows_unscored"] == 1
    assert summary["hard_rows_planned"] == 6 and summary["hard_share_planned"] == 0.5
    assert all((r["difficulty"] == "hard") == (r["difficulty_score"] >= 1.0) for r in planned)
    assert summary["difficulty"]["rows"] == 11 and sum(summary["difficulty"]["histogram"].values()) == 11
    assert planning.plan(config, 0)["skipped"]


def test_the_training_set_repeats_planned_rows_adds_new_ones_and_counts_what_it_leaves_out(tmp_path):
    config = scored_round(tmp_path)
    planning.plan(config, 0)
    planned = planning.read_plan(config, 0).to_pylist()
    new_rows = pa.Table.from_pylist([{"id": "n1", "instruction": "A new one", "input": "", "task": "Writing",
                                      "difficulty": "easy", "seed_id": planned[0]["id"]}])
    unanswered = planned[1]["id"]
    answers = pa.Table.from_pylist(
        [{"id": r["id"], "respond_response": f"answer {r['id']}", "respond_status": "ok" if r["id"] != unanswered
          else "server_error", "respond_finish_reason": "length" if r["id"] == planned[2]["id"] else "stop",
          "style": "style_detailed"} for r in planned] +
        [{"id": "n1", "respond_response": "new answer", "respond_status": "ok", "respond_finish_reason": "stop",
          "style": "style_detailed"}])
    summary = planning.write_training_set(config, 0, new_rows, answers)
    train = pq.read_table(tmp_path / "run" / "round_0" / "train" / "part-0.parquet").to_pylist()
    expected = sum(r["copies"] for r in planned if r["id"] != unanswered) + 1
    assert len(train) == summary["rows"] == expected
    assert summary["left_out_unanswered"] == {"server_error": planned[1]["copies"]}
    assert summary["answers_cut_off"] == planned[2]["copies"]
    new = [r for r in train if r["origin"] == "expansion"]
    assert new == [{"id": "n1", "instruction": "A new one", "input": "", "output": "new answer", "task": "Writing",
                    "difficulty": "easy", "origin": "expansion", "seed_id": planned[0]["id"], "style": "style_detailed"}]
    assert all(r["output"] == f"answer {r['id']}" for r in train if r["origin"] == "pool")


def test_with_pool_answers_reference_a_planned_row_trains_on_its_reference_and_only_the_rest_go_to_the_teacher(
        tmp_path):
    config = scored_round(tmp_path)
    planning.plan(config, 0)
    planned = planning.read_plan(config, 0)
    new_rows = pa.Table.from_pylist([{"id": "n1", "instruction": "A new one", "input": "", "task": "Writing",
                                      "difficulty": "easy", "seed_id": None}])
    requests = responding.requests_table(config, 0, new_rows)
    # the default is TAPIR's: the teacher answers every planned row again
    assert responding.reference_answers(config, 0, requests)[1].equals(requests)

    config = config.model_copy(update={"respond": RespondConfig(pool_answers="reference")})
    kept, to_ask = responding.reference_answers(config, 0, requests)
    with_reference = {r["id"]: r["output"] for r in planned.to_pylist() if r["output"]}
    assert 0 < len(with_reference) < planned.num_rows            # the fixture has rows of both kinds
    assert sorted(kept["id"].to_pylist()) == sorted(with_reference)
    assert sorted(to_ask["id"].to_pylist()) == sorted({*planned["id"].to_pylist(), "n1"} - with_reference.keys())
    assert all(r["respond_response"] == with_reference[r["id"]] and r["style"] == "reference"
               and r["respond_status"] == "ok" and r["respond_prompt_tokens"] == r["respond_completion_tokens"] == 0
               for r in kept.to_pylist())

    # nothing left for the teacher (every planned row kept its reference, no new row): nothing is asked
    nothing = responding.reused_answers(config, 0, requests.filter(pa.array([False] * requests.num_rows)), "teacher")
    assert nothing[0].num_rows == nothing[1].num_rows == 0
    store.write_parquet(responding.respond_location(config, 0).child("reference"), "reference.parquet", kept)
    teacher = [{**r, "respond_response": f"teacher {r['id']}", "respond_status": "ok", "respond_finish_reason": "stop",
                "style": "style_detailed", "respond_prompt_tokens": 9, "respond_completion_tokens": 9,
                "respond_error": None, "respond_request_key": "k"} for r in to_ask.to_pylist()]
    store.write_parquet(responding.respond_location(config, 0).child("answers"), "part-0.parquet",
                        pa.Table.from_pylist(teacher))
    summary = planning.write_training_set(config, 0, new_rows, responding.read_answers(config, 0))
    train = pq.read_table(tmp_path / "run" / "round_0" / "train" / "part-0.parquet").to_pylist()
    assert summary["rows"] == sum(planned["copies"].to_pylist()) + 1
    assert all(r["output"] == with_reference.get(r["id"], f"teacher {r['id']}") for r in train)
    assert summary["styles"]["reference"] == sum(r["copies"] for r in planned.to_pylist() if r["id"] in with_reference)
