"""One training step of the bundled student on this machine, outside Ray: plain PyTorch against DeepSpeed's
engine (ZeRO-2 over a one-process gloo group), in fp32 and in bf16. It says what the hardware gives before
Ray Train adds anything, and what DeepSpeed's optimizer step costs on CPU.

    .venv/bin/python benchmarks/probe_train_step.py --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pipeline.config import RunConfig
from pipeline.models import resolve_model


def model(model_dir: str):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded.config.use_cache = False
    loaded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return loaded


def plain(model_dir: str, tokens: torch.Tensor, bf16: bool, steps: int) -> list[float]:
    net = model(model_dir)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = net(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return times


def deepspeed_engine(model_dir: str, tokens: torch.Tensor, bf16: bool, steps: int) -> list[float]:
    import deepspeed

    net = model(model_dir)
    config = {"train_micro_batch_size_per_gpu": tokens.shape[0], "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16},
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-5),
                                      config=config)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(os.cpu_count() or 1)
    defaults = RunConfig()
    model_dir = resolve_model(defaults.student.model, defaults.storage.cache_dir)
    tokens = torch.randint(100, 40000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, run in (("plain", plain), ("deepspeed_zero2", deepspeed_engine)):
        for bf16 in (False, True):
            times = run(model_dir, tokens, bf16, args.steps)[1:]          # the first step warms up
            results[f"{name}_{'bf16' if bf16 else 'fp32'}"] = round(tokens.numel() * len(times) / sum(times), 1)
            print(name, "bf16" if bf16 else "fp32", results[f"{name}_{'bf16' if bf16 else 'fp32'}"], "tokens/s",
                  flush=True)
    print(json.dumps({"tokens_per_s": results, "cpus": os.cpu_count(), **vars(args)}))


if __name__ == "__main__":
    main()
