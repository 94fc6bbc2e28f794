"""Task-classifier benchmarks.

1. Agreement: the local teacher (SmolLM2-135M via `vllm serve`) labels `--label-rows` Alpaca rows; the
   bundled MiniLM is fine-tuned on them; held-out accuracy and macro-F1 against the teacher's labels. As a
   reference in the same run, the same trainer on the sample pool's own (hand-written) categories.
2. Throughput of the classify stage on the 4000 Alpaca rows: Ray Data with 1 and 2 actors, against
   calling the same TaskClassifier directly on the same batches with as many torch threads.

    .venv/bin/python benchmarks/bench_classifier.py --alpaca ../shared/data/alpaca_dev_4000.jsonl
    .venv/bin/python benchmarks/bench_classifier.py --throughput-only run/classifier/model
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from pipeline import classification, store
from pipeline.config import DEFAULT_TASK_TARGETS, PoolConfig, RunConfig
from pipeline.llm.judge import request_text
from pipeline.models import bundled_encoder_dir
from pipeline.pool import import_pool, read_pool
from training.classifier import train_classifier


def agreement(alpaca: Path, label_rows: int, work: Path) -> dict:
    config = RunConfig.model_validate({"pool": {"source": str(alpaca)}, "storage": {"run_dir": str(work / "run")},
                                       "classifier": {"label_sample_size": label_rows}})
    started = time.perf_counter()
    labelled = classification.label(config, progress=False)
    label_s = time.perf_counter() - started
    teacher = classification.train(config)
    pool_dir = store.locate(str(work / "sample"))
    import_pool(["bundled:sample"], pool_dir, PoolConfig(), progress=False)
    rows = read_pool(pool_dir).to_pylist()
    gold = train_classifier([request_text(r["instruction"], r["input"]) for r in rows],
                            [json.loads(r["meta"])["category"] for r in rows], list(DEFAULT_TASK_TARGETS),
                            str(bundled_encoder_dir()), config.classifier, work / "gold-model")
    keep = ("train_rows", "held_out_rows", "accuracy", "macro_f1", "train_s")
    return {"teacher_labelling": {"rows": labelled.sampled, "labelled": labelled.labelled,
                                  "failed": dict(labelled.failed), "seconds": round(label_s, 1),
                                  "label_counts": teacher["train_label_counts"]},
            "on_teacher_labels": {k: teacher[k] for k in keep},
            "on_sample_pool_categories": {k: gold[k] for k in keep},
            "confusion_png": str(classification.classifier_dir(config) / "confusion.png")}


def throughput(model_dir: Path, alpaca: Path, work: Path) -> dict:
    import ray
    import ray.data
    import torch

    from pipeline.config import ClassifierConfig
    from pipeline.stages.classify import TaskClassifier, classify

    pool_dir = store.locate(str(work / "alpaca-pool"))
    import_pool([str(alpaca)], pool_dir, PoolConfig(rows_per_shard=500), progress=False)
    table = read_pool(pool_dir)
    batch_size = 64
    results = {"rows": table.num_rows, "batch_size": batch_size}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    for actors in (1, 2):
        # Ray gives each actor one CPU, so one torch thread: the direct baseline gets as many threads.
        torch.set_num_threads(actors)
        stage = TaskClassifier(str(model_dir), max_len=128)
        started = time.perf_counter()
        for offset in range(0, table.num_rows, batch_size):
            stage(table.slice(offset, batch_size))
        direct_s = time.perf_counter() - started
        config = ClassifierConfig(num_actors=actors, batch_size=batch_size)
        started = time.perf_counter()
        done = classify(ray.data.read_parquet(pool_dir.path, file_extensions=["parquet"]), str(model_dir),
                        config).materialize()
        ray_s = time.perf_counter() - started
        assert done.count() == table.num_rows
        results[f"{actors}_actor"] = {"direct_rows_per_s": round(table.num_rows / direct_s, 1),
                                      "ray_rows_per_s": round(table.num_rows / ray_s, 1),
                                      "ray_over_direct": round(direct_s / ray_s, 3)}
    ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpaca", type=Path, default=Path("../shared/data/alpaca_dev_4000.jsonl"))
    parser.add_argument("--label-rows", type=int, default=600)
    parser.add_argument("--throughput-only", type=Path, metavar="MODEL_DIR",
                        help="measure only the stage's throughput, with this trained classifier")
    args = parser.parse_args()
    report = {"machine": f"{platform.node()} {platform.machine()}"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.throughput_only:
            model_dir = args.throughput_only
        else:
            report["agreement"] = agreement(args.alpaca, args.label_rows, work)
            model_dir = work / "run" / "classifier" / "model"
            keep = Path("docs") / "classifier-confusion-alpaca.png"
            keep.write_bytes(Path(report["agreement"]["confusion_png"]).read_bytes())
            report["agreement"]["confusion_png"] = str(keep)
        report["throughput"] = throughput(model_dir, args.alpaca, work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
