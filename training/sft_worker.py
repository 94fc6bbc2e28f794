"""The Ray Train worker of `tapir train`: DeepSpeed ZeRO over the student, fed by its dataset shard.

One code path for GPU (NCCL, bf16) and CPU (gloo, fp32). Every rank saves its part of a DeepSpeed
checkpoint every `checkpoint_every_steps` steps before the last and reports it to Ray Train, which merges
them; a re-run of the command finds the latest one with `ray.train.get_checkpoint()` and continues from its
step: the epoch and the micro-batches of it already trained follow from the step (StepPlan.position), so no
epoch starts over. At the end the weights are gathered (ZeRO-3 included) and rank 0 writes a safetensors model
with the tokenizer; a run killed after its last step redoes the steps since its latest checkpoint.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline import store
from pipeline.config import TrainingConfig
from pipeline.models import Model, local_model
from training.extension_lock import load_deepspeed_ops
from training.packing import collate
from training.steps import StepPlan

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "tapir"
SHUFFLE_BUFFER_SEQUENCES = 256
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, decided on the driver (picklable)."""

    model_dir: Model                # the student trained from: a local directory, or on object storage
    training: TrainingConfig
    steps: StepPlan
    deepspeed_config: dict
    bf16: bool
    pad_token_id: int
    save_dtype: str                 # the student's own dtype: the trained model is saved in it
    model_out: store.Location
    logs_out: store.Location        # metrics.jsonl and TensorBoard files
    config_hash: str
    evaluate: bool


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    plan: WorkerPlan = config["plan"]
    training, steps = plan.training, plan.steps
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if not training.use_gpu:
        # Ray sets one thread per requested CPU; a CPU worker gets its share of the node's cores instead
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    torch.manual_seed(training.seed)

    model = AutoModelForCausalLM.from_pretrained(local_model(plan.model_dir), dtype=torch.float32)
    # Without a KV cache only: with one, transformers does not derive the packed rows' block-diagonal mask
    # from position_ids, and attention crosses between rows (tests/test_sft_data.py shows both).
    model.config.use_cache = False
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=steps.warmup_steps,
                              num_training_steps=max(1, steps.total_steps))
    load_deepspeed_ops()
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=plan.deepspeed_config)

    global_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        global_step = client_state["global_step"]
    logs = _MetricsLog(plan.logs_out) if rank == 0 else None
    if rank == 0:
        log.info("%s step %d of %d", "resuming at" if global_step else "starting at", global_step,
                 steps.total_steps)

    collate_fn = _Collate(plan.pad_token_id)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if plan.evaluate else None
    if eval_shard is not None and global_step == 0:
        _log_eval(logs, 0, 0, _evaluate(engine, eval_shard, collate_fn, steps.micro_batch_size))

    start_epoch, trained_in_epoch = steps.position(global_step)
    window = _Window(engine.device)
    for epoch in range(start_epoch, training.epochs):
        engine.train()
        batches = train_shard.iter_torch_batches(
            batch_size=steps.micro_batch_size, collate_fn=collate_fn, prefetch_batches=2,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_SEQUENCES, local_shuffle_seed=training.seed + epoch)
        for index, batch in enumerate(itertools.islice(batches, steps.micro_batches_per_epoch)):
            if epoch == start_epoch and index < trained_in_epoch:
                continue                  # trained before the checkpoint this run resumed from
            if global_step == steps.total_steps:
                break
            real_tokens, label_tokens = batch.pop("real_tokens"), batch.pop("label_tokens")
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window.add(loss.detach(), real_tokens, batch["input_ids"].numel(), label_tokens)
            if (index + 1 + epoch * steps.micro_batches_per_epoch) % steps.accumulation_steps:
                continue
            global_step += 1
            record = {"step": global_step, "epoch": round(epoch + (index + 1) / steps.micro_batches_per_epoch, 3),
                      "lr": scheduler.get_last_lr()[0], **window.close()}
            if logs:
                logs.step(record, steps.total_steps)
            # none after the last step: the exported model is what a finished round keeps, and its checkpoint
            # (the optimizer's state too: ~16 bytes a parameter) would be written only to be deleted
            if global_step % training.checkpoint_every_steps == 0 and global_step < steps.total_steps:
                with window.paused():
                    _checkpoint(engine, global_step, plan.config_hash, logs)
        if eval_shard is not None:
            with window.paused():
                _log_eval(logs, global_step, epoch + 1,
                          _evaluate(engine, eval_shard, collate_fn, steps.micro_batch_size))
        if global_step == steps.total_steps:
            break
    _export(engine, plan, rank)
    if logs:
        logs.close()
    ray.train.report({"global_step": global_step})


class _Collate(NumpyBatchCollateFn):
    """training.packing.collate in the form Ray Data's iter_torch_batches takes."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        return collate(batch, self.pad_token_id)


class _Window:
    """Sums over the micro-batches of one optimizer step, all ranks together."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses, self.micro_batches, self.real, self.padded, self.labels = 0.0, 0, 0, 0, 0
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Checkpoints and evaluations are not training time: tokens/s is of the steps alone."""
        paused_at = time.perf_counter()
        yield
        self.started += time.perf_counter() - paused_at

    def add(self, loss, real_tokens, padded_tokens: int, label_tokens) -> None:
        self.losses += float(loss)
        self.micro_batches += 1
        self.real += int(real_tokens)
        self.padded += int(padded_tokens)
        self.labels += int(label_tokens)

    def close(self) -> dict:
        import torch
        import torch.distributed as dist

        totals = torch.tensor([self.losses, self.micro_batches, self.real, self.padded, self.labels],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        losses, micro_batches, real, padded, labels = totals.tolist()
        seconds = time.perf_counter() - self.started
        self.reset()
        return {"loss": losses / micro_batches, "real_tokens": int(real), "padded_tokens": int(padded),
                "label_tokens": int(labels), "seconds": round(seconds, 3), "tokens_per_s": round(real / seconds, 1)}


def _evaluate(engine, shard, collate_fn, micro_batch_size: int) -> dict:
    """Loss per answer token over the held-out sequences, all ranks together, and its perplexity."""
    import torch
    import torch.distributed as dist

    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=collate_fn):
            batch.pop("real_tokens")
            label_tokens = batch.pop("label_tokens")
            totals += torch.tensor([float(engine(**batch).loss) * int(label_tokens), int(label_tokens)],
                                   dtype=torch.float64, device=engine.device)
    dist.all_reduce(totals)
    engine.train()
    loss = (totals[0] / totals[1]).item() if totals[1] else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if totals[1] else float("nan"), "label_tokens": int(totals[1])}


def _log_eval(logs: Optional["_MetricsLog"], step: int, epoch: int, result: dict) -> None:
    if logs:
        logs.eval({"step": step, "epoch": epoch, **result})


def _checkpoint(engine, global_step: int, config_hash: str, logs: Optional["_MetricsLog"]) -> None:
    """Every rank saves its part and reports it (a barrier); Ray Train merges the parts into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    if logs:
        logs.sync()
    with tempfile.TemporaryDirectory(prefix="tapir-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG,
                               client_state={"global_step": global_step, "config_hash": config_hash})
        ray.train.report({"global_step": global_step}, checkpoint=Checkpoint.from_directory(directory))


def _export(engine, plan: WorkerPlan, rank: int) -> None:
    """Gathers the full weights (a no-op below ZeRO-3) and has rank 0 publish them with the tokenizer."""
    import deepspeed
    import torch
    from transformers import AutoTokenizer

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank != 0:
            return
        dtype = getattr(torch, plan.save_dtype)
        converted, state = {}, {}
        for name, tensor in engine.module.state_dict().items():
            # tied weights (embeddings and LM head) stay one tensor, so save_pretrained writes them once
            if tensor.data_ptr() not in converted:
                converted[tensor.data_ptr()] = tensor.detach().to(dtype=dtype, device="cpu").clone()
            state[name] = converted[tensor.data_ptr()]
        with tempfile.TemporaryDirectory(prefix="tapir-model-") as directory:
            module = engine.module
            module.config.use_cache = True
            module.save_pretrained(directory, state_dict=state, safe_serialization=True)
            config = json.loads(Path(directory, "config.json").read_text())
            config["dtype"] = plan.save_dtype
            Path(directory, "config.json").write_text(json.dumps(config, indent=2))
            AutoTokenizer.from_pretrained(local_model(plan.model_dir)).save_pretrained(directory)
            store.publish_dir(directory, plan.model_out)


class _MetricsLog:
    """Rank 0's per-step and evaluation metrics: the console, metrics.jsonl and TensorBoard. Written to the
    run directory itself when it is local, else to a local folder copied there at checkpoints and at the end
    (which starts from what an interrupted run copied there, so a resumed run's log keeps the steps before)."""

    def __init__(self, out: store.Location):
        from tensorboardX import SummaryWriter

        self.out = out
        self.local = out.path if out.is_local else tempfile.mkdtemp(prefix="tapir-logs-")
        Path(self.local).mkdir(parents=True, exist_ok=True)
        if not out.is_local:
            for name in (METRICS_FILE, "tensorboard"):
                found = out.fs.get_file_info(out.child(name).path).type
                if found == pafs.FileType.Directory:
                    Path(self.local, name).mkdir()        # copy_files fills a local folder, it does not make one
                if found != pafs.FileType.NotFound:
                    pafs.copy_files(out.child(name).path, str(Path(self.local, name)), source_filesystem=out.fs,
                                    destination_filesystem=pafs.LocalFileSystem())
        self.lines = open(Path(self.local, METRICS_FILE), "a", encoding="utf-8")
        self.board = SummaryWriter(logdir=str(Path(self.local, "tensorboard")))

    def step(self, record: dict, total_steps: int) -> None:
        self._write({"kind": "step", **record})
        for name in ("loss", "lr", "tokens_per_s"):
            self.board.add_scalar(f"train/{name}", record[name], record["step"])
        log.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.0f tokens/s", record["step"], total_steps,
                 record["epoch"], record["loss"], record["lr"], record["tokens_per_s"])

    def eval(self, record: dict) -> None:
        self._write({"kind": "eval", **record})
        self.board.add_scalar("eval/loss", record["loss"], record["step"])
        self.board.add_scalar("eval/perplexity", record["perplexity"], record["step"])
        log.info("held-out %s: loss %.4f perplexity %.2f",
                 f"after epoch {record['epoch']}" if record["step"] else "before training", record["loss"],
                 record["perplexity"])

    def _write(self, record: dict) -> None:
        self.lines.write(json.dumps(record) + "\n")
        self.lines.flush()

    def sync(self) -> None:
        self.board.flush()
        if not self.out.is_local:
            store.copy_dir(self.local, self.out)

    def close(self) -> None:
        self.sync()
        self.board.close()
        self.lines.close()
