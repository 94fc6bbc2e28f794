"""Opening the configured teacher or judge endpoint: a remote API, or a local `vllm serve` started here."""
from __future__ import annotations

import contextlib
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from pipeline.config import EndpointConfig
from pipeline.llm.local_server import LocalTeacherServer
from pipeline.llm.secret import Secret, secret_from_env
from pipeline.models import local_model, resolve_model


@dataclass(frozen=True)
class OpenEndpoint:
    base_url: str
    model: str
    api_key: Secret
    server: Optional[LocalTeacherServer] = None


@contextmanager
def open_endpoint(endpoint: EndpointConfig, cache_dir: str, log_path: Optional[Path] = None,
                  role: str = "teacher") -> Iterator[OpenEndpoint]:
    """Yields a usable endpoint; a local teacher is started on entry and stopped on exit, even on errors.

    A local teacher uses the key in $api_key_env when that variable is set (so other processes can be
    given it), and a fresh random key otherwise.
    """
    if endpoint.kind == "remote":
        yield OpenEndpoint(endpoint.base_url, endpoint.model, secret_from_env(endpoint.api_key_env, role))
        return
    model_dir = local_model(resolve_model(endpoint.local.model, cache_dir))      # `vllm serve` runs here
    given = os.environ.get(endpoint.api_key_env)
    with LocalTeacherServer(endpoint.local, model_dir, endpoint.served_model,
                            api_key=Secret(given) if given else None, log_path=log_path) as server:
        yield OpenEndpoint(server.base_url, endpoint.served_model, server.api_key, server)


class RunEndpoints:
    """The run's teacher and judge, each opened on first use and kept open until the stack closes, so a local
    teacher starts once per command however many stages call it, and not at all in a command none calls. A
    local teacher's key is drawn here and put into the environment: make this before Ray starts, since workers
    read the key from the environment they inherit (it never travels as a task argument), whenever the teacher
    itself starts."""

    def __init__(self, teacher: EndpointConfig, judge: Optional[EndpointConfig], cache_dir: str,
                 stack: contextlib.ExitStack, log_dir: Optional[Path] = None):
        self._configs = {"teacher": teacher, "judge": judge}
        self._cache_dir, self._stack, self._log_dir = cache_dir, stack, log_dir
        self._open: dict[str, OpenEndpoint] = {}
        for role, config in self._configs.items():
            if config is None:
                continue
            if config.kind == "remote":
                secret_from_env(config.api_key_env, role)    # a missing key stops the command now, not mid-run
            elif not os.environ.get(config.api_key_env):
                os.environ[config.api_key_env] = secrets.token_urlsafe(32)

    def teacher(self) -> OpenEndpoint:
        return self._opened("teacher")

    def judge(self) -> OpenEndpoint:
        return self._opened("judge") if self._configs["judge"] is not None else self.teacher()

    def _opened(self, role: str) -> OpenEndpoint:
        if role not in self._open:
            config = self._configs[role]
            log_path = self._log_dir / f"{role}.log" if self._log_dir else None
            endpoint = self._stack.enter_context(open_endpoint(config, self._cache_dir, log_path, role=role))
            os.environ[config.api_key_env] = endpoint.api_key.reveal()
            self._open[role] = endpoint
        return self._open[role]
