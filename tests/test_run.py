"""`tapir run` end to end: two rounds of score → plan → expand → respond → train, with the real vLLM student,
classifier, Ray Train and DeepSpeed, and the paid API played by a loopback server.

The run is killed with SIGKILL in round 1's respond stage, the same command is killed again in round 1's
training (after a checkpoint), and run a third time: it must finish, every stage once, with no answered paid
call sent again beyond the batches in flight at the kill, and training must resume at its checkpointed step.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from browser import images_of
from conftest import kill_when
from safetensors.torch import load_file

from pipeline.config import RespondConfig
from pipeline.llm.emulated_api import EmulatedAPI, default_reply
from pipeline.llm.prompts import prompt_template
from pipeline.rounds import STAGES
from pipeline.stages.respond import style_for
from training.sft import format_summary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY_ENV = "TAPIR_TEST_RUN_KEY"
ROWS = 32
HELDOUT_ROWS = 6
BATCH = 8
# The smallest sizes that still take every path: planned rows with repeats and with hard and easy ones, new rows
# kept and dropped for each reason, two respond batches (so a kill lands between them), and enough optimizer steps
# of two 128-token sequences that a kill after the third lands mid-epoch, past a checkpoint at step 2.
PLANNED = 12
EXPANDED = 12
ANSWER_TOKENS = 16         # the emulated teacher writes a word a token: short answers train in seconds
# What Ray, Ray Data, vLLM, DeepSpeed, transformers and Python write; the console of `tapir run` shows none of it
THIRD_PARTY = re.compile(r"pid=\d+|\b(INFO|WARNING|DEBUG)\b|Traceback|Dataset|deepspeed|vllm|\bray\.|it/s|"
                         r"resource_tracker|Warning:")


def teacher_reply(body: dict) -> str:
    """Like a teacher: new tasks for expansion prompts (some of them bad in each of the ways the stage drops),
    JSON for judge and label requests, prose for answers."""
    prompt = body["messages"][-1]["content"]
    if body.get("response_format") or "[Given task]" not in prompt:
        return default_reply(body)
    seed = prompt.split("[Given task]")[1].split("[End of given task]")[0].strip()
    digest = int(hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest(), 16)
    kind = digest % 5
    if kind == 0:
        return f"New task: {seed}"                                # a near-duplicate of its seed, a pool row
    if kind == 1:
        return "Rewrite the instruction above."                   # mentions "instruction"
    if kind == 2:
        return "Explain it."                                      # three words or fewer
    words = " ".join(f"w{(digest >> (5 * i)) % 499}" for i in range(10))
    return f"Task: Explain {words} with one example."


def call_stage(prompt: str) -> str:
    """Which stage sent a prompt the loopback API answered: respond (a style system prompt), expand, or score
    (teacher, judge and task labels)."""
    messages = json.loads(prompt)
    if messages[0]["role"] == "system":
        return "respond"
    return "expand" if "[Given task]" in messages[-1]["content"] else "score"


# gradient checkpointing (the default) recomputes each forward: a third more compute per step, which a 135M model on
# a few short rows does not need; test_local_run keeps it on. No checkpoint (the default's 50 steps are more than a
# round has): the killed run asks for one every 2 steps only where it kills its training.
TRAINING = {"epochs": 1, "effective_batch_size": 2, "micro_batch_size": 1, "max_len": 128, "eval_fraction": 0.2,
            "gradient_checkpointing": False}


def write_config(tmp_path: Path, pool: Path, api: EmulatedAPI, cache_dir: Path, **overrides) -> Path:
    endpoint = {"kind": "remote", "base_url": api.base_url, "model": "paid-teacher", "api_key_env": KEY_ENV,
                "price": {"input_per_million_usd": 1.0, "output_per_million_usd": 4.0}}
    config = {
        "pool": {"source": str(pool), "rows_per_shard": 16},
        "storage": {"run_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)},
        "ray": {"num_cpus": 2},
        "student": {"batch_size": BATCH, "sampling": {"max_tokens": 16}},
        "teacher": endpoint,
        "classifier": {"label_sample_size": ROWS, "train": {"epochs": 1}},
        "curriculum": {"rounds": 2, "rows_per_round": PLANNED, "expansion_per_round": EXPANDED, "mfd_threshold": 0.0,
                       "keep_reference_outputs": False},
        "scoring": {"batch_size": BATCH, "batches_in_flight_per_actor": 1},
        "respond": {"max_tokens": ANSWER_TOKENS},
        "training": TRAINING,
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_pool(directory: Path, shared_data: Path) -> Path:
    path = directory / "pool.jsonl"
    path.write_text("\n".join((shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()[:ROWS]) + "\n")
    return path


@pytest.fixture
def pool(tmp_path, shared_data) -> Path:
    return write_pool(tmp_path, shared_data)


def tapir(*args, env, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([TAPIR, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def step_records(run: Path, round_index: int) -> list[dict]:
    path = run / f"round_{round_index}" / "sft" / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "step"]


@dataclass
class KilledRun:
    """A 2-round run killed in round 1's respond stage, killed again in its training, and run again to the end,
    with the loopback API still serving."""
    api: EmulatedAPI
    config: Path
    env: dict
    run: Path
    state_at_kill: dict
    calls_at_kill: Counter
    steps_at_training_kill: list[int]   # round 1's optimizer steps logged when the second command was killed
    calls: Counter          # every prompt the API answered, and how often, when the run had finished
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, shared_data, prepared_student):
    tmp_path = tmp_path_factory.mktemp("killed-run")
    api = EmulatedAPI(latency_s=0.05, reply=teacher_reply)
    with api.serving_in_thread():
        pool, cache = write_pool(tmp_path, shared_data), prepared_student.parent.parent
        config = write_config(tmp_path, pool, api, cache)
        env = {**os.environ, KEY_ENV: api.api_key}
        run = tmp_path / "run"
        # the output goes to a file: a pipe nobody reads fills up and blocks the run's progress bars
        log = tmp_path / "killed.log"
        with open(log, "w") as output:
            killed = subprocess.Popen([TAPIR, "run", str(config)], stdout=output, stderr=subprocess.STDOUT,
                                      cwd=REPO, env=env)
        # in round 1's respond stage, once some answers are written
        with open(log) as output:
            kill_when(killed, lambda: any((run / "round_1" / "respond" / "answers").glob("*.parquet")), 1500,
                      output)
        state_at_kill = json.loads((run / "state.json").read_text())
        calls_at_kill = Counter(api.stats.answered_prompts)

        # again, in round 1's training: after its third optimizer step, past a checkpoint at step 2. How often
        # training checkpoints shapes nothing it trains, so the run goes on with it changed
        write_config(tmp_path, pool, api, cache, training={**TRAINING, "checkpoint_every_steps": 2})
        log = tmp_path / "killed-in-training.log"
        with open(log, "w") as output:
            killed = subprocess.Popen([TAPIR, "run", str(config)], stdout=output, stderr=subprocess.STDOUT,
                                      cwd=REPO, env=env)
        with open(log) as output:
            kill_when(killed, lambda: len(step_records(run, 1)) >= 3, 1500, output)
        steps_at_training_kill = [r["step"] for r in step_records(run, 1)]

        resumed = tapir("run", str(config), env=env)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        write_config(tmp_path, pool, api, cache)        # and back: compare's baseline takes no checkpoint
        yield KilledRun(api, config, env, run, state_at_kill, calls_at_kill, steps_at_training_kill,
                        Counter(api.stats.answered_prompts), resumed)


@pytest.mark.timeout(2400)     # two rounds of training on 2 cores, two kills and three more invocations
def test_a_run_killed_in_round_1_finishes_both_rounds_when_run_again(killed_run):
    api, config, env, run = killed_run.api, killed_run.config, killed_run.env, killed_run.run
    state_at_kill, calls_at_kill, calls, resumed = (killed_run.state_at_kill, killed_run.calls_at_kill,
                                                    killed_run.calls, killed_run.resumed)
    again = tapir("run", str(config), env=env, timeout=300)
    assert again.returncode == 0 and Counter(api.stats.answered_prompts) == calls   # nothing left to do

    # respond takes seconds here: on a loaded machine the kill can land in the steps right after it
    assert state_at_kill["round"] == 1 and state_at_kill["stage"] in ("respond", "train_set", "train")
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "finished" and state["spent_usd"] > 0
    assert all(state["rounds"][r]["finished"] == ["score", "plan", "expand", "respond", "train_set", "train"]
               for r in ("0", "1"))

    # No paid call sent twice. The exceptions: respond batches in flight at the kill; the judge asked about a
    # row whose student answer did not change from round 0 (in both orders); an expansion prompt sent once
    # per request, so twice when a seed is expanded twice (a new sample each time at temperature > 0).
    sent_by_stage = {"respond": Counter(), "expand": Counter(), "score": Counter()}
    for prompt, n in calls.items():
        sent_by_stage[call_stage(prompt)][prompt] = n
    in_flight = {prompt: n for prompt, n in sent_by_stage["respond"].items() if n > 1}
    assert sum(n - 1 for n in in_flight.values()) <= 2 * BATCH and all(calls_at_kill[p] == 1 for p in in_flight)
    assert sum(sent_by_stage["expand"].values()) == 2 * EXPANDED
    scored = [{r["id"]: r["student_response"] for r in pads.dataset(run / f"round_{r}" / "score", format="parquet")
               .to_table(columns=["id", "student_response"]).to_pylist()} for r in (0, 1)]
    unchanged = sum(scored[0][i] == scored[1][i] for i in scored[0])
    judged_again = {prompt: n for prompt, n in sent_by_stage["score"].items() if n > 1}
    assert sum(judged_again.values()) <= 2 * 2 * unchanged and all(n == 2 for n in judged_again.values())

    # round 1 scored the new student against round 0's teacher answers: no teacher call in round 1's scoring
    scored_1 = pads.dataset(run / "round_1" / "score", format="parquet").to_table().to_pylist()
    assert len(scored_1) == ROWS and {r["teacher_source"] for r in scored_1} == {"earlier_round"}
    assert_training_resumed_at_its_checkpoint(killed_run)

    for r in (0, 1):
        plan = json.loads((run / f"round_{r}" / "plan" / "_manifest.json").read_text())
        assert plan["rows_planned"] == PLANNED and plan["hard_share_target"] == [0.5, 0.75][r]
        # the hard share the plan holds, not only the one configured: hard rows were there to meet the target
        planned = pq.read_table(run / f"round_{r}" / "plan" / "plan.parquet").to_pylist()
        hard_copies = sum(row["copies"] for row in planned if row["difficulty"] == "hard")
        assert sum(row["copies"] for row in planned) == PLANNED and plan["hard_rows_available"] > 0
        assert plan["hard_share_planned"] == round(hard_copies / PLANNED, 3) == [0.5, 0.75][r]
        new_rows = pq.read_table(run / f"round_{r}" / "expand" / "new_rows.parquet").to_pylist()
        assert len(new_rows) == EXPANDED
        reasons = Counter(row["status"] for row in new_rows)
        assert set(reasons) <= {"ok", "near_duplicate", "mentions_instruction", "too_short"}
        assert reasons["ok"] and reasons["near_duplicate"], reasons
        for row in new_rows:
            if row["status"] == "ok":
                assert row["task"] and row["seed_id"] and not row["instruction"].startswith("Task:")
            if row["status"] == "near_duplicate":
                assert "rouge_l=" in row["duplicate_of"]
        train = pq.read_table(run / f"round_{r}" / "train" / "part-0.parquet").to_pylist()
        origins = Counter(row["origin"] for row in train)
        assert origins == {"pool": PLANNED, "expansion": reasons["ok"]}
        assert all(row["style"] == style_for(row["task"], RespondConfig()) and row["output"] for row in train)
        summary = json.loads((run / f"round_{r}" / "summary.json").read_text())
        assert summary["rows"]["training_set"] == len(train) and summary["cost_usd"]["total"] > 0
        assert (run / f"round_{r}" / "model" / "config.json").exists()
    # round 1's respond stage reused round 0's answers to the rows both rounds planned
    planned = [set(pq.read_table(run / f"round_{r}" / "plan" / "plan.parquet")["id"].to_pylist()) for r in (0, 1)]
    respond_1 = json.loads((run / "round_1" / "respond" / "_manifest.json").read_text())
    assert 0 < respond_1["reused_from_earlier_rounds"] <= len(planned[0] & planned[1])
    # the style prompts reached the teacher as system messages
    styles = {prompt_template(name).template.strip() for name in ("style_step_by_step", "style_code", "style_detailed")}
    sent = [json.loads(prompt)[0]["content"] for prompt in calls if json.loads(prompt)[0]["role"] == "system"]
    assert sent and set(sent) <= styles
    assert "== round 1 ==" in resumed.stdout
    # the run ends with its report: a page whose plots all load in a browser
    assert f"report: {run / 'report' / 'report.html'}" in resumed.stdout
    page = images_of(run / "report" / "report.html")
    assert len(page.images) >= 5 and all(loaded for _, loaded in page.images), page.images
    assert api.api_key not in (run / "state.json").read_text()

    # the console: a line per stage, each round's summary and the result; what Ray, vLLM, DeepSpeed and
    # transformers print goes to the run's log
    first = (run.parent / "killed.log").read_text()       # round 0, and round 1 up to the kill
    second = (run.parent / "killed-in-training.log").read_text()
    for console in (first, second, resumed.stdout + resumed.stderr):
        assert len(console.splitlines()) <= 45 and not THIRD_PARTY.search(console), console
    assert all(f"round 0: {stage} done in" in first for stage in STAGES) and "== round 0 ==" in first
    assert "round 1: train done in" in resumed.stdout and "run finished: 2 round(s)" in resumed.stdout
    log = (run / "logs" / "run.log").read_text()
    # four invocations appended to it: the two killed ones, the resumed one, and the one that found nothing to do
    assert log.count("== tapir run ") == 4 and str(run / "logs" / "run.log") in first
    assert "(RayTrainWorker pid=" in log and "vllm" in log and "deepspeed" in log.lower()


def assert_training_resumed_at_its_checkpoint(killed_run: KilledRun) -> None:
    """Round 1's training, killed after its third step, resumed at the checkpoint taken before the kill (not step
    0) and redid each step from the same weights on the same sequences; the model it exported is whole."""
    run, steps_before = killed_run.run, killed_run.steps_at_training_kill
    manifest = json.loads((run / "round_1" / "sft" / "_manifest.json").read_text())
    total = manifest["steps"]["total_steps"]
    resumed_log = (run / "logs" / "run.log").read_text().split("== tapir run ")[3]
    resumed_at = int(resumed_log.split("resuming at step ")[1].split()[0])
    assert 2 <= resumed_at <= max(steps_before) < total
    records = step_records(run, 1)
    assert [r["step"] for r in records] == steps_before + list(range(resumed_at + 1, total + 1))
    assert records[len(steps_before)]["epoch"] > records[resumed_at - 1]["epoch"] > 0
    for redone in records[len(steps_before):]:
        if redone["step"] in steps_before:
            before = records[steps_before.index(redone["step"])]
            assert (redone["real_tokens"], redone["loss"]) == (before["real_tokens"], pytest.approx(before["loss"]))
    assert manifest["complete"] and manifest["training"]["steps_done"] == total
    evals = manifest["eval"]                       # eval_fraction: held-out perplexity before and after
    assert evals[0]["step"] == 0 and evals[-1]["step"] == total and evals[-1]["perplexity"] > 1
    trainable = manifest["data"]["rows_trainable"]
    assert trainable["eval"] > 0 and trainable["train"] + trainable["eval"] + manifest["data"][
        "rows_over_max_len"] == manifest["data"]["rows_in"]

    model = run / "round_1" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= \
        {p.name for p in model.iterdir()}
    trained = load_file(model / "model.safetensors")
    before = load_file(run / "round_0" / "model" / "model.safetensors")
    assert trained.keys() == before.keys()                        # tied weights saved once, as in the base
    assert trained["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    # the last round's model answered in vLLM; round 0's was loaded by round 1's scoring instead
    assert manifest["smoke"][0]["status"] == "ok" and manifest["smoke"][0]["response"].strip()
    first_round = json.loads((run / "round_0" / "sft" / "_manifest.json").read_text())
    assert first_round["smoke"] is None and "round 1's scoring" in first_round["smoke_skipped_because"]
    sft = run / "round_1" / "sft"
    assert (sft / "loss.png").stat().st_size > 10_000
    assert any(p.stat().st_size > 0 for p in (sft / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = run / "round_1" / "checkpoint" / "train"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())       # deleted once the model is in
    # `tapir train` shows the same summary, and trains a finished round no more
    summary = format_summary(manifest)
    assert "held-out perplexity" in summary and "vLLM smoke answer" in summary
    assert "no vLLM smoke answer: round 1's scoring loads it in vLLM" in format_summary(first_round)
    again = tapir("train", str(killed_run.config), "--round", "1", env=killed_run.env, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr[-2000:]


@pytest.mark.timeout(1800)     # a baseline's training and four models' evaluations
def test_eval_compare_trains_a_plain_baseline_and_scores_every_round_against_it(killed_run, shared_data):
    api, run = killed_run.api, killed_run.run
    heldout = killed_run.config.parent / "heldout.jsonl"
    lines = (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()
    rows = lines[1000:1000 + HELDOUT_ROWS]
    # ahead of them, a pool row as it is and one with a word added: both are dropped, not evaluated
    near = json.loads(lines[1])
    near["instruction"] += " Thanks"
    heldout.write_text("\n".join([lines[0], json.dumps(near)] + rows) + "\n")
    command = ("eval", "compare", str(killed_run.config), "--eval", str(heldout))
    before = Counter(api.stats.answered_prompts)
    done = tapir(*command, env=killed_run.env, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print(done.stdout)
    sent = Counter(api.stats.answered_prompts) - before

    # the baseline: as many rows as both rounds trained on, drawn from the pool, plain answers, trained
    trained = sum(pq.read_table(run / f"round_{r}" / "train" / "part-0.parquet").num_rows for r in (0, 1))
    baseline_set = pq.read_table(run / "baseline" / "round_0" / "train" / "part-0.parquet").to_pylist()
    pool_ids = set(pads.dataset(run / "round_0" / "score", format="parquet").to_table(columns=["id"])["id"]
                   .to_pylist())
    assert len(baseline_set) == trained and {row["id"] for row in baseline_set} <= pool_ids
    assert {row["style"] for row in baseline_set} == {"style_plain"} and all(row["output"] for row in baseline_set)
    plain = prompt_template("style_plain").template.strip()
    systems = [json.loads(prompt)[0]["content"] for prompt in sent if json.loads(prompt)[0]["role"] == "system"]
    assert systems and set(systems) == {plain}                    # the baseline's teacher answers, unstyled
    assert (run / "baseline" / "round_0" / "model" / "config.json").exists()
    baseline_sft = json.loads((run / "baseline" / "round_0" / "sft" / "_manifest.json").read_text())
    round_sft = json.loads((run / "round_0" / "sft" / "_manifest.json").read_text())
    assert baseline_sft["complete"] and baseline_sft["data"]["rows_in"] == trained
    assert baseline_sft["steps"]["effective_batch_size"] == round_sft["steps"]["effective_batch_size"]

    # every model on the same held-out rows against the same references, and each against the baseline
    compare = pq.read_table(run / "eval" / "compare.parquet").to_pylist()
    assert [(row["model"], row["round"]) for row in compare] == [
        ("base_student", None), ("baseline", None), ("round_0", 0), ("round_1", 1)]
    preferences, losses = {}, {}
    for row in compare:
        results = pq.read_table(run / "eval" / row["model"] / "results.parquet").to_pylist()
        assert [r["instruction"] for r in results] == [json.loads(line)["instruction"] for line in rows]
        assert {r["reference_source"] for r in results} == {"file"}
        preferences[row["model"]] = {r["id"]: r["preference"] for r in results if r["status"] == "ok"}
        summary = pq.read_table(run / "eval" / row["model"] / "summary.parquet").to_pylist()[0]
        assert (row["win_rate"], row["rows_judged"]) == (summary["win_rate"], summary["rows_judged"]) and \
            row["rows_judged"] == HELDOUT_ROWS
        # the reference loss: every row's reference answer scored under the model, the mean in every table
        assert {r["reference_loss_status"] for r in results} == {"ok"} and all(r["reference_loss"] > 0
                                                                             for r in results)
        losses[row["model"]] = {r["id"]: r["reference_loss"] for r in results}
        assert row["reference_loss"] == pytest.approx(np.mean(list(losses[row["model"]].values())))
        assert row["reference_loss"] == pytest.approx(summary["reference_loss"])
        assert row["reference_loss_rows"] == HELDOUT_ROWS and row["reference_loss_standard_error"] > 0
        overlap = json.loads((run / "eval" / row["model"] / "heldout" / "_overlap.json").read_text())
        assert row["rows_overlapping_pool"] == 2 and sorted(overlap["dropped"].values()) == ["near_duplicate",
                                                                                              "same_id"]
    for row in compare:
        if row["model"] == "baseline":
            assert row["difference_to_baseline"] is None and row["trained_rows"] == trained
            assert row["loss_difference_to_baseline"] is None
            continue
        expected = sum(preferences[row["model"]][i] - preferences["baseline"][i] for i in preferences["baseline"])
        assert row["difference_to_baseline"] == pytest.approx(expected / HELDOUT_ROWS)
        differences = [losses[row["model"]][i] - losses["baseline"][i] for i in losses["baseline"]]
        assert row["loss_difference_to_baseline"] == pytest.approx(np.mean(differences))
        assert row["loss_difference_standard_error"] == pytest.approx(np.std(differences, ddof=1) /
                                                                      np.sqrt(HELDOUT_ROWS))
        assert row["loss_rows_paired"] == HELDOUT_ROWS
    assert [row["trained_rows"] for row in compare] == [0, trained, trained - len(
        pq.read_table(run / "round_1" / "train" / "part-0.parquet")), trained]
    categories = pq.read_table(run / "eval" / "categories.parquet").to_pylist()
    assert {row["model"] for row in categories} == {row["model"] for row in compare}
    assert all(row["reference_loss"] > 0 for row in categories)
    assert sum(row["reference_loss_n"] for row in categories) == HELDOUT_ROWS * len(compare)
    assert "vs baseline" in done.stdout and "round_1" in done.stdout and "loss vs baseline" in done.stdout
    assert "held-out rows overlapping the pool, dropped before evaluation: 2" in done.stdout
    page = images_of(run / "report" / "report.html")
    assert all(loaded for _, loaded in page.images), page.images
    assert all((run / "report" / "plots" / name).exists() for name in ("win_rate.png", "category_scores.png",
                                                                        "reference_loss.png"))
    markdown = (run / "report" / "report.md").read_text()
    assert "Win rate: each round against the baseline" in markdown and "Scores per category" in markdown
    assert "Reference loss: each round against the baseline" in markdown

    # run again: everything is found finished, nothing is sent
    answered = Counter(api.stats.answered_prompts)
    again = tapir(*command, env=killed_run.env, timeout=300)
    assert again.returncode == 0 and Counter(api.stats.answered_prompts) == answered
    assert pq.read_table(run / "eval" / "compare.parquet").to_pylist() == compare


def wait_until(condition, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert process.poll() is None and condition(), log.read_text()[-3000:]


def test_a_run_stopped_by_its_budget_goes_on_under_a_larger_cap_and_stops_cleanly_on_sigterm_or_tapir_stop(
        tmp_path, pool, prepared_student):
    api = EmulatedAPI(reply=teacher_reply, latency_s=0.2)
    run = tmp_path / "run"
    with api.serving_in_thread():
        env = {**os.environ, KEY_ENV: api.api_key}
        config = write_config(tmp_path, pool, api, prepared_student.parent.parent, max_cost_usd=0.03)
        capped = tapir("run", str(config), env=env)
        assert capped.returncode == 3, capped.stdout[-2000:] + capped.stderr[-3000:]
        assert "budget" in capped.stdout and "run the same command to continue" in capped.stdout
        state = json.loads((run / "state.json").read_text())
        assert state["status"] == "stopped" and state["stopped_because"].startswith("budget")
        assert 0 < state["spent_usd"] <= 0.03
        # what the API billed, classifier labelling included, stayed under the cap
        assert 0 < api.stats.billed_usd(1.0, 4.0) <= 0.03
        spent_capped, answered_capped = state["spent_usd"], api.stats.answered

        # a larger cap: the same command goes on scoring from where the budget stopped it; SIGTERM (what
        # `ray job stop` and supervisors send) stops it at once, mid-stage, with its state saved
        write_config(tmp_path, pool, api, prepared_student.parent.parent, max_cost_usd=1.0)
        log = tmp_path / "go-on.log"
        scored_before = len(list((run / "round_0" / "score").glob("*.parquet")))
        with open(log, "w") as output:
            going_on = subprocess.Popen([TAPIR, "run", str(config)], stdout=output, stderr=subprocess.STDOUT,
                                        cwd=REPO, env=env)
        wait_until(lambda: len(list((run / "round_0" / "score").glob("*.parquet"))) > scored_before, going_on,
                   600, log)
        going_on.send_signal(signal.SIGTERM)
        assert going_on.wait(timeout=120) == 3, log.read_text()[-3000:]
        state = json.loads((run / "state.json").read_text())
        assert state["status"] == "stopped" and state["stage"] == "score"
        assert state["stopped_because"].startswith("interrupted")
        assert state["spent_usd"] > spent_capped and api.stats.answered > answered_capped
        assert api.stats.billed_usd(1.0, 4.0) <= 1.0

        # a stop asked for before the next stage: the run stops there, nothing more is spent
        stop = tapir("stop", str(config), env=env, timeout=60)
        assert stop.returncode == 0
        answered = api.stats.answered
        stopped = tapir("run", str(config), env=env)
        assert stopped.returncode == 3 and "stop requested" in stopped.stdout
        assert api.stats.answered == answered
        assert not (run / "STOP").exists()          # done with: the next run goes on


def test_a_run_whose_teacher_refuses_its_key_shows_the_error_and_the_log_that_explains_it(tmp_path, pool,
                                                                                             prepared_student):
    api = EmulatedAPI(reply=teacher_reply)
    with api.serving_in_thread():
        config = write_config(tmp_path, pool, api, prepared_student.parent.parent)
        refused = tapir("run", str(config), env={**os.environ, KEY_ENV: "a-revoked-key"}, timeout=300)
    log = tmp_path / "run" / "logs" / "run.log"
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert "tapir: error: " in refused.stderr and "answered 401" in refused.stderr and str(log) in refused.stderr
    assert len((refused.stdout + refused.stderr).splitlines()) <= 6 and not THIRD_PARTY.search(
        refused.stdout + refused.stderr), refused.stdout + refused.stderr
    text = log.read_text()
    assert "Traceback" in text and "answered 401" in text and "Ray" in text
