"""Task-classifier benchmarks.

1. Agreement: the local teacher (SmolLM2-135M via `vllm serve`) labels `--label-rows` Alpaca rows; the
   bundled MiniLM is fine-tuned on them; held-out accuracy and macro-F1 against the teacher's labels. As a
   reference in the same run, the same trainer on the sample pool's own (hand-written) categories.
2. Throughput of the classify stage on the 4000 Alpaca rows: Ray Data with 1 and 2 actors, against
   calling the same TaskClassifier directly on the same batches with as many torch threads.
3. --scale ROWS...: the classify stage with 2 actors on pools of each size, made as bench_scale.py makes its
   pools, in one Ray, smallest first, with a classifier trained on the bundled sample pool's own categories
   (throughput does not depend on what the head learned): whether rows/s holds as the pool grows, and the
   process tree's peak memory.

    .venv/bin/python benchmarks/bench_classifier.py --alpaca ../shared/data/alpaca_dev_4000.jsonl
    .venv/bin/python benchmarks/bench_classifier.py --throughput-only run/classifier/model
    .venv/bin/python benchmarks/bench_classifier.py --scale 4000 100000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    gold = sample_pool_classifier(work, config)
    keep = ("train_rows", "held_out_rows", "accuracy", "macro_f1", "train_s")
    return {"teacher_labelling": {"rows": labelled.sampled, "labelled": labelled.labelled,
                                  "failed": dict(labelled.failed), "seconds": round(label_s, 1),
                                  "label_counts": teacher["train_label_counts"]},
            "on_teacher_labels": {k: teacher[k] for k in keep},
            "on_sample_pool_categories": {k: gold[k] for k in keep},
            "confusion_png": str(classification.classifier_dir(config) / "confusion.png")}


def sample_pool_classifier(work: Path, config: RunConfig) -> dict:
    """The bundled MiniLM fine-tuned on the bundled sample pool's hand-written categories (work/gold-model)."""
    pool_dir = store.locate(str(work / "sample"))
    import_pool(["bundled:sample"], pool_dir, PoolConfig(), progress=False)
    rows = read_pool(pool_dir).to_pylist()
    return train_classifier([request_text(r["instruction"], r["input"]) for r in rows],
                            [json.loads(r["meta"])["category"] for r in rows], list(DEFAULT_TASK_TARGETS),
                            str(bundled_encoder_dir()), config.classifier, work / "gold-model")


def at_scale(sizes: list[int], work: Path) -> dict:
    import psutil
    import ray
    import ray.data
    from bench_scale import write_pool

    from pipeline.config import ClassifierConfig
    from pipeline.stages.classify import classify

    sample_pool_classifier(work, RunConfig())
    config = ClassifierConfig(num_actors=2)
    results = {"actors": config.num_actors, "batch_size": config.batch_size, "sizes": []}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().use_datasource_v2 = False       # as pipeline.ray_runtime.init_ray sets it
    for rows in sorted(sizes):
        write_pool(work / f"pool-{rows}.jsonl", rows)
        pool_dir = store.locate(str(work / f"pool-{rows}"))
        import_pool([str(work / f"pool-{rows}.jsonl")], pool_dir, PoolConfig(), progress=False)
        peak, done = 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(1.0):
                tree = [psutil.Process()] + psutil.Process().children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        count = classify(ray.data.read_parquet(pool_dir.path, file_extensions=["parquet"]),
                         str(work / "gold-model"), config).count()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        assert count == rows
        results["sizes"].append({"rows": rows, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds, 1),
                                 "rows_per_s_per_actor": round(rows / seconds / config.num_actors, 1),
                                 "peak_rss_all_processes_mb": round(peak / 2 ** 20)})
        print(json.dumps(results["sizes"][-1]), flush=True)
    ray.shutdown()
    return results


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
    parser.add_argument("--scale", type=int, nargs="+", metavar="ROWS",
                        help="measure only the stage with 2 actors on generated pools of these sizes")
    args = parser.parse_args()
    report = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.scale:
            report["scale"] = at_scale(args.scale, work)
            print(json.dumps(report, indent=2))
            return
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
