"""The local teacher: `vllm serve` of a model on loopback with a random API key.

`tapir serve-teacher` and the run driver use this same class. Start-up waits until the server answers
an authenticated request, and fails fast, with the tail of the server's log, when the port is taken,
the model does not load or the process dies. The key reaches the server through its environment
(VLLM_API_KEY), never its command line, which any local user can read.
"""
from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from pipeline.config import LocalServerConfig, VllmEngineConfig
from pipeline.errors import UserError
from pipeline.llm.secret import Secret
from pipeline.models import engine_dtype

log = logging.getLogger(__name__)

_POLL_S = 1.0
_STOP_GRACE_S = 30.0
_LOG_TAIL_LINES = 25
_PR_SET_PDEATHSIG = 1    # prctl option, <linux/prctl.h>


def _stop_when_parent_dies() -> None:
    """Runs in the server's process before exec: SIGTERM when we die, even by SIGKILL, so a killed run
    leaves no teacher behind holding memory and a port (Linux only; elsewhere stop() is the only way)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class TeacherServerError(UserError, RuntimeError):
    """The local teacher could not start, or stopped; the message carries the server's last log lines."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def engine_cli_args(engine: VllmEngineConfig) -> list[str]:
    """The `vllm serve` flags for an engine config (extra_args become --flag value)."""
    import torch

    args = ["--max-model-len", str(engine.max_model_len),
            "--dtype", engine_dtype(engine.dtype, on_gpu=torch.cuda.is_available()),
            "--tensor-parallel-size", str(engine.tensor_parallel_size)]
    if engine.enforce_eager:
        args.append("--enforce-eager")
    if engine.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    for name, value in engine.extra_args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


class LocalTeacherServer:
    """Context manager: `with LocalTeacherServer(cfg, model_dir, name) as server: server.base_url`."""

    def __init__(self, config: LocalServerConfig, model_dir: str, served_model: str,
                 api_key: Optional[Secret] = None, log_path: Optional[Path] = None):
        self.config = config
        self.model_dir = model_dir
        self.served_model = served_model
        self.api_key = api_key or Secret(secrets.token_urlsafe(32))
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="tapir-teacher-")) / "vllm-serve.log"
        self.port: Optional[int] = None
        self._process: Optional[subprocess.Popen] = None

    def __repr__(self) -> str:
        return f"LocalTeacherServer(model={self.model_dir!r}, base_url={self.base_url!r})"

    @property
    def base_url(self) -> Optional[str]:
        return f"http://{self.config.host}:{self.port}/v1" if self.port else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "LocalTeacherServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        host = self.config.host
        if self.config.port and not _port_free(host, self.config.port):
            raise TeacherServerError(f"port {self.config.port} on {host} is already in use; stop what holds it "
                                     "or set teacher.local.port to 0 to pick a free port")
        self.port = self.config.port or _free_port(host)
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                   "--model", self.model_dir, "--served-model-name", self.served_model,
                   "--host", host, "--port", str(self.port), *engine_cli_args(self.config.engine)]
        env = {**os.environ, "VLLM_API_KEY": self.api_key.reveal(),
               "VLLM_CPU_KVCACHE_SPACE": str(self.config.engine.kv_cache_space_gib),
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting the local teacher (%s) on %s; log: %s", Path(self.model_dir).name, self.base_url,
                 self.log_path)
        with open(self.log_path, "ab") as log_file:
            # A session of its own: Ctrl-C in the terminal reaches only us, and stop() can end the whole group.
            self._process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_stop_when_parent_dies)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        started = time.monotonic()
        deadline = started + self.config.startup_timeout_s
        request = urllib.request.Request(f"{self.base_url}/models",
                                         headers={"Authorization": f"Bearer {self.api_key.reveal()}"})
        while time.monotonic() < deadline:
            if not self.running:
                raise TeacherServerError(f"the local teacher exited with code {self._process.returncode} while "
                                         f"starting.\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        log.info("local teacher ready in %.1f s at %s", time.monotonic() - started, self.base_url)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(_POLL_S)
        raise TeacherServerError(f"the local teacher did not answer within {self.config.startup_timeout_s:.0f} s "
                                 f"(teacher.local.startup_timeout_s).\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raises TeacherServerError if the server has died since it started."""
        if self._process is not None and not self.running:
            raise TeacherServerError(f"the local teacher exited with code {self._process.returncode}.\n"
                                     f"{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            return f"(no log at {self.log_path})"
        key = self.api_key.reveal()
        shown = "\n".join("    " + line.replace(key, "***") for line in lines)
        return f"last lines of {self.log_path}:\n{shown}"

    def stop(self) -> None:
        """Ends the server and its engine processes: SIGTERM to the group, SIGKILL after a grace period."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("the local teacher did not stop in %.0f s; killing it", _STOP_GRACE_S)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        # Even when the server itself died, its engine process may still hold memory and the port.
        _end_group(process.pid)
        log.info("local teacher stopped")


def _group_gone(group: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _end_group(group: int) -> None:
    """Ends what is left of the server's process group (engine core, resource tracker): politely, then not."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                return
        if _group_gone(group, wait_s=5.0):
            return
    log.warning("processes of the local teacher's group %d are still there after SIGKILL", group)
