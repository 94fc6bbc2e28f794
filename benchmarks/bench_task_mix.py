"""How close task resampling (pipeline.curriculum.plan_round) gets to the target task mix, on the Alpaca pool.

Alpaca has no task labels, so they come the way the product gets them on a laptop without a teacher
(configs/local.yaml): the bundled MiniLM is fine-tuned on a labelled file, by default the sample pool's own
hand-written categories (`classifier.labels_path: bundled:sample`, trained by pipeline.classification.train as a
run trains it; its held-out accuracy and macro-F1 are reported), then the classify stage's TaskClassifier labels
the 4000 Alpaca rows; their task mix is reported.

Alpaca has no MFD either (that needs a judge). Two documented stand-ins:
  random_30pct_hard  MFD ~ Normal(0.5, 1) per row, seeded and independent of the task: P(MFD > δ=1.0) ≈ 0.31
  all_easy           MFD = 0 for every row: no hard part, the easy part fills the round

For each round size and round (0: α=0.5, 2: α=1.0; δ=1.0, β=0.25) the total variation to the target of
  natural   a uniform random sample of the pool of the same size and seed (with replacement above the pool size)
  planned   plan_round's mix
  floor     the best integer mix of that size over the categories the pool has (quotas() over the whole pool,
            repeats unbounded);
            its limit is the target share of the pool's empty categories
  split_floor  the best mix (continuous, by LP) that respects the round's hard/easy split: α of the rows from
            categories with hard rows, 1-α from categories with easy rows

    .venv/bin/python benchmarks/bench_task_mix.py --alpaca ../shared/data/alpaca_dev_4000.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import store
from pipeline.config import CurriculumConfig, PoolConfig, RunConfig
from pipeline.curriculum import hard_share, is_hard, plan_round, quotas, total_variation
from pipeline.pool import import_pool, read_pool

THRESHOLD, START, STEP = 1.0, 0.5, 0.25
MAX_COPIES = CurriculumConfig().max_copies_per_row


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train_from_labelled_file(work: Path, labels: str, model_dir: Path) -> dict:
    """The classifier as a run with `classifier.labels_path: LABELS` trains it, copied to model_dir."""
    import shutil

    from pipeline.classification import classifier_dir, train

    config = RunConfig.model_validate({"storage": {"run_dir": str(work / "run")}, "classifier": {"labels_path": labels}})
    metrics = train(config)
    shutil.copytree(classifier_dir(config), model_dir, dirs_exist_ok=True)
    keep = ("labels", "train_rows", "held_out_rows", "accuracy", "macro_f1", "per_class_f1", "train_s")
    return {k: metrics[k] for k in keep}


def classify_alpaca(alpaca: Path, model_dir: Path, work: Path, max_len: int, batch_size: int = 64):
    from pipeline.stages.classify import TaskClassifier

    pool_dir = store.locate(str(work / "alpaca"))
    import_pool([str(alpaca)], pool_dir, PoolConfig(), progress=False)
    table = read_pool(pool_dir)
    stage = TaskClassifier(str(model_dir), max_len=max_len)
    started = time.perf_counter()
    tasks, confidence = [], []
    for offset in range(0, table.num_rows, batch_size):
        out = stage(table.slice(offset, batch_size))
        tasks += out.column("task").to_pylist()
        confidence += out.column("task_confidence").to_pylist()
    return tasks, np.array(confidence), time.perf_counter() - started


def natural_sample(n_rows: int, size: int, seed: int) -> list[int]:
    """The baseline: uniform random rows of the pool, without replacement up to its size."""
    rng = random.Random(seed)
    return rng.sample(range(n_rows), size) if size <= n_rows else rng.choices(range(n_rows), k=size)


def split_floor(tasks, mfd, targets: dict[str, float], alpha: float) -> float:
    """Least TV over mixes α·a + (1-α)·b, a over categories with hard rows, b over those with easy rows (an
    empty part gives its share to the other, as plan_round does). A linear programme over a few dozen vars."""
    from scipy.optimize import linprog

    hard = {t for t, v in zip(tasks, mfd) if is_hard(v, THRESHOLD)}
    easy = {t for t, v in zip(tasks, mfd) if is_hard(v, THRESHOLD) is False}
    if not hard:
        alpha = 0.0
    if not easy:
        alpha = 1.0
    names = sorted(set(targets) | hard | easy)
    a_vars, b_vars = sorted(hard), sorted(easy)
    n_a, n_b, n_d = len(a_vars), len(b_vars), len(names)
    size = n_a + n_b + n_d
    cost = np.r_[np.zeros(n_a + n_b), 0.5 * np.ones(n_d)]
    a_ub, b_ub = [], []
    for k, name in enumerate(names):      # |α·a_c + (1-α)·b_c − t_c| ≤ d_c
        row = np.zeros(size)
        if name in hard:
            row[a_vars.index(name)] = alpha
        if name in easy:
            row[n_a + b_vars.index(name)] = 1 - alpha
        row_d = np.zeros(size)
        row_d[n_a + n_b + k] = 1
        a_ub += [row - row_d, -row - row_d]
        b_ub += [targets.get(name, 0.0), -targets.get(name, 0.0)]
    a_eq, b_eq = [], []
    for lo, hi in ((0, n_a), (n_a, n_a + n_b)):
        if hi > lo:
            row = np.zeros(size)
            row[lo:hi] = 1
            a_eq.append(row)
            b_eq.append(1.0)
    result = linprog(cost, A_ub=np.array(a_ub), b_ub=b_ub, A_eq=np.array(a_eq), b_eq=b_eq, bounds=(0, None))
    assert result.success, result.message
    return float(result.fun)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpaca", type=Path, default=Path("../shared/data/alpaca_dev_4000.jsonl"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 4000, 20000])
    parser.add_argument("--rounds", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", default="bundled:sample", help=(
        "the labelled file the classifier trains on (classifier.labels_path); default: the sample pool's categories"))
    parser.add_argument("--model-dir", type=Path, help=(
        "keep the trained classifier here; when it already holds one (config.json), reuse it instead of training"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/task_mix.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    targets = RunConfig().curriculum.task_targets          # DEFAULT_TASK_TARGETS, normalised
    classifier_config = RunConfig().classifier
    report = {"command": " ".join([".venv/bin/python"] + [a if i else "benchmarks/bench_task_mix.py"
                                                          for i, a in enumerate(sys.argv)]),
              "machine": {"platform": platform.platform(), "processor": platform.machine(),
                          "cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "seed": args.seed, "threshold_delta": THRESHOLD, "hard_share_start": START, "hard_share_step": STEP}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model_dir or work / "sample-model"
        if (model_dir / "config.json").exists():
            report["classifier"] = {"reused": str(model_dir), **json.loads((model_dir / "metrics.json").read_text())}
            report["classifier"] = {k: report["classifier"].get(k) for k in (
                "reused", "labels", "train_rows", "held_out_rows", "accuracy", "macro_f1", "train_s")}
        else:
            log(f"fine-tuning MiniLM on {args.labels} (classifier.labels_path)")
            report["classifier"] = train_from_labelled_file(work, args.labels, model_dir)
            log(f"trained: {report['classifier']}")
        tasks, confidence, classify_s = classify_alpaca(args.alpaca, model_dir, work, classifier_config.train.max_len)
    n = len(tasks)
    log(f"classified {n} rows in {classify_s:.1f} s")
    report["classifier"].update({"alpaca_rows": n, "classify_s": round(classify_s, 1),
                                 "mean_confidence": round(float(confidence.mean()), 3),
                                 "share_under_confidence_threshold": round(float(
                                     (confidence < classifier_config.confidence_threshold).mean()), 3)})

    counts = Counter(tasks)
    empty = [t for t in targets if not counts.get(t)]
    floor = sum(targets[t] for t in empty)
    report["pool"] = {"rows": n, "categories_present": len([t for t in targets if counts.get(t)]),
                      "categories_empty": empty, "empty_target_share": round(floor, 4),
                      "natural_tv_whole_pool": round(total_variation(counts, targets), 4),
                      "mix": dict(counts.most_common()),
                      "rows_outside_targets": sum(c for t, c in counts.items() if t not in targets)}

    mfd_rng = random.Random(f"mfd:{args.seed}")
    scenarios = {"random_30pct_hard": [mfd_rng.gauss(0.5, 1.0) for _ in range(n)], "all_easy": [0.0] * n}
    report["mfd_stand_in"] = {
        "random_30pct_hard": "MFD ~ Normal(0.5, 1) per row, random.Random('mfd:<seed>'), independent of task; "
                             f"{sum(v > THRESHOLD for v in scenarios['random_30pct_hard'])} of {n} rows above δ",
        "all_easy": "MFD = 0 for every row (no hard rows: the easy part fills every round)"}
    for name, mfd in scenarios.items():
        hard_counts = Counter(t for t, v in zip(tasks, mfd) if v > THRESHOLD)
        report["mfd_stand_in"][f"{name}_categories_without_hard_rows"] = [
            t for t in targets if counts.get(t) and not hard_counts.get(t)]
        report["mfd_stand_in"][f"{name}_categories_without_easy_rows"] = [
            t for t in targets if counts.get(t) and hard_counts.get(t) == counts[t]]

    natural = {size: total_variation(Counter(tasks[i] for i in natural_sample(n, size, args.seed)), targets)
               for size in args.sizes}
    best = {size: total_variation(quotas(targets, {t: size for t in counts}, size), targets) for size in args.sizes}
    rows = []
    for name, mfd in scenarios.items():
        for round_index in args.rounds:
            alpha = hard_share(round_index, START, STEP)
            floor_split = split_floor(tasks, mfd, targets, alpha)
            for size in args.sizes:
                plan = plan_round(tasks, [is_hard(v, THRESHOLD) for v in mfd], round_index, size, START, STEP,
                                  targets, args.seed, max_copies=MAX_COPIES)
                repeats = Counter(plan.indices).most_common(1)[0]
                rows.append({"mfd": name, "round": round_index, "alpha": alpha, "size": size,
                             "hard_planned": plan.hard_rows_planned, "easy_planned": plan.easy_rows_planned,
                             "distinct_rows": len(set(plan.indices)),
                             "max_copies_of_a_row": repeats[1], "most_copied_row_task": tasks[repeats[0]],
                             "tv_natural": round(natural[size], 4),
                             "tv_planned": round(total_variation(plan.task_mix, targets), 4),
                             "tv_floor": round(best[size], 4), "tv_split_floor": round(floor_split, 4)})
    report["results"] = rows
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'mfd':18} {'round':>5} {'α':>4} {'size':>6} {'natural':>8} {'planned':>8} {'floor':>7} {'split':>7} "
          f"{'distinct':>8} {'copies':>6}")
    for r in rows:
        print(f"{r['mfd']:18} {r['round']:>5} {r['alpha']:>4} {r['size']:>6} {r['tv_natural']:>8.4f} "
              f"{r['tv_planned']:>8.4f} {r['tv_floor']:>7.4f} {r['tv_split_floor']:>7.4f} {r['distinct_rows']:>8} "
              f"{r['max_copies_of_a_row']:>6}")
    trained = report["classifier"]
    print(f"classifier on {trained['labels']}: held-out accuracy {trained['accuracy']:.3f}, macro-F1 "
          f"{trained['macro_f1']:.3f} ({trained['held_out_rows']} rows); mean confidence on Alpaca "
          f"{trained['mean_confidence']}")
    print("Alpaca task mix: " + ", ".join(f"{task} {count / n:.1%}" for task, count in counts.most_common()))
    print(f"empty categories: {len(empty)} ({', '.join(empty)}), their target share {floor:.3f}; "
          f"whole-pool natural TV {report['pool']['natural_tv_whole_pool']}; wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
