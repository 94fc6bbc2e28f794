"""`tapir submit`, `tapir status`, `tapir logs`: a run as a Ray job on a cluster, through Ray's job SDK.

What a job carries is stored by the cluster and shown to anyone who lists its jobs: its entrypoint, runtime
env and metadata. So the teacher's and judge's keys never travel with it: the config names their variables
(`api_key_env`), the job's metadata repeats those names for `tapir status`, and the values come from the
cluster nodes' own environment (a Kubernetes Secret, or the environment `ray start` ran in; see cluster/).
The Ray token (`RAY_AUTH_TOKEN`) goes in the request's Authorization header only.
"""
from __future__ import annotations

import asyncio
import datetime
import os
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

from pipeline.config import RunConfig, redact_url
from pipeline.errors import UserError

AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
# This package, uploaded with the job (py_modules): the nodes need its dependencies installed, not the package.
PACKAGES = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "training")]
# Never uploaded: local installs, local runs, git history, caches (Ray also skips what .gitignore lists).
UPLOAD_EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]
FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UserError):
    """A job that cannot be submitted or followed, with what to do about it."""


@dataclass(frozen=True)
class JobRequest:
    """Everything `submit_job` is given; all of it is visible to whoever can list the cluster's jobs."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict


def secret_env_names(config: RunConfig) -> list[str]:
    """The environment variables the run reads keys from: they must be set on the cluster, not sent."""
    endpoints = [config.teacher, config.effective_judge]
    return sorted({e.api_key_env for e in endpoints if e.kind == "remote" and e.api_key_env})


def job_request(config: RunConfig, config_path: Path, working_dir: Optional[Path] = None) -> JobRequest:
    """The job for `tapir run CONFIG`, run in `working_dir` (default: the config's directory), which is
    uploaded with it, so relative paths in the config mean there what they mean here."""
    config_path = config_path.resolve()
    working_dir = (working_dir or config_path.parent).resolve()
    if not config_path.is_relative_to(working_dir):
        raise SubmitError(f"{config_path} is outside the working dir {working_dir}, which is all the job gets: "
                          f"move the config into it, or pass --working-dir")
    relative = config_path.relative_to(working_dir).as_posix()
    return JobRequest(
        submission_id=f"tapir-{config_path.stem}-{uuid.uuid4().hex[:8]}",
        # `python -m`: the cluster's Python has the dependencies; the package comes with the job
        entrypoint=f"python -m pipeline.cli run {shlex.quote(relative)}",
        runtime_env={"working_dir": str(working_dir), "py_modules": PACKAGES, "excludes": UPLOAD_EXCLUDES,
                     "env_vars": {"PYTHONUNBUFFERED": "1"}},
        metadata={"tapir_config": relative, "tapir_run_dir": redact_url(config.storage.run_dir),
                  "tapir_secret_env": ",".join(secret_env_names(config))})


def job_client(address: Optional[str]):
    """A job SDK client for `address` (None: Ray's own RAY_ADDRESS / RAY_API_SERVER_ADDRESS lookup)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = os.environ.get(AUTH_TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        hint = "the token in RAY_AUTH_TOKEN was refused" if token else "set RAY_AUTH_TOKEN to the cluster's token"
        raise SubmitError(f"the Ray cluster at {address or '$RAY_ADDRESS'} wants token authentication: "
                          f"{hint} (`ray get-auth-token` on the head node prints it)") from None
    except ConnectionError as err:
        raise SubmitError(f"no Ray job server answers at {address or '$RAY_ADDRESS'}: {err}") from None


def asking(client, job_id: str, what: str):
    """The job server's answer to `client.<what>(job_id)`; a job it does not know is a clear error."""
    try:
        return getattr(client, what)(job_id)
    except RuntimeError as err:            # the SDK's form of every refused request
        if "status code 404" in str(err):
            raise SubmitError(f"no job {job_id} on this cluster (`ray job list` lists its jobs)") from None
        raise SubmitError(f"the job server refused {what} for {job_id}: {err}") from None


def submit(client, request: JobRequest) -> str:
    return client.submit_job(entrypoint=request.entrypoint, runtime_env=request.runtime_env,
                             metadata=request.metadata, submission_id=request.submission_id)


def _time(epoch_ms: Optional[int]) -> str:
    if not epoch_ms:
        return "-"
    return datetime.datetime.fromtimestamp(epoch_ms / 1000).isoformat(sep=" ", timespec="seconds")


def describe(job_id: str, info) -> str:
    """`tapir status`: what a person needs to know about a submitted run."""
    metadata = info.metadata or {}
    lines = [f"job {job_id}: {info.status}",
             f"  entrypoint: {info.entrypoint}",
             f"  started {_time(info.start_time)}, ended {_time(info.end_time)}"]
    if info.start_time:
        end = info.end_time or datetime.datetime.now().timestamp() * 1000
        lines[-1] += f" ({(end - info.start_time) / 1000:.0f} s)"
    if "tapir_run_dir" in metadata:
        lines.append(f"  run directory: {metadata['tapir_run_dir']} (config {metadata.get('tapir_config')})")
    if metadata.get("tapir_secret_env"):
        lines.append(f"  keys read on the cluster from: {metadata['tapir_secret_env']}")
    if info.driver_exit_code is not None:
        lines.append(f"  exit code: {info.driver_exit_code}")
    if info.message and str(info.status) != "SUCCEEDED":
        lines.append(f"  message: {info.message.strip().splitlines()[0]}")
    return "\n".join(lines)


def follow(client, job_id: str, out: TextIO) -> str:
    """Streams the job's logs to `out` until it ends; returns its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asking(client, job_id, "get_job_status")          # an unknown job: a clear error, not a closed socket
    asyncio.run(tail())
    return str(asking(client, job_id, "get_job_status"))
