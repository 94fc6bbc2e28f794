"""Training steps of the bundled student on this machine, outside Ray: plain PyTorch against DeepSpeed's engine
(ZeRO-2 over a one-process gloo group, as training/sft_worker.py runs it), in fp32 and in bf16, side by side on
the same batches of real text (Alpaca instructions and answers in the student's chat template, packed). It says
what the hardware gives before Ray Train adds anything, what DeepSpeed's optimizer step costs on CPU, and whether
bf16 trains as fp32 does: every variant's loss per step, on the same batches from the same weights.

    .venv/bin/python benchmarks/probe_train_step.py --steps 8
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.models import resolve_model

ROWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_dev_4000.jsonl"


def model(model_dir: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded.config.use_cache = False
    loaded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return loaded


def batches(model_dir: str, steps: int, batch: int, length: int) -> list[torch.Tensor]:
    """`steps` batches of `batch` × `length` tokens: chat-formatted Alpaca rows one after another, as packing
    fills a training sequence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream, needed = [], (steps + 1) * batch * length
    with open(ROWS) as rows:
        for line in rows:
            row = json.loads(line)
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            stream += tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}],
                tokenize=True, return_dict=False)
            if len(stream) >= needed:
                break
    tokens = torch.tensor(stream[:needed]).view(steps + 1, batch, length)
    return list(tokens)


def plain(model_dir: str, data: list[torch.Tensor], bf16: bool, lr: float) -> list[tuple[float, float]]:
    net = model(model_dir)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    steps = []
    for tokens in data:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = net(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append((time.perf_counter() - started, loss.item()))
    return steps


def deepspeed_engine(model_dir: str, data: list[torch.Tensor], bf16: bool, lr: float) -> list[tuple[float, float]]:
    import deepspeed

    net = model(model_dir)
    config = {"train_micro_batch_size_per_gpu": data[0].shape[0], "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16},
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=lr),
                                      config=config)
    steps = []
    for tokens in data:
        started = time.perf_counter()
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        steps.append((time.perf_counter() - started, loss.item()))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    # 5× the config's default (2e-5): a few steps move the weights enough for bf16's rounding to show if it hurts
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--only", choices=("plain", "deepspeed"), help="one of the two loops (default: both)")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(os.cpu_count() or 1)
    defaults = RunConfig()
    model_dir = resolve_model(defaults.student.model, defaults.storage.cache_dir)
    data = batches(model_dir, args.steps, args.batch, args.length)
    tokens_per_s, losses = {}, {}
    for name, run in (("plain", plain), ("deepspeed_zero2", deepspeed_engine)):
        if args.only and not name.startswith(args.only):
            continue
        for bf16 in (False, True):
            variant = f"{name}_{'bf16' if bf16 else 'fp32'}"
            steps = run(model_dir, data, bf16, args.lr)
            times = [seconds for seconds, _ in steps[1:]]           # the first step warms up
            tokens_per_s[variant] = round(data[0].numel() * len(times) / sum(times), 1)
            losses[variant] = [round(loss, 4) for _, loss in steps]
            print(variant, tokens_per_s[variant], "tokens/s; loss per step", losses[variant], flush=True)
    # bf16 against fp32 of the same loop: the largest per-step gap in loss, and each's first-to-last change
    agreement = {name: {"max_abs_loss_gap": round(max(abs(a - b) for a, b in zip(losses[f"{name}_fp32"],
                                                                                  losses[f"{name}_bf16"])), 4),
                        "bf16_speedup": round(tokens_per_s[f"{name}_bf16"] / tokens_per_s[f"{name}_fp32"], 2)}
                 for name in {variant.rsplit("_", 1)[0] for variant in losses}}
    print(json.dumps({"tokens_per_s": tokens_per_s, "losses": losses, "bf16_vs_fp32": agreement,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
                      **vars(args)}))


if __name__ == "__main__":
    main()
