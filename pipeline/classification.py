"""The task classifier's three commands: teacher-label a sample, train on it, apply it to the pool.

With `classifier.labels_path` the classifier trains on a labelled file instead (instruction, input, category):
no teacher labels and no API call."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import pyarrow.compute as pc

from pipeline import store
from pipeline.config import EndpointConfig, PoolConfig, RunConfig
from pipeline.llm.endpoint import OpenEndpoint, open_endpoint
from pipeline.llm.judge import request_text
from pipeline.models import Model, local_model, resolve_model, run_model
from pipeline.pool import ensure_pool, read_pool
from pipeline.task_labels import LabelSummary, label_sample, labels_location, read_labels

log = logging.getLogger(__name__)


def run_dir(config: RunConfig) -> store.Location:
    return store.locate(config.storage.run_dir, config.storage.s3_endpoint_url)


def round_location(config: RunConfig, round_index: int) -> store.Location:
    return run_dir(config).child(f"round_{round_index}")


def model_location(config: RunConfig, round_index: int) -> store.Location:
    """The student trained in that round: the next round's student."""
    return round_location(config, round_index).child("model")


def checkpoint_location(config: RunConfig, round_index: int, stage: str) -> store.Location:
    """Where a stage of the round keeps what lets a killed run resume (deleted once the stage is done)."""
    return round_location(config, round_index).child("checkpoint", stage)


def classifier_location(config: RunConfig) -> store.Location:
    """The trained task classifier (HF model directory, with metrics.json and confusion.png)."""
    return run_dir(config).child("classifier", "model")


def classifier_model(config: RunConfig) -> Model:
    """The trained task classifier as the classify stage's actors load it."""
    return run_model(classifier_location(config), config.storage.cache_dir)


def classifier_dir(config: RunConfig) -> Path:
    """The classifier's directory when the run directory is local (tools that open its files directly)."""
    location = classifier_location(config)
    if not location.is_local:
        raise ValueError(f"{location.uri}: not on a local file system; use classifier_location")
    return Path(location.path)


def label(config: RunConfig, progress: bool = True) -> LabelSummary:
    pool_dir, _ = ensure_pool(config)
    pool = read_pool(pool_dir)
    with open_endpoint(config.teacher, config.storage.cache_dir) as endpoint:
        return asyncio.run(label_sample(config, endpoint, pool, progress))


def ensure_classifier(config: RunConfig, endpoint: OpenEndpoint, limits, progress: bool = True) -> Model:
    """The trained classifier; without one, the teacher labels a sample (under the run's `limits`) and it is
    trained now."""
    location = classifier_location(config)
    if not location.child("config.json").exists():
        if config.classifier.labels_path:
            log.info("no trained task classifier in %s: training it on %s", location.uri, config.classifier.labels_path)
        else:
            log.info("no trained task classifier in %s: labelling a sample with the teacher and training it",
                     location.uri)
            pool_dir, _ = ensure_pool(config)
            asyncio.run(label_sample(config, endpoint, read_pool(pool_dir), progress, limits))
        train(config)
    return classifier_model(config)


def labelled_file(config: RunConfig) -> tuple[list[str], list[str]]:
    """(request texts, categories) of classifier.labels_path, read as `tapir pool import` reads a pool. A row that
    cannot be read, or whose category is missing or not among curriculum.task_targets, is an error naming the file,
    the line and the field: a label the classifier cannot have would otherwise be dropped or learnt silently."""
    from pipeline.evaluation.winrate_run import evaluated_rows
    from pipeline.pool import QUARANTINE, import_pool
    from training import TrainingDataError

    path, categories = config.classifier.labels_path, list(config.curriculum.task_targets)
    with tempfile.TemporaryDirectory(prefix="tapir-labels-") as local:
        imported = store.locate(local)
        import_pool([path], imported, PoolConfig(max_row_chars=config.pool.max_row_chars), overwrite=True,
                    progress=False)
        quarantine = Path(local) / QUARANTINE
        if quarantine.exists():
            rejected = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()]
            first = rejected[0]
            raise TrainingDataError(f"classifier.labels_path {path}: {len(rejected)} row(s) cannot be read; the first, "
                                    f"{first['where']}: field '{first['field']}': {first['detail']}")
        rows = evaluated_rows(read_pool(imported), 2 ** 62)       # `task`: the row's category (or task) field
    problems = [f"{where}: field 'category': " + ("missing" if task is None else f"{task!r} is not one of "
                                                  "curriculum.task_targets")
                for where, task in zip(rows.column("source").to_pylist(), rows.column("task").to_pylist())
                if task not in categories]
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise TrainingDataError(f"classifier.labels_path {path}: {len(problems)} row(s) without a usable category "
                                f"({listed}); the categories are: {', '.join(categories)}")
    texts = [request_text(i, x or "") for i, x in zip(rows.column("instruction").to_pylist(),
                                                       rows.column("input").to_pylist())]
    return texts, rows.column("task").to_pylist()


def train(config: RunConfig) -> dict:
    from training import TrainingDataError
    from training.classifier import train_classifier

    if config.classifier.labels_path:
        texts, tasks = labelled_file(config)
    else:
        labels = read_labels(labels_location(config))
        usable = labels.filter(pc.equal(labels.column("status"), "ok"))    # an id is labelled ok at most once
        if usable.num_rows == 0:
            raise TrainingDataError(f"{labels_location(config).uri}: no teacher labels to train on; "
                                    "run `tapir classifier label` first")
        texts = [request_text(i, x or "") for i, x in zip(usable.column("instruction").to_pylist(),
                                                           usable.column("input").to_pylist())]
        tasks = usable.column("task").to_pylist()
    backbone = local_model(resolve_model(config.classifier.backbone, config.storage.cache_dir,
                                         config.storage.s3_endpoint_url))
    # trained into a local folder, then published to the run directory (local or object storage) whole
    with tempfile.TemporaryDirectory(prefix="tapir-classifier-") as local:
        metrics = train_classifier(texts, tasks, list(config.curriculum.task_targets), backbone, config.classifier,
                                   Path(local), seed=config.curriculum.seed,
                                   source=config.classifier.labels_path or "teacher")
        store.publish_dir(local, classifier_location(config))
    return metrics


def classifier_summary(config: RunConfig) -> Optional[dict]:
    """What the run's trained classifier learnt from and how well it agrees with held-out labels (its metrics.json),
    for the score manifest and the round summary; None when there is none."""
    metrics = store.read_json(classifier_location(config), "metrics.json")
    if metrics is None:
        return None
    return {"labels": metrics.get("labels", "teacher"),
            **{k: metrics[k] for k in ("train_rows", "held_out_rows", "accuracy", "macro_f1")}}


def format_classifier(summary: dict) -> str:
    return (f"  task classifier: trained on {summary['train_rows']} rows labelled by {summary['labels']}; on "
            f"{summary['held_out_rows']} held-out rows accuracy {summary['accuracy']:.2f}, macro-F1 "
            f"{summary['macro_f1']:.2f}")


def apply(config: RunConfig, round_index: int = 0) -> dict:
    """Labels the whole pool with the classifier on Ray Data; writes run/round_R/classify/."""
    import ray.data

    from pipeline.ray_runtime import init_ray

    location = classifier_location(config)
    if not location.child("config.json").exists():
        raise FileNotFoundError(f"{location.uri}: no trained classifier; run `tapir classifier train` first")
    pool_dir, _ = ensure_pool(config)
    out = round_location(config, round_index).child("classify")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        endpoint = None
        if config.classifier.teacher_relabels_low_confidence:
            endpoint = stack.enter_context(open_endpoint(config.teacher, config.storage.cache_dir))
            export_key(config.teacher, endpoint)
        init_ray(config.ray)
        pool = ray.data.read_parquet(pool_dir.path, filesystem=pool_dir.fs, file_extensions=["parquet"])
        classified(pool, config, classifier_model(config), endpoint).write_parquet(out.path, filesystem=out.fs,
                                                                                   mode="overwrite")
    written = ray.data.read_parquet(out.path, filesystem=out.fs, file_extensions=["parquet"])
    tasks = Counter(written.select_columns(["task"]).to_pandas()["task"])
    confidences = written.select_columns(["task_confidence"]).to_pandas()["task_confidence"]
    summary = {"stage": "classify", "rows_in": read_pool(pool_dir).num_rows, "rows_out": int(sum(tasks.values())),
               "task_counts": dict(tasks.most_common()), "mean_confidence": float(confidences.mean()),
               "below_threshold": int((confidences < config.classifier.confidence_threshold).sum()),
               "wall_s": round(time.perf_counter() - started, 2)}
    store.write_json(out, store.MANIFEST, summary)
    return summary


def export_key(endpoint_config: EndpointConfig, endpoint: OpenEndpoint) -> None:
    """Ray workers read the key from the environment they inherit, so it is set before Ray starts; it never
    travels as a task argument."""
    os.environ[endpoint_config.api_key_env] = endpoint.api_key.reveal()


def classified(dataset, config: RunConfig, model: Model, teacher: Optional[OpenEndpoint]):
    """The classify stage (and the teacher's relabelling of unsure rows, when configured) on a dataset."""
    from pipeline.stages.classify import classify

    dataset = classify(dataset, model, config.classifier)
    return _relabel(dataset, config, teacher) if config.classifier.teacher_relabels_low_confidence else dataset


def _relabel(dataset, config: RunConfig, endpoint):
    import ray.data

    from pipeline.ray_runtime import run_limits
    from pipeline.stages.endpoint_stage import ENDPOINT_ACTOR_CPUS
    from pipeline.stages.relabel import TeacherRelabel

    limits = run_limits(config)
    return dataset.map_batches(
        TeacherRelabel, fn_constructor_kwargs={
            "endpoint": config.teacher, "base_url": endpoint.base_url, "model": endpoint.model, "limits": limits,
            "categories": list(config.curriculum.task_targets),
            "threshold": config.classifier.confidence_threshold},
        batch_size=config.classifier.batch_size, batch_format="pyarrow",
        num_cpus=ENDPOINT_ACTOR_CPUS, compute=ray.data.ActorPoolStrategy(size=config.scoring.actors_per_stage))
