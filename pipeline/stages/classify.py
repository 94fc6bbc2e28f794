"""The classify stage: the fine-tuned task classifier labels every row with a task and a confidence."""
from __future__ import annotations

import pyarrow as pa
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.config import ClassifierConfig
from pipeline.llm.judge import request_text
from pipeline.models import Model, local_model
from pipeline.stages.columns import check_columns, with_columns

REQUIRED_COLUMNS = ("id", "instruction", "input")


class TaskClassifier:
    """Ray Data callable class: `ds.map_batches(TaskClassifier, fn_constructor_kwargs=..., batch_format="pyarrow")`.

    Adds `task` (the most likely category) and `task_confidence` (its probability); one row out per row in.
    """

    def __init__(self, model_dir: Model, max_len: int, device: str = "cpu"):
        model_dir = local_model(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_len = max_len
        self.device = device

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "classify")
        texts = [request_text(i, x or "") for i, x in zip(batch.column("instruction").to_pylist(),
                                                             batch.column("input").to_pylist())]
        with torch.inference_mode():
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_len, padding=True,
                                     return_tensors="pt").to(self.device)
            probs = torch.softmax(self.model(**encoded).logits.float(), dim=-1)
            confidence, index = probs.max(dim=-1)
        tasks = [self.labels[i] for i in index.tolist()]
        return with_columns(batch, {"task": pa.array(tasks, pa.string()),
                                    "task_confidence": pa.array(confidence.cpu().numpy(), pa.float32())})


def classify(dataset, model_dir: Model, config: ClassifierConfig):
    """The stage applied to a Ray dataset with the config's actor pool, batch size and devices."""
    import ray.data

    # Blocks of one batch each, so every actor of the pool gets work even when the reader coalesced the
    # pool's shards into a few large blocks (streaming: nothing is materialised).
    return dataset.repartition(target_num_rows_per_block=config.batch_size).map_batches(
        TaskClassifier, fn_constructor_kwargs={"model_dir": model_dir, "max_len": config.train.max_len,
                                               "device": "cuda" if config.num_gpus_per_actor else "cpu"},
        batch_size=config.batch_size, batch_format="pyarrow", num_gpus=config.num_gpus_per_actor or None,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors))
