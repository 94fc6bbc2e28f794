"""Sweep of classifier training defaults on the sample pool's own categories (held-out accuracy, macro-F1).

    .venv/bin/python benchmarks/sweep_classifier_defaults.py EPOCHS LEARNING_RATE
"""
import json
import logging
import sys
from pathlib import Path

from pipeline import store
from pipeline.config import DEFAULT_TASK_TARGETS, ClassifierConfig, ClassifierTrainConfig, PoolConfig
from pipeline.llm.judge import request_text
from pipeline.models import bundled_encoder_dir
from pipeline.pool import import_pool, read_pool
from training.classifier import train_classifier

logging.basicConfig(level=logging.INFO)
loc = store.locate("/tmp/tapir-sweep-pool")
if not loc.child("manifest.json").exists():
    import_pool(["bundled:sample"], loc, PoolConfig(), progress=False)
t = read_pool(loc).to_pylist()
texts = [request_text(r["instruction"], r["input"]) for r in t]
labels = [json.loads(r["meta"])["category"] for r in t]
epochs, lr = int(sys.argv[1]), float(sys.argv[2])
cfg = ClassifierConfig(train=ClassifierTrainConfig(epochs=epochs, learning_rate=lr, batch_size=16))
m = train_classifier(texts, labels, list(DEFAULT_TASK_TARGETS), str(bundled_encoder_dir()), cfg, Path("/tmp/tapir-sweep-model"), seed=0)
print(epochs, lr, m["accuracy"], m["macro_f1"], m["train_s"])
