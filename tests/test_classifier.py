"""The task classifier: teacher-labelled sample (resumable), fine-tuning, and the classify stage."""
import asyncio
import json
import struct
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import store, task_labels
from pipeline.config import DEFAULT_TASK_TARGETS, ClassifierConfig, PoolConfig, RunConfig
from pipeline.llm.client import EndpointError
from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.llm.endpoint import OpenEndpoint
from pipeline.llm.judge import request_text
from pipeline.llm.secret import Secret
from pipeline.llm.shared_limits import local_limits
from pipeline.models import bundled_encoder_dir
from pipeline.pool import import_pool, read_pool
from pipeline.stages.classify import TaskClassifier
from pipeline.task_labels import label_sample, labels_location, read_labels
from training import TrainingDataError
from training.classifier import train_classifier

CATEGORIES = list(DEFAULT_TASK_TARGETS)


@pytest.fixture(scope="module")
def sample_pool(tmp_path_factory) -> pa.Table:
    location = store.locate(str(tmp_path_factory.mktemp("pool")))
    import_pool(["bundled:sample"], location, PoolConfig(), progress=False)
    return read_pool(location)


def gold(pool: pa.Table) -> tuple[list[str], list[str]]:
    """The sample pool's own categories, written with it: labels a good teacher would give."""
    rows = pool.to_pylist()
    return ([request_text(r["instruction"], r["input"]) for r in rows],
            [json.loads(r["meta"])["category"] for r in rows])


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory) -> tuple[Path, dict, int]:
    """Trained the way a run with classifier.labels_path trains it (the bundled pool's own categories), with a
    teacher at hand that must not be asked: (model directory, metrics, requests the teacher received)."""
    from pipeline.classification import classifier_dir, ensure_classifier

    with EmulatedAPI(api_key="k").serving_in_thread() as api:
        config = RunConfig.model_validate({
            "storage": {"run_dir": str(tmp_path_factory.mktemp("labelled") / "run")},
            "teacher": {"kind": "remote", "base_url": api.base_url, "model": "teacher"},
            "classifier": {"labels_path": "bundled:sample", "train": {"epochs": 5, "learning_rate": 2e-4}}})
        limits = local_limits([config.teacher], None)
        ensure_classifier(config, OpenEndpoint(api.base_url, "teacher", Secret("k")), limits, progress=False)
    out = classifier_dir(config)
    return out, json.loads((out / "metrics.json").read_text()), api.stats.received


def test_the_classifier_learns_the_task_categories_of_a_labelled_file_without_an_api_call(trained_classifier):
    out, metrics, requests = trained_classifier
    assert requests == 0 and metrics["labels"] == "bundled:sample"
    assert metrics["held_out_rows"] >= 30 and metrics["train_rows"] + metrics["held_out_rows"] == 339
    assert metrics["accuracy"] >= 0.4          # 32 classes, the largest 12%: far above chance
    assert 0 < metrics["macro_f1"] <= 1 and set(metrics["per_class_f1"]) <= set(CATEGORIES)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]
    png = (out / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] >= 500


def test_the_classify_stage_adds_task_and_confidence_to_every_row(trained_classifier, sample_pool):
    out, _, _ = trained_classifier
    stage = TaskClassifier(str(out), max_len=128)
    batch = sample_pool.slice(0, 40)
    labelled = stage(batch)
    assert labelled.num_rows == 40 and labelled.column("id").to_pylist() == batch.column("id").to_pylist()
    assert set(labelled.column("task").to_pylist()) <= set(CATEGORIES)
    confidences = labelled.column("task_confidence").to_pylist()
    assert all(0 < c <= 1 for c in confidences)
    truth = gold(batch)[1]
    agreement = sum(t == p for t, p in zip(truth, labelled.column("task").to_pylist())) / 40
    assert agreement >= 0.5                    # mostly training rows: it must have learnt them
    with pytest.raises(ValueError, match="stage 'classify' needs column.s. input"):
        stage(batch.drop_columns(["input"]))


def test_categories_without_examples_still_get_an_output(trained_classifier):
    out, metrics, _ = trained_classifier
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 32
    assert metrics["categories_without_examples"] == []


def test_too_few_or_unknown_labels_stop_before_training(tmp_path):
    backbone = str(bundled_encoder_dir())
    with pytest.raises(TrainingDataError, match="need at least 10 rows"):
        train_classifier(["a"] * 5, ["Math"] * 5, CATEGORIES, backbone, ClassifierConfig(), tmp_path)
    with pytest.raises(TrainingDataError, match="not among the configured categories: Cooking"):
        train_classifier(["a"] * 20, ["Math"] * 10 + ["Cooking"] * 10, CATEGORIES, backbone, ClassifierConfig(),
                         tmp_path)


def test_a_labelled_file_with_a_category_outside_the_targets_is_refused_naming_file_line_and_field(tmp_path):
    from pipeline.classification import labelled_file

    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "category": "Math"} for i in range(12)]
    rows[4]["category"] = "Cooking"
    del rows[7]["category"]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = RunConfig.model_validate({"classifier": {"labels_path": str(path)}})
    with pytest.raises(TrainingDataError) as refused:
        labelled_file(config)
    message = str(refused.value)
    assert f"{path}: 2 row(s) without a usable category" in message
    assert f"{path}:5: field 'category': 'Cooking' is not one of curriculum.task_targets" in message
    assert f"{path}:8: field 'category': missing" in message
    rows[4]["category"], rows[7]["category"] = "Math", "Reasoning"
    rows[2]["instruction"] = ""                            # a row the pool import cannot take
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(TrainingDataError, match=f"1 row.s. cannot be read; the first, {path}:3: field 'instruction'"):
        labelled_file(config)


def labelling_run_config(tmp_path: Path, api: EmulatedAPI, size: int) -> RunConfig:
    return RunConfig.model_validate({
        "storage": {"run_dir": str(tmp_path / "run")}, "classifier": {"label_sample_size": size},
        "teacher": {"kind": "remote", "base_url": api.base_url, "model": "teacher"}})


def first_category_named(body: dict) -> str:
    """A teacher that answers with the category named in the request, or cannot decide."""
    prompt = body["messages"][0]["content"].split("[Request]", 1)[1]
    return '{"task": "Math"}' if any(ch.isdigit() for ch in prompt) else "I am not sure."


def test_teacher_labelling_marks_what_it_cannot_label_and_resumes_without_asking_twice(
        sample_pool, tmp_path, monkeypatch):
    monkeypatch.setattr(task_labels, "_CHUNK_ROWS", 10)

    async def run(size: int, revoke_after: int = 0):
        api = EmulatedAPI(api_key="k")

        def reply(body):
            if revoke_after and api.stats.answered + 1 >= revoke_after:
                api.api_key = "revoked"          # the key stops working part-way: later requests get 401
            return first_category_named(body)
        api.reply = reply
        async with api:
            config = labelling_run_config(tmp_path, api, size)
            endpoint = OpenEndpoint(api.base_url, "teacher", Secret("k"))
            try:
                return await label_sample(config, endpoint, sample_pool, progress=False), api
            except EndpointError:
                return None, api

    summary, api = asyncio.run(run(40, revoke_after=25))
    assert summary is None                                   # stopped by the 401
    location = labels_location(labelling_run_config(tmp_path, api, 40))
    kept = read_labels(location).num_rows
    assert kept == 30                      # the chunks answered before the key stopped working were written

    summary, api = asyncio.run(run(40))
    assert summary.already_labelled == 30 and api.stats.answered == 10   # only the rest was asked
    labels = read_labels(location)
    assert labels.num_rows == 40 and len(set(labels.column("id").to_pylist())) == 40
    statuses = labels.column("status").to_pylist()
    assert set(statuses) == {"ok", "failed"}
    failed = [e for e, s in zip(labels.column("error").to_pylist(), statuses) if s == "failed"]
    assert all(e.startswith("unlabelled: no single category") for e in failed)
    assert all(t is None for t, s in zip(labels.column("task").to_pylist(), statuses) if s == "failed")


@pytest.mark.slow
def test_classifier_apply_labels_the_whole_pool_on_ray(trained_classifier, tmp_path):
    import shutil

    import pyarrow.parquet as pq
    import ray

    from pipeline import classification

    out, _, _ = trained_classifier
    config = RunConfig.model_validate({"storage": {"run_dir": str(tmp_path / "run")}, "ray": {"num_cpus": 4},
                                       "classifier": {"num_actors": 2, "batch_size": 32}})
    shutil.copytree(out, classification.classifier_dir(config))
    try:
        summary = classification.apply(config)
    finally:
        ray.shutdown()
    assert summary["rows_in"] == summary["rows_out"] == 339
    written = pq.read_table(tmp_path / "run" / "round_0" / "classify")
    pool = read_pool(store.locate(str(tmp_path / "run" / "pool")))
    assert sorted(written.column("id").to_pylist()) == sorted(pool.column("id").to_pylist())
    assert set(written.column("task").to_pylist()) <= set(CATEGORIES)
