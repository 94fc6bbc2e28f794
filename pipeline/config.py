"""The typed configuration of a whole run, loaded from YAML.

Every default of the project lives in this file and nowhere else. Sections are passed down to the
parts that use them; no module reads configuration from globals or the environment on its own, except
the API key, whose *name* is configured here and whose value is read only where a request is sent.
"""
from __future__ import annotations

import importlib.resources
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError
from pipeline.llm.prompts import prompt_template

BUNDLED_STUDENT = "bundled:smollm2-135m-instruct"
BUNDLED_ENCODER = "bundled:all-minilm-l6-v2"

# The target task mix published with DistilQwen2 (built on TAPIR): 32 categories.
DEFAULT_TASK_TARGETS: dict[str, float] = {
    "Math": 0.167, "Reasoning": 0.167, "Code Generation": 0.083, "Code Debug": 0.083, "Others": 0.041,
    **{name: 0.017 for name in (
        "Writing", "Computer Science", "Complex Format", "Common-Sense", "Counterfactual",
        "Multilingual", "Roleplay", "Biology", "Technology", "Ethics", "Sport", "Law", "Medicine",
        "Literature", "Entertainment", "Art", "Music", "Toxicity", "Economy", "Physics", "History",
        "Chemistry", "Philosophy", "Health", "Ecology", "Grammar", "Paraphrase")},
}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once loaded.

    Strict types: YAML's `true` is not the number 1 and "5" is not 5 (lax parsing made `max_attempts: true`
    one attempt); `.inf` and `.nan` are not numbers a setting can hold (`timeout_s: .inf` never times out)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class PoolConfig(Section):
    source: str = Field("bundled:sample", description=(
        "Instruction pool to import: a file or directory (Alpaca JSON/JSONL, chat JSONL, Self-Instruct "
        "seed tasks, Parquet, a saved HF datasets directory), or 'bundled:sample' for the shipped pool."))
    format: Literal["auto", "alpaca", "chat", "selfinstruct", "parquet", "hf"] = Field(
        "auto", description="Input format; 'auto' decides per file from its extension and first record.")
    id_column: Optional[str] = Field(None, description=(
        "Column holding the pool's own row ids; by default ids are a hash of instruction + input."))
    rows_per_shard: int = Field(50_000, gt=0, description="Rows per Parquet shard written on import.")
    max_row_chars: int = Field(32_000, gt=0, description=(
        "Rows whose instruction + input + output exceed this many characters are quarantined."))
    sample_fraction: Optional[float] = Field(None, gt=0, le=1, description=(
        "Import only about this share of the valid rows, chosen by a hash of each row's id (the same rows on "
        "every import, whatever their order); the others are counted as not sampled. For a quick run on a slice."))


class StorageConfig(Section):
    run_dir: str = Field("runs/local", description="Run directory: a local path or s3://bucket/prefix.")
    s3_endpoint_url: Optional[str] = Field(None, description=(
        "S3-compatible endpoint (MinIO, moto); credentials always come from the environment."))
    cache_dir: str = Field("~/.cache/tapir", description="Where prepared models are cached.")

    @field_validator("run_dir", "s3_endpoint_url")
    @classmethod
    def _no_credentials(cls, url: Optional[str]) -> Optional[str]:
        return _without_credentials(url)


class RayConfig(Section):
    address: Optional[str] = Field(None, description="Ray cluster address; None starts a local Ray.")
    num_cpus: Optional[int] = Field(None, gt=0, description=(
        "Logical CPUs for a local Ray. Over-subscribing a laptop lets ingest tasks run beside actors."))
    namespace: str = "tapir"


class VllmEngineConfig(Section):
    max_model_len: int = Field(2048, gt=0)
    dtype: str = Field("auto", description=(
        "The engine's dtype; 'auto': the model's own, but float32 on a CPU without bf16 arithmetic (AVX512-BF16 "
        "or AMX), where vLLM's bf16 is emulated and ~6x slower."))
    enforce_eager: bool = Field(True, description="On CPU, start-up drops from ~140 s to ~30 s.")
    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1, description=(
        "Share of GPU memory for weights + KV cache. Leave unset on CPU: it would be taken as a share "
        "of RAM; kv_cache_space_gib sizes the CPU cache instead."))
    kv_cache_space_gib: int = Field(1, gt=0, description="CPU backend KV cache (VLLM_CPU_KVCACHE_SPACE).")
    extra_args: dict[str, Any] = Field(default_factory=dict, description=(
        "Further vllm EngineArgs, passed through unchanged."))


class SamplingConfig(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(512, gt=0)
    seed: Optional[int] = 0


class StudentConfig(Section):
    model: str = Field(BUNDLED_STUDENT, description="HF model directory, hub id, or a bundled:… name.")
    num_actors: int = Field(1, gt=0, description="vLLM engine actors generating in parallel.")
    num_gpus_per_actor: float = Field(0, ge=0)
    batch_size: int = Field(16, gt=0)
    engine: VllmEngineConfig = VllmEngineConfig()
    sampling: SamplingConfig = SamplingConfig()


class PriceConfig(Section):
    input_per_million_usd: float = Field(0.0, ge=0)
    output_per_million_usd: float = Field(0.0, ge=0)


class LocalServerConfig(Section):
    """How the pipeline serves the teacher itself with `vllm serve` on loopback."""

    model: str = BUNDLED_STUDENT
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    startup_timeout_s: float = Field(300, gt=0)
    engine: VllmEngineConfig = VllmEngineConfig()


_SECRET_KEYS = ("api_key", "apikey", "key", "token", "secret", "password")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Prefixes of the keys people paste most (OpenAI/Anthropic, Hugging Face, GitHub, AWS, Google, Slack).
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "ghp_", "gho_", "ghs_", "github_pat_", "AKIA", "ASIA", "AIza", "xox")


def looks_like_key(text: str) -> bool:
    """Whether a string looks like a credential rather than a name: a known key prefix on a long token, or a
    run of 16+ letters and digits that mixes both (AKIAIOSFODNN7EXAMPLE; a variable name has short words)."""
    if len(text) >= 20 and text.startswith(_KEY_PREFIXES):
        return True
    return any(re.search(r"[A-Za-z]", run) and re.search(r"[0-9]", run)
               for run in re.findall(r"[A-Za-z0-9]{16,}", text))


def _without_credentials(url: Optional[str]) -> Optional[str]:
    """Refuses user:password@ in a URL: credentials come from the environment, and a config is printed,
    submitted with a job and kept in the run directory."""
    if url and "://" in url and "@" in urlsplit(url).netloc:
        raise ValueError(f"holds credentials ({redact_url(url)}); remove them: keys and passwords come from the "
                         "environment (api_key_env for an endpoint, the AWS variables for S3)")
    return url


class EndpointConfig(Section):
    """An OpenAI-compatible chat endpoint: the teacher, or the judge."""

    kind: Literal["local", "remote"] = Field("local", description=(
        "'local' starts `vllm serve` of local.model on loopback with a random key; 'remote' uses base_url."))
    base_url: Optional[str] = Field(None, description="e.g. https://api.openai.com/v1 (kind: remote).")
    model: Optional[str] = Field(None, description="Model name sent in requests; local: the served name.")
    api_key_env: str = Field("TAPIR_TEACHER_API_KEY", description=(
        "Name of the environment variable holding the API key. The key itself never goes in a config."))
    requests_per_minute: int = Field(600, gt=0)
    tokens_per_minute: int = Field(1_000_000, gt=0)
    max_concurrency: int = Field(16, gt=0, description="Requests in flight per worker process.")
    timeout_s: float = Field(600, gt=0, description=(
        "Per-request timeout. Long, because a request given up on may still be generated and billed: it is "
        "counted at its worst case, and a short timeout against slow generations pays for rows it then fails."))
    retry_timeouts: bool = Field(False, description=(
        "Send a timed-out request again. Off: the row fails as 'timeout' (its worst case counted), since the "
        "server may have answered and billed it and a retry would pay for the row twice."))
    max_attempts: int = Field(6, gt=0, description="Attempts per request before the row is marked failed.")
    tokens_counted_as: Literal["requested", "used"] = Field("requested", description=(
        "How the server counts a request against tokens_per_minute. 'requested' (OpenAI): the larger of "
        "max_tokens and the prompt's estimate, held for the whole minute whatever the reply used. 'used': the "
        "tokens the reply reports (a server that counts usage, e.g. a self-hosted proxy); the booking shrinks to "
        "it once answered."))
    max_pause_s: float = Field(300, gt=0, description=(
        "Longest pause a 429's Retry-After or exhausted x-ratelimit headers may impose. A longer one is logged "
        "and the rows waiting on it fail as 'rate_limited' instead of stalling the run."))
    max_connection_failures: int = Field(20, gt=0, description=(
        "Consecutive connection failures (refused, unreachable), counted across every worker, after which the "
        "stage stops with an error naming base_url. The same command continues once the endpoint is back."))
    price: PriceConfig = PriceConfig()
    local: LocalServerConfig = LocalServerConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_literal_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in _SECRET_KEYS:
                    raise ValueError(
                        f"'{key}' holds a secret and is not accepted in a config file: put the key in an "
                        "environment variable and name that variable in 'api_key_env'")
        return data

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, name: str) -> str:
        # the value is never quoted back: a pasted key would end up in the terminal, a log or a CI record
        if looks_like_key(name):
            raise ValueError("this looks like an API key, not the name of a variable: put the key in an "
                             "environment variable (export MY_API_KEY=...) and write its name here")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError("must be the name of an environment variable (letters, digits and _, not starting "
                             "with a digit), such as OPENAI_API_KEY")
        return name

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: Optional[str]) -> Optional[str]:
        if url and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"must start with http:// or https://, got {redact_url(url)!r}")
        return _without_credentials(url)

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "EndpointConfig":
        if self.kind == "remote" and (not self.base_url or not self.model):
            raise ValueError("kind 'remote' needs both 'base_url' and 'model'")
        return self

    @property
    def served_model(self) -> str:
        return self.model or "tapir-teacher"


class ClassifierTrainConfig(Section):
    # Tuned for the bundled MiniLM on a few hundred labels (on the sample pool's own categories: 8 epochs at
    # 1e-4 gave 0.71 held-out accuracy, 3 at 5e-5 gave 0.41). DeBERTa-v3 on thousands of labels wants ~3 at 3e-5.
    epochs: int = Field(8, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, gt=0)
    max_len: int = Field(128, gt=0)
    held_out_fraction: float = Field(0.1, gt=0, lt=1)


class ClassifierConfig(Section):
    backbone: str = Field(BUNDLED_ENCODER, description=(
        "Encoder to fine-tune: DeBERTa-v3 on a cluster, the bundled MiniLM locally, any HF encoder."))
    label_sample_size: int = Field(1000, gt=0, description="Pool rows the teacher labels for training.")
    labels_path: Optional[str] = Field(None, description=(
        "A file of labelled rows (instruction, optional input, category), in any `tapir pool import` format, or "
        "'bundled:sample' for the shipped pool's own categories: the classifier trains on it instead of on teacher "
        "labels, and no API call is made for it. Every category must be one of curriculum.task_targets."))
    num_actors: int = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    confidence_threshold: float = Field(0.5, ge=0, le=1)
    teacher_relabels_low_confidence: bool = Field(False, description=(
        "Send rows under confidence_threshold to the teacher for a label instead."))
    train: ClassifierTrainConfig = ClassifierTrainConfig()


class JudgeCalibrationConfig(Section):
    """Before a run pays for scoring, the judge rates pairs whose better answer is known (pipeline/judge_calibration.py)."""

    enabled: bool = Field(False, description=(
        "Calibrate the judge at the start of round 0's scoring: pool rows' reference answers intact against the "
        "same answers damaged three ways, each pair judged in both orders, paid under the run's limits and budget; "
        "the result is kept in RUN_DIR/judge_calibration.json and not paid for again. Off by default so that a "
        "config without this section sends no call it did not send before; the shipped configs turn it on. "
        "`tapir check judge` calibrates whatever this says; curriculum.difficulty 'auto' calibrates in any case."))
    rows: int = Field(8, gt=1, description=(
        "Pool rows with a reference answer to build pairs from: rows × 3 damages (first third only, another row's "
        "answer, a refusal) × 2 orders judge calls."))
    bar: float = Field(0.75, ge=0, le=1, description=(
        "Least discrimination (share of pairs the intact answer wins, ties half; 0.5 is chance) for the judge to "
        "be trusted. Below it the run warns, in the console and the score manifest, that the judge cannot tell."))


class CurriculumConfig(Section):
    rounds: int = Field(2, gt=0)
    difficulty: Literal["judge", "ifd", "hybrid", "auto"] = Field("judge", description=(
        "How a scored row is called hard or easy. 'judge': TAPIR's MFD, the judge scoring the teacher's and the "
        "student's answers in both orders (two paid calls a row a round), hard when MFD ≥ mfd_threshold. 'ifd': "
        "the round's student's IFD (Li et al. 2023: its loss on the teacher's answer given the instruction ÷ "
        "without it) from its own vLLM engines, no generation and no paid call; the ifd_hard_share highest IFDs "
        "of the round are hard. 'hybrid': IFD for every row, and the judge decides only the hybrid_band rows "
        "nearest the IFD boundary (2·hybrid_band paid calls a row a round). 'auto': the judge's calibration "
        "(judge_calibration) is measured at the start of round 0's scoring, whether or not it is enabled; 'judge' "
        "when it reaches judge_calibration.bar, else 'ifd', for the whole run."))
    mfd_threshold: float = Field(1.0, description=(
        "δ: rows whose MFD (teacher score − student score) is at least δ are hard. Lion uses 1.0 and counts a "
        "gap of exactly 1.0 as hard; MFD moves in 0.5 steps, so the comparison matters."))
    ifd_hard_share: float = Field(0.5, gt=0, lt=1, description=(
        "With IFD: the share of the round's rows (those with an IFD, misaligned ones left out) called hard, the "
        "highest IFDs; a quantile per round, because IFD's scale moves with the student while α is a share too."))
    ifd_misaligned_above: Optional[float] = Field(1.0, gt=0, description=(
        "With IFD: rows whose IFD is above this are left unscored (status ifd_misaligned) and counted, as the IFD "
        "authors filter IFD > 1: the instruction does not help the student predict the answer at all, usually a "
        "pair whose answer does not answer it. None keeps them."))
    hybrid_band: float = Field(0.2, ge=0, le=1, description=(
        "With hybrid: the share of the round's rows with an IFD, centred on the IFD hard/easy boundary, that the "
        "judge decides (MFD ≥ mfd_threshold); rows below the band are easy and above it hard by IFD. 0.2 costs 0.4 "
        "judge calls a row a round against judge's 2."))
    hard_share_start: float = Field(0.5, ge=0, le=1, description="α_0: share of hard rows in round 0.")
    hard_share_step: float = Field(0.25, ge=0, le=1, description="β: α_{r+1} = min(1, α_r + β).")
    rows_per_round: int = Field(200, gt=0, description="Training rows per round after resampling.")
    max_copies_per_row: int = Field(3, gt=0, description=(
        "Most copies of one pool row in a round's plan. Thin task categories and scarce hard rows are repeated "
        "up to this; what they still cannot fill goes to other categories (and from the hard part to the easy "
        "one, or back), and the plan's manifest warns. Each copy is seen once per epoch: beyond ~3 the student "
        "learns the row, not its category (one hard row once filled 36 of 48 planned rows)."))
    expansion_per_round: int = Field(100, ge=0, description="New instructions the teacher writes per round.")
    keep_reference_outputs: bool = Field(True, description=(
        "Use the pool's reference output as the teacher's response where there is one."))
    task_targets: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TASK_TARGETS), description=(
        "Target task distribution; normalised to sum to 1. Replacing it replaces the category list. A row whose "
        "task is not listed is planned as 'Others' when the list has it, else in one extra category with the "
        "smallest listed share; the plan's manifest counts such rows (rows_outside_targets)."))
    seed: int = 0

    @field_validator("task_targets")
    @classmethod
    def _normalised(cls, targets: dict[str, float]) -> dict[str, float]:
        if not targets:
            raise ValueError("needs at least one category")
        bad = [name for name, share in targets.items() if not (share > 0 and math.isfinite(share))]
        if bad:
            raise ValueError(f"shares must be positive numbers: {', '.join(bad)}")
        total = sum(targets.values())
        if abs(total - 1.0) > 0.02:
            raise ValueError(f"shares sum to {total:.3f}; they must sum to 1 (±0.02)")
        return {name: share / total for name, share in targets.items()}


class ScoringConfig(Section):
    """Every endpoint stage of a round: the teacher's answers, the pairwise judge, expansion and the styled answers."""

    teacher_max_tokens: int = Field(512, gt=0, description="Longest answer the teacher writes for a row.")
    teacher_temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0, description="Rows per batch of the teacher and judge stages.")
    actors_per_stage: int = Field(1, gt=0, description=(
        "Actors of each endpoint stage; every actor has its own HTTP session, all share the run's limits."))
    batches_in_flight_per_actor: int = Field(4, gt=0, description=(
        "Batches an endpoint actor works on at once, so one slow answer does not hold the stage."))


class ExpansionConfig(Section):
    """The teacher writing new instructions from the round's seeds (Lion's generator), one seed per request."""

    hard_prompt: str = Field("expand_hard", description=(
        "Prompt for a hard seed: a bundled name (pipeline/prompts/NAME.txt) or a path to a text file with $seed."))
    easy_prompt: str = Field("expand_easy", description="Prompt for an easy seed (same domain, rarer).")
    max_tokens: int = Field(256, gt=0, description="A reply cut off at this length is dropped, not kept half.")
    temperature: float = Field(0.7, ge=0, description="Some randomness, so that repeated seeds differ.")
    min_words: int = Field(4, gt=0, description="Lion drops instructions of three words or fewer.")
    rouge_l_threshold: float = Field(0.7, gt=0, le=1, description=(
        "A new instruction whose ROUGE-L against the pool or a kept new one exceeds it is a near-duplicate."))

    @field_validator("hard_prompt", "easy_prompt")
    @classmethod
    def _a_prompt_with_the_seed(cls, reference: str) -> str:
        # said when the config is read, not inside an actor after the round's scoring was paid for
        if "$seed" not in _prompt(reference).template:
            raise ValueError(f"the prompt '{reference}' has no $seed where the seed goes")
        return reference


class RespondConfig(Section):
    """The teacher answering the round's training instructions with a style chosen by task (TAPIR)."""

    styles: dict[str, str] = Field(default_factory=lambda: {
        "Math": "style_step_by_step", "Reasoning": "style_step_by_step",
        "Code Generation": "style_code", "Code Debug": "style_code"}, description=(
        "Task → system prompt (a bundled name in pipeline/prompts/ or a text file's path)."))
    default_style: str = Field("style_detailed", description="The style of every task not listed in styles.")
    max_tokens: int = Field(1024, gt=0)
    temperature: float = Field(0.0, ge=0)
    pool_answers: Literal["teacher", "reference"] = Field("teacher", description=(
        "Whose answer a planned pool row trains on. 'teacher' (TAPIR): the teacher answers it again in its task's "
        "style. 'reference': a row with a reference answer in the pool keeps it (no call; style 'reference'), and "
        "the teacher answers only rows without one and the new rows. For a pool written by a stronger model than "
        "the teacher: the local default's 135M teacher against the sample pool's hand-written answers or "
        "Alpaca's."))

    @model_validator(mode="after")
    def _every_style_resolves(self) -> "RespondConfig":
        for reference in {*self.styles.values(), self.default_style}:
            _prompt(reference)
        return self


def _prompt(reference: str):
    """The prompt template a config names; one that cannot be read is the config's error (pydantic reports a
    ValueError with the field's place)."""
    try:
        return prompt_template(reference)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None


# Training settings that change nothing of what is trained: a killed training may resume with them changed, and a
# run whose rounds were trained may go on with them changed (pipeline/resume.py).
TRAINING_RESUME_NEUTRAL = ("checkpoint_every_steps", "max_failures")


class TrainingConfig(Section):
    epochs: int = Field(3, gt=0, description="Lion: 3.")
    learning_rate: float = Field(2e-5, gt=0, description="Lion: 2e-5.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    effective_batch_size: int = Field(128, gt=0, description="Sequences per optimizer step, all workers.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per worker per forward pass.")
    max_len: int = Field(1024, gt=0, description="Tokens per training sequence (Lion: 1024).")
    truncation: Literal["drop", "truncate"] = Field("drop", description=(
        "A row longer than max_len: 'drop' leaves it out (counted in the summary, its id listed); "
        "'truncate' keeps its first max_len tokens when some of the answer is left."))
    packing: bool = Field(True, description=(
        "Pack several rows into each max_len sequence; attention never crosses from one to another."))
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage: training/deepspeed/zero{2,3}.json.")
    bf16: Literal["auto", "on", "off"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = True
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    system_prompt: Optional[str] = Field(None, description="Without one, the chat template's own default.")
    checkpoint_every_steps: int = Field(50, gt=0, description=(
        "Optimizer steps between checkpoints; a killed run resumes at the latest. None after the last step: "
        "the exported model is what a finished round keeps."))
    eval_fraction: float = Field(0.02, ge=0, lt=1, description=(
        "Share of the training rows held out to measure loss and perplexity before and after each epoch."))
    eval_max_rows: int = Field(200, ge=0)
    max_failures: int = Field(0, ge=0, description="Worker failures Ray Train recovers from by itself.")
    seed: int = 0


class EvalConfig(Section):
    """`tapir eval`: held-out instructions the trained students are measured on (flags override these)."""

    held_out_path: Optional[str] = Field(None, description=(
        "Held-out instructions (any `tapir pool import` format): instruction, optional input, optional output "
        "(the reference answer; the teacher answers rows without one), optional task (per-category rates)."))
    num_rows: int = Field(200, gt=0, description=(
        "Rows evaluated: the file's first num_rows. ~2 judge calls per row, plus a teacher call per row "
        "without a reference; 200 gives a win rate with a standard error of about 3.5 points."))
    baseline_seeds: int = Field(1, gt=0, description=(
        "`tapir eval compare`: plain-distillation baselines to train, each drawn with its own seed "
        "(curriculum.seed + k), so the baseline's own spread is seen; models are compared with their mean."))
    reference_loss_after_run: bool = Field(True, description=(
        "With held_out_path set, `tapir run` ends by measuring the starting student's and the last round's "
        "student's reference loss on the held-out rows, paired by row (RUN_DIR/heldout_loss/): one engine per "
        "model, no API call."))
    mtbench_questions: Optional[str] = Field(None, description=(
        "`tapir eval mtbench`: questions in MT-Bench's file format (question_id, category, turns), one JSON "
        "object a line; --questions overrides it."))
    mtbench_references: Optional[str] = Field(None, description=(
        "`tapir eval mtbench`: reference answers in MT-Bench's file format (question_id, choices[0].turns); the "
        "judge sees them for math, reasoning and coding. Without them those categories are graded unaided, "
        "which is known to be unreliable; --references overrides it."))
    mtbench_judge_max_tokens: int = Field(512, gt=0, description=(
        "Longest grading reply of the judge: a few sentences and the rating. A reply cut off before its "
        "rating fails the turn as judge_unparseable."))


class RunConfig(Section):
    pool: PoolConfig = PoolConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    student: StudentConfig = StudentConfig()
    teacher: EndpointConfig = EndpointConfig()
    judge: Optional[EndpointConfig] = Field(None, description="Defaults to the teacher.")
    judge_calibration: JudgeCalibrationConfig = JudgeCalibrationConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    scoring: ScoringConfig = ScoringConfig()
    expansion: ExpansionConfig = ExpansionConfig()
    respond: RespondConfig = RespondConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    max_cost_usd: Optional[float] = Field(None, gt=0, description=(
        "Budget cap: no request is sent that could take the run's API cost past it."))

    @property
    def effective_judge(self) -> EndpointConfig:
        return self.judge or self.teacher


class ConfigError(UserError, ValueError):
    """Every problem of one config file, each with its field path (and line, where known)."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} error(s) in the config:\n{listed}")


def bundled_config_path(name: str = "local.yaml") -> Path:
    return Path(str(importlib.resources.files("pipeline") / "configs" / name))


def load_config(path: str | os.PathLike) -> RunConfig:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(path, [f"cannot read the file: {err.strerror}"]) from None
    try:
        root = yaml.compose(text, Loader=_Loader)
        problems = _tree_problems(root)
        if problems:
            raise ConfigError(path, problems)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(path, [f"{where}not valid YAML: {getattr(err, 'problem', err)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["the top level must be a mapping of sections (pool:, student:, …)"])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        lines = _yaml_lines(root)
        raise ConfigError(path, [_describe(e, lines) for e in err.errors()]) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, reading 2e-5 as the number YAML 1.2 (and everyone writing a learning rate) means:
    1.1 wants a dot (2.0e-5) and gives the string "2e-5", which strict types then refuse."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


# A config holds a few hundred values. Aliases may repeat a section, but twelve lines of aliases of aliases
# expand to billions of values, which every later reader (pydantic, `config show`) would walk.
MAX_YAML_VALUES = 10_000


class _AliasBomb(Exception):
    def __init__(self, node: yaml.Node, message: str):
        self.line, self.message = node.start_mark.line + 1, message


def _tree_problems(root: Optional[yaml.Node]) -> list[str]:
    """What safe_load would hide: a key written twice (the first is silently dropped), and aliases that expand
    beyond MAX_YAML_VALUES or refer to the value they sit in."""
    problems: list[str] = []
    sizes: dict[int, Optional[int]] = {}          # id(node) → values it expands to; None while being counted

    def expanded(node: yaml.Node, path: tuple) -> int:
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise _AliasBomb(node, "a YAML alias refers to the value it is part of")
            return sizes[id(node)]
        sizes[id(node)] = None
        total = 1
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value)
                line = key.start_mark.line + 1
                if name in first_line and name != "<<":
                    field = _field_path(path + (name,))
                    problems.append(f"{field} (line {line}): duplicate key; it is also written on line "
                                    f"{first_line[name]}, and YAML would keep only the last one")
                first_line.setdefault(name, line)
                total += expanded(key, path) + expanded(value, path + (name,))
        elif isinstance(node, yaml.SequenceNode):
            total += sum(expanded(item, path + (str(index),)) for index, item in enumerate(node.value))
        sizes[id(node)] = total
        if total > MAX_YAML_VALUES:
            raise _AliasBomb(node, f"YAML aliases here expand to more than {MAX_YAML_VALUES} values; write the "
                                   "values out instead of nesting aliases")
        return total

    if root is not None:
        try:
            expanded(root, ())
        except _AliasBomb as bomb:
            return [f"line {bomb.line}: {bomb.message}"]
    return problems


def _field_path(parts: tuple) -> str:
    """A dotted key path for an error message, with any key that looks like a pasted credential hidden."""
    return ".".join("***" if looks_like_key(part) else part for part in parts)


def _describe(error: dict, lines: dict[tuple, int]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    field = _field_path(loc) or "(top level)"
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    where = f" (line {line})" if line else ""
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error.get("input"), bool) and error["type"] in ("int_type", "float_type"):
        message = f"expected a number, got the boolean {str(error['input']).lower()}"
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; `tapir config show` lists every key)"
    return f"{field}{where}: {message}"


def _yaml_lines(node: Optional[yaml.Node], prefix: tuple = ()) -> dict[tuple, int]:
    """Maps each key path of a YAML document to the line it is written on, for error messages."""
    found: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (str(key.value),)
            found[path] = key.start_mark.line + 1
            found.update(_yaml_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found[prefix + (str(index),)] = item.start_mark.line + 1
            found.update(_yaml_lines(item, prefix + (str(index),)))
    return found


def redact_url(url: str) -> str:
    """Hides user:password in a URL (http://user:pw@host, s3://key:secret@bucket)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def _names_a_secret(key: str) -> bool:
    words = set(re.split(r"[_\-.]", key.lower()))
    return not key.endswith("_env") and bool(words & {"key", "apikey", "token", "secret", "password"})


def redacted(value: Any, key: str = "") -> Any:
    """A copy of a plain config dump that is safe to print: URL credentials, secret-named values and values
    that look like keys hidden."""
    if isinstance(value, dict):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if isinstance(value, str):
        # a path or URL is not taken for a key: run directories and model paths carry dates and hashes
        if _names_a_secret(key) or ("/" not in value and looks_like_key(value)):
            return "***"
        if "://" in value:
            return redact_url(value)
    return value


def show(config: RunConfig) -> str:
    """The resolved config as YAML, safe to print, with whether each API key variable is set."""
    dump = redacted(config.model_dump(mode="json"))
    text = yaml.safe_dump(dump, sort_keys=False, allow_unicode=True)
    notes = []
    for role, endpoint in (("teacher", config.teacher), ("judge", config.effective_judge)):
        state = "set" if os.environ.get(endpoint.api_key_env) else "not set"
        notes.append(f"# {role} key: ${endpoint.api_key_env} is {state}"
                     + (" (a local teacher generates its own)" if endpoint.kind == "local" else ""))
    return text + "\n".join(notes) + "\n"
