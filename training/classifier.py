"""`tapir classifier train`: fine-tunes a sequence classifier on task labels (the teacher's, or a labelled file's).

The backbone is any HF encoder: DeBERTa-v3 on a cluster, the bundled MiniLM on a laptop. All configured
categories get an output, including ones with no examples yet, so the classifier's label space is the
curriculum's. Imbalance is handled with class weights (inverse square root of frequency). A stratified
held-out split measures agreement with the labels: accuracy, macro-F1, per-class F1 and a confusion matrix plot
are written next to the model.

A plain PyTorch loop rather than transformers' Trainer: it is a few minutes of single-process
fine-tuning, and weighted loss would need a Trainer subclass anyway.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import train_test_split
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from pipeline.config import ClassifierConfig
from training import TrainingDataError

log = logging.getLogger(__name__)


def split_held_out(texts: list[str], labels: list[str], fraction: float, seed: int):
    """Stratified split; classes with a single example stay in training (they cannot be split)."""
    counts = Counter(labels)
    splittable = [i for i, label in enumerate(labels) if counts[label] >= 2]
    single = [i for i, label in enumerate(labels) if counts[label] < 2]
    held_size = max(1, round(fraction * len(splittable)))
    stratify = [labels[i] for i in splittable] if held_size >= len(set(labels[i] for i in splittable)) else None
    train_idx, held_idx = train_test_split(splittable, test_size=held_size, random_state=seed, stratify=stratify)
    train_idx = list(train_idx) + single
    return ([texts[i] for i in train_idx], [labels[i] for i in train_idx],
            [texts[i] for i in held_idx], [labels[i] for i in held_idx])


def class_weights(labels: list[str], categories: list[str]) -> torch.Tensor:
    counts = Counter(labels)
    total, present = len(labels), len(counts)
    return torch.tensor([math.sqrt(total / (present * counts[c])) if counts[c] else 1.0 for c in categories],
                        dtype=torch.float32)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict(model, tokenizer, texts: list[str], max_len: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(label index, confidence) per text."""
    model.eval()
    indices, confidences = [], []
    with torch.inference_mode():
        for chunk in _batches(texts, batch_size):
            encoded = tokenizer(chunk, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
            probs = torch.softmax(model(**encoded).logits.float(), dim=-1)
            confidence, index = probs.max(dim=-1)
            indices.append(index.numpy())
            confidences.append(confidence.numpy())
    return np.concatenate(indices), np.concatenate(confidences)


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(5.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("classifier")
    ax.set_ylabel("label")
    for (row, col), value in np.ndenumerate(matrix):
        if value:
            ax.text(col, row, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_classifier(texts: list[str], labels: list[str], categories: list[str], backbone: str,
                     config: ClassifierConfig, out_dir: Path, seed: int = 0, source: str = "teacher") -> dict:
    """Fine-tunes, evaluates on the held-out split, saves model + tokenizer + metrics + plot to out_dir.
    `source`: who labelled the rows ('teacher', or the labelled file's path), kept in the metrics as `labels`."""
    unknown = sorted(set(labels) - set(categories))
    if unknown:
        raise TrainingDataError(f"labels not among the configured categories: {', '.join(unknown)}")
    if len(labels) < 10 or len(set(labels)) < 2:
        raise TrainingDataError(f"{len(labels)} labelled rows in {len(set(labels))} categories: need at least 10 rows "
                                "in 2 categories; label a larger sample (classifier.label_sample_size)")
    started = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    train_x, train_y, held_x, held_y = split_held_out(texts, labels, config.train.held_out_fraction, seed)
    index = {c: i for i, c in enumerate(categories)}
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=len(categories), id2label=dict(enumerate(categories)), label2id=index,
        problem_type="single_label_classification")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(train_y, categories))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate, weight_decay=0.01)
    steps = config.train.epochs * math.ceil(len(train_x) / config.train.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    pairs = list(zip(train_x, train_y))
    losses = []
    for epoch in range(config.train.epochs):
        model.train()
        random.shuffle(pairs)
        for chunk in _batches(pairs, config.train.batch_size):
            encoded = tokenizer([x for x, _ in chunk], truncation=True, max_length=config.train.max_len,
                                padding=True, return_tensors="pt")
            target = torch.tensor([index[y] for _, y in chunk])
            loss = loss_fn(model(**encoded).logits, target)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        log.info("classifier epoch %d/%d: mean loss %.4f", epoch + 1, config.train.epochs,
                 float(np.mean(losses[-math.ceil(len(pairs) / config.train.batch_size):])))

    predicted, _ = predict(model, tokenizer, held_x, config.train.max_len, config.batch_size)
    truth = np.array([index[y] for y in held_y])
    present = sorted(set(truth.tolist()) | set(predicted.tolist()))
    per_class = f1_score(truth, predicted, labels=present, average=None, zero_division=0)
    metrics = {
        "labels": source, "train_rows": len(train_x), "held_out_rows": len(held_x), "backbone": backbone,
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=present, average="macro", zero_division=0)),
        "per_class_f1": {categories[i]: round(float(f), 4) for i, f in zip(present, per_class)},
        "train_label_counts": dict(Counter(train_y).most_common()),
        "categories_without_examples": [c for c in categories if c not in set(labels)],
        "final_train_loss": float(np.mean(losses[-10:])), "train_s": round(time.perf_counter() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    names = [categories[i] for i in present]
    plot_confusion(confusion_matrix(truth, predicted, labels=present), names, out_dir / "confusion.png",
                   f"held-out agreement with the labels ({source}): accuracy {metrics['accuracy']:.2f}, "
                   f"macro-F1 {metrics['macro_f1']:.2f}")
    return metrics
