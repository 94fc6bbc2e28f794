"""Finding the processes a test started, by a marker variable in their environment: every child inherits it
(a `vllm serve` and its engine, Ray's raylet and workers), whatever it calls itself."""
from __future__ import annotations

import time

import psutil


def with_environment(name: str, value: str) -> list[psutil.Process]:
    """The live processes whose environment holds `name=value`."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(name) == value and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def left_behind(name: str, value: str, grace_s: float = 60.0) -> list[str]:
    """What is still running with `name=value` after up to `grace_s` (Ray's processes end on their own shortly
    after the driver that started them): the survivors' command lines."""
    deadline = time.monotonic() + grace_s
    while (alive := with_environment(name, value)) and time.monotonic() < deadline:
        time.sleep(1.0)
    survivors = []
    for process in alive:
        try:
            survivors.append(" ".join(process.cmdline())[:200])
        except psutil.Error:
            continue
    return survivors
