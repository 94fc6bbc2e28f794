"""A resumed run compares its config with the one it ran with: changes that shaped finished stages are refused,
the others (budget, rounds, pace) allowed and recorded. No Ray: the check comes before anything starts."""
import json

import pytest

from pipeline import rounds
from pipeline.config import RunConfig
from pipeline.resume import ResumeRefused, check
from pipeline.scoring import config_hash


def config(tmp_path, **sections) -> RunConfig:
    return RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")}, **sections})


def state_after(first: RunConfig, finished: dict) -> dict:
    return {"config": first.model_dump(mode="json"), "config_hash": config_hash(first),
            "rounds": {r: {"finished": stages, "summaries": {}} for r, stages in finished.items()}}


def test_a_setting_that_shaped_a_finished_stage_is_refused_with_the_keys_and_what_to_do(tmp_path):
    first = config(tmp_path)
    state = state_after(first, {"0": ["score", "plan"]})
    changed = config(tmp_path, curriculum={"mfd_threshold": 0.5, "rows_per_round": 100},
                     student={"sampling": {"temperature": 0.2}})
    with pytest.raises(ResumeRefused) as caught:
        check(state, changed, config_hash(changed), "run/state.json")
    message = str(caught.value)
    assert "curriculum.mfd_threshold: 1.0 → 0.5 (shaped plan of round 0)" in message
    assert "curriculum.rows_per_round: 200 → 100 (shaped plan of round 0)" in message
    assert "student.sampling.temperature: 0.7 → 0.2 (shaped score of round 0)" in message
    assert "Put the config back as it was to continue the run, or give the new config another storage.run_dir" \
        in message


def test_settings_that_shaped_no_finished_stage_may_change_and_are_returned_to_be_recorded(tmp_path):
    first = config(tmp_path)
    state = state_after(first, {"0": ["score", "plan", "expand", "respond", "train_set", "train"], "1": ["score"]})
    later = config(tmp_path, max_cost_usd=5.0, curriculum={"rounds": 4}, ray={"num_cpus": 8},
                   teacher={"requests_per_minute": 50})
    assert check(state, later, config_hash(later), "s") == {
        "curriculum.rounds": [2, 4], "max_cost_usd": [None, 5.0], "ray.num_cpus": [None, 8],
        "teacher.requests_per_minute": [600, 50]}
    # training shapes only the train stage: free to change while no round has trained
    untrained = state_after(first, {"0": ["score", "plan", "expand"]})
    fewer_epochs = config(tmp_path, training={"epochs": 1})
    assert check(untrained, fewer_epochs, config_hash(fewer_epochs), "s") == {"training.epochs": [3, 1]}
    with pytest.raises(ResumeRefused, match=r"training.epochs: 3 → 1 \(shaped train of round 0\)"):
        check(state, fewer_epochs, config_hash(fewer_epochs), "s")
    # ... but how often it checkpoints and how many worker failures it survives shape nothing it trained
    sturdier = config(tmp_path, training={"checkpoint_every_steps": 5, "max_failures": 2})
    assert check(state, sturdier, config_hash(sturdier), "s") == {
        "training.checkpoint_every_steps": [50, 5], "training.max_failures": [0, 2]}


def test_the_pool_and_the_classifier_count_once_prepared_even_before_round_0_finishes_scoring(tmp_path):
    first = config(tmp_path)
    started = {**state_after(first, {}), "rounds": {"0": {"finished": [], "summaries": {}}}}
    thinner = config(tmp_path, pool={"sample_fraction": 0.1})
    assert check(started, thinner, config_hash(thinner), "s") == {"pool.sample_fraction": [None, 0.1]}
    with pytest.raises(ResumeRefused, match=r"pool.sample_fraction: null → 0.1 \(shaped pool import\)"):
        check(started, thinner, config_hash(thinner), "s", prepared=["pool import"])
    relabelled = config(tmp_path, classifier={"label_sample_size": 50})
    with pytest.raises(ResumeRefused, match=r"classifier.label_sample_size: 1000 → 50 \(shaped classifier\)"):
        check(started, relabelled, config_hash(relabelled), "s", prepared=["pool import", "classifier"])


def test_a_setting_the_code_added_since_the_run_started_is_no_change_of_the_users(tmp_path):
    first = config(tmp_path)
    state = state_after(first, {"0": ["score"]})
    del state["config"]["teacher"]["max_attempts"]          # as if the run started before the setting existed
    assert check(state, first, config_hash(first), "s") == {"teacher.max_attempts": [None, 6]}


def test_a_state_that_recorded_only_the_hash_warns_and_compares_from_then_on(tmp_path, caplog):
    first, other = config(tmp_path), config(tmp_path, max_cost_usd=1.0)
    legacy = {"config_hash": config_hash(first), "rounds": {"0": {"finished": ["score"]}}}
    assert check(legacy, first, config_hash(first), "s") == {} and not caplog.records
    assert check(legacy, other, config_hash(other), "s") == {}
    assert "settings are compared from now on" in caplog.text


def test_tapir_run_refuses_the_resume_before_starting_anything_and_leaves_the_state_as_it_was(tmp_path):
    first = config(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = {**state_after(first, {"0": ["score"]}), "status": "stopped"}
    (run_dir / "state.json").write_text(json.dumps(state))
    with pytest.raises(ResumeRefused, match=r"(?s)state.json: this run was started with another config.*\n"
                                            r"  judge.kind: null → \"remote\" \(shaped score of round 0\)"):
        rounds.run(config(tmp_path, judge={"kind": "remote", "base_url": "http://127.0.0.1:1/v1", "model": "j"}),
                   progress=False)
    assert json.loads((run_dir / "state.json").read_text()) == state


def test_the_same_run_directory_spelled_another_way_is_the_same_run(tmp_path, monkeypatch):
    first = config(tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = RunConfig.model_validate({"storage": {"run_dir": "run"}})
    assert check(state_after(first, {"0": ["score"]}), relative, config_hash(relative), "s") == {
        "storage.run_dir": [str(tmp_path / "run"), "run"]}


def test_tapir_run_counts_an_imported_pool_as_prepared(tmp_path):
    first = config(tmp_path)
    (tmp_path / "run" / "pool").mkdir(parents=True)
    (tmp_path / "run" / "pool" / "_manifest.json").write_text("{}")
    (tmp_path / "run" / "state.json").write_text(json.dumps(state_after(first, {})))
    with pytest.raises(ResumeRefused,
                       match=r"pool.source: \"bundled:sample\" → \"other.jsonl\" \(shaped pool import\)"):
        rounds.run(config(tmp_path, pool={"source": "other.jsonl"}), progress=False)
