"""`tapir train [CONFIG] --round R`: fine-tunes the student on the round's training set; the result is the
HF model directory `run/round_R/model/` that the next round's student stage loads.

From top to bottom: check and prepare the data (training/sft_data.py; a bad training set stops here,
before any worker starts), plan the steps, run Ray Train's TorchTrainer with DeepSpeed ZeRO
(training/sft_worker.py), generate with vLLM from the saved model as a smoke check (unless the caller loads
it in vLLM next anyway), then write the summary, its manifest and a loss plot. Checkpoints live in
`run/round_R/checkpoint/train/`; the same command run again after a kill resumes from the latest, and they are
deleted once the round's model and manifest are written. A finished round is not trained again.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import logging
import time
from typing import Optional

import pyarrow.dataset as pads

from pipeline import store
from pipeline.classification import checkpoint_location, model_location
from pipeline.config import TRAINING_RESUME_NEUTRAL, RunConfig, TrainingConfig
from pipeline.jobs import read_parquet
from pipeline.models import Model, local_model, model_key, run_model
from pipeline.scoring import config_hash, student_model
from training import CheckpointMismatch
from training.sft_data import packed_location, prepare, sft_location, training_set_location
from training.sft_worker import METRICS_FILE, WorkerPlan, train_loop_per_worker
from training.steps import StepPlan, plan_steps

log = logging.getLogger(__name__)

STAGE = "train"
SMOKE_PROMPTS = 2
SMOKE_MAX_TOKENS = 64
_RESUME_KEY_FILE = "_tapir_run.json"


def uses_bf16(training: TrainingConfig) -> bool:
    return training.bf16 == "on" or (training.bf16 == "auto" and training.use_gpu)


def deepspeed_config(training: TrainingConfig, steps: StepPlan) -> dict:
    """training/deepspeed/zero{2,3}.json with the batch, clipping and precision of this run filled in."""
    base = json.loads((importlib.resources.files("training") / "deepspeed" / f"zero{training.zero_stage}.json")
                      .read_text(encoding="utf-8"))
    return {**base, "train_micro_batch_size_per_gpu": steps.micro_batch_size,
            "gradient_accumulation_steps": steps.accumulation_steps, "train_batch_size": steps.effective_batch_size,
            "gradient_clipping": training.max_grad_norm, "bf16": {"enabled": uses_bf16(training)}}


def resume_key(training: TrainingConfig, data_key: str, model: Model) -> str:
    settings = training.model_dump(mode="json", exclude=set(TRAINING_RESUME_NEUTRAL))
    text = json.dumps({"training": settings, "data": data_key, "model": model_key(model)}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def train(config: RunConfig, round_index: int = 0, smoke_skipped_because: Optional[str] = None) -> dict:
    """Trains the round's student and returns the summary (also written as `sft/_manifest.json`).
    `smoke_skipped_because`: no smoke generation, for this reason: what the caller does next loads the model in
    vLLM anyway (the next round's scoring, an evaluation), and an engine's start is a large part of a small
    round's training stage."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.ray_runtime import init_ray

    out = sft_location(config, round_index)
    finished = store.read_json(out, store.MANIFEST)
    if finished and finished.get("complete"):
        return {**finished, "skipped": True}
    started = time.perf_counter()
    training = config.training
    model = student_model(config, round_index)
    model_dir = local_model(model)        # on this node, for the tokenizer and the config
    # the trainer's workers, Ray Train's controller, and Ray Data's read tasks beside them
    init_ray(config.ray, min_cpus=training.num_workers + 3)
    data = prepare(config, round_index, model)
    steps = plan_steps(training, data["train_sequences"]["sequences"])
    checkpoints = checkpoint_location(config, round_index, STAGE)
    key = resume_key(training, data["key"], model)
    _claim_checkpoints(checkpoints, key)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plan = WorkerPlan(
        model_dir=model, training=training, steps=steps, deepspeed_config=deepspeed_config(training, steps),
        bf16=uses_bf16(training), pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id, save_dtype=str(AutoConfig.from_pretrained(model_dir).dtype).removeprefix("torch."),
        model_out=model_location(config, round_index), logs_out=out, config_hash=key,
        evaluate=data["eval_sequences"]["sequences"] >= training.num_workers)
    prepared_s = time.perf_counter() - started
    _fit(config, round_index, plan, checkpoints)
    fitted_s = time.perf_counter() - started - prepared_s
    smoke = smoke_generate(config, round_index) if smoke_skipped_because is None else None
    metrics = read_metrics(out)
    store.write_bytes(out, "loss.png", loss_plot(metrics))
    summary = summarise(config, round_index, data, steps, metrics, smoke, smoke_skipped_because,
                        {"prepare_s": round(prepared_s, 2), "fit_s": round(fitted_s, 2),
                         "smoke_s": round(time.perf_counter() - started - prepared_s - fitted_s, 2),
                         "wall_s": round(time.perf_counter() - started, 2)})
    store.write_json(out, store.MANIFEST, summary)
    checkpoints.fs.delete_dir_contents(checkpoints.path, missing_dir_ok=True)
    return summary


def _claim_checkpoints(checkpoints: store.Location, key: str) -> None:
    """Marks the checkpoint directory as this run's; one left by other settings or data stops the command."""
    claimed = store.read_json(checkpoints, _RESUME_KEY_FILE)
    if claimed and claimed["key"] != key:
        raise CheckpointMismatch(
            f"{checkpoints.uri}: holds checkpoints of a training run with other settings, data or base model; "
            "delete that directory to start this round's training over")
    if not claimed:
        checkpoints.makedirs()
        store.write_json(checkpoints, _RESUME_KEY_FILE, {"key": key})


def _fit(config: RunConfig, round_index: int, plan: WorkerPlan, checkpoints: store.Location) -> None:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    training = config.training
    datasets = {"train": read_parquet(packed_location(config, round_index, "train"))}
    if plan.evaluate:
        datasets["eval"] = read_parquet(packed_location(config, round_index, "eval"))
    options = ray.data.ExecutionOptions(preserve_order=True)   # the same order again on resume
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"plan": plan}, datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=options),
        scaling_config=ray.train.ScalingConfig(num_workers=training.num_workers, use_gpu=training.use_gpu),
        run_config=ray.train.RunConfig(
            name="ray_train", storage_path=checkpoints.path, storage_filesystem=checkpoints.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures)))
    trainer.fit()


def smoke_generate(config: RunConfig, round_index: int) -> list[dict]:
    """vLLM loads the saved model and answers the first training instructions; a failure stops the command."""
    import ray

    from pipeline.stages.student import StudentGenerator

    model = model_location(config, round_index)
    train_set = training_set_location(config, round_index)
    prompts = pads.dataset(train_set.list_files(".parquet"), filesystem=train_set.fs, format="parquet") \
        .head(SMOKE_PROMPTS, columns=["id", "instruction", "input"])
    student = config.student.model_copy(update={"sampling": config.student.sampling.model_copy(
        update={"max_tokens": SMOKE_MAX_TOKENS, "temperature": 0.0})})
    generator = ray.remote(StudentGenerator).options(
        num_cpus=1, num_gpus=student.num_gpus_per_actor).remote(
            student, run_model(model, config.storage.cache_dir))
    # the handle going out of scope ends the actor gracefully, so vLLM shuts its engine down itself
    answered = ray.get(generator.__call__.remote(prompts))
    del generator
    results = [{"instruction": i, "response": r, "status": s} for i, r, s in zip(
        answered.column("instruction").to_pylist(), answered.column("student_response").to_pylist(),
        answered.column("student_status").to_pylist())]
    if not any(r["status"] == "ok" and (r["response"] or "").strip() for r in results):
        raise RuntimeError(f"{model.uri}: the trained model loads in vLLM but answered nothing: {results}")
    return results


def read_metrics(out: store.Location) -> dict[str, list[dict]]:
    """The step and evaluation records of metrics.jsonl; a step logged twice (redone after a resume) counts
    once, as its last record."""
    path = f"{out.path}/{METRICS_FILE}"
    with out.fs.open_input_stream(path) as stream:
        records = [json.loads(line) for line in stream.read().decode("utf-8").splitlines() if line.strip()]
    last = {(r["kind"], r["step"]): r for r in records}
    return {kind: sorted((r for (k, _), r in last.items() if k == kind), key=lambda r: r["step"])
            for kind in ("step", "eval")}


def loss_plot(metrics: dict[str, list[dict]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    steps = metrics["step"]
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="training loss (per step)")
    if metrics["eval"]:
        loss_ax.plot([r["step"] for r in metrics["eval"]], [r["loss"] for r in metrics["eval"]], "o--",
                     label="held-out loss")
    loss_ax.set_ylabel("loss per answer token")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="gray")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def summarise(config: RunConfig, round_index: int, data: dict, steps: StepPlan, metrics: dict,
              smoke: Optional[list[dict]], smoke_skipped_because: Optional[str], times: dict) -> dict:
    records = metrics["step"]
    real = sum(r["real_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    evals = [{k: r[k] for k in ("step", "epoch", "loss", "perplexity")} for r in metrics["eval"]]
    return {
        "stage": STAGE, "round": round_index, "config_hash": config_hash(config),
        "complete": bool(records) and records[-1]["step"] == steps.total_steps,
        "model": model_location(config, round_index).uri,
        "data": {k: v for k, v in data.items() if k != "key"},
        "steps": steps.as_dict(),
        "training": {
            "steps_done": records[-1]["step"] if records else 0,
            "first_loss": records[0]["loss"] if records else None,
            "final_loss": records[-1]["loss"] if records else None,
            "tokens_trained": real, "tokens_per_s": round(real / seconds, 1) if seconds else None,
            "non_pad_share": round(real / sum(r["padded_tokens"] for r in records), 4) if records else None,
            "train_s": round(seconds, 2)},
        "eval": evals, "smoke": smoke, "smoke_skipped_because": smoke_skipped_because, **times,
    }


def format_summary(summary: dict) -> str:
    data, run = summary["data"], summary["training"]
    lines = [
        f"round {summary['round']} trained: model written to {summary['model']}"
        + (" (already finished; nothing was run)" if summary.get("skipped") else ""),
        f"  rows {data['rows_in']}: trained {data['rows_trainable']['train']}, held out "
        f"{data['rows_trainable']['eval']}, truncated {data['rows_truncated']}, over max_len "
        f"{data['rows_over_max_len']} (dropped), invalid {data['rows_invalid']}",
        f"  sequences {data['train_sequences']['sequences']} of up to {data['max_len']} tokens "
        f"(non-pad share in training {run['non_pad_share']})",
        f"  steps {run['steps_done']} of {summary['steps']['total_steps']} (batch {summary['steps']['effective_batch_size']}"
        f" sequences); loss {run['first_loss']:.4f} → {run['final_loss']:.4f}; {run['tokens_trained']} tokens at "
        f"{run['tokens_per_s']} tokens/s",
    ]
    if summary["eval"]:
        first, last = summary["eval"][0], summary["eval"][-1]
        lines.append(f"  held-out perplexity {first['perplexity']:.2f} (step {first['step']}) → "
                     f"{last['perplexity']:.2f} (step {last['step']})")
    if summary.get("smoke"):
        lines.append(f"  vLLM smoke answer: {(summary['smoke'][0]['response'] or '')[:100]!r}")
    else:
        lines.append(f"  no vLLM smoke answer: {summary.get('smoke_skipped_because')}")
    lines.append(f"  wall time {summary['wall_s']:.1f} s (data {summary['prepare_s']:.1f} s, training "
                 f"{summary['fit_s']:.1f} s, smoke generation {summary['smoke_s']:.1f} s)")
    return "\n".join(lines)
