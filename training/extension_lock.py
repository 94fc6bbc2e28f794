"""DeepSpeed's C++ ops on CPU, loaded so that a killed process cannot hang every later training run.

DeepSpeed JIT-compiles its shared-memory communication op (`deepspeed_shm_comm`) with torch's cpp_extension
the first time a process initialises it, and loads it again (a ninja no-op) in every later process. torch
guards each build directory with a `lock` file (FileBaton) that has no owner: a process killed while holding
it (a run stopped with kill -9, a node lost in the middle of a worker's start) leaves the file behind, and
every later process waits for it forever. This module loads the op under a kernel lock (flock, released by
the kernel when its process dies) that every training worker takes first; whoever holds it knows that no
other worker is building, so a `lock` file it finds is stale and is removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

_FLOCK_NAME = ".tapir-build.flock"


def extensions_root() -> Path:
    """Where torch builds its JIT extensions: TORCH_EXTENSIONS_DIR, else torch's per-user cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


@contextlib.contextmanager
def exclusive_builds(root: Path) -> Iterator[list[Path]]:
    """Holds the build flock of `root`, after removing the torch build locks that no live holder owns.
    Yields the stale locks it removed."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _FLOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        # build directories sit at root/NAME (older torch) or root/PLATFORM/NAME (py311_cpu/...)
        stale = sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})
        for lock in stale:
            log.warning("%s: removing a torch extension build lock left by a process that was killed while "
                        "building or loading it (it would make every later load wait forever)", lock)
            lock.unlink(missing_ok=True)
        yield stale


def load_deepspeed_ops() -> None:
    """Loads (compiling on first use) the C++ op deepspeed.initialize loads, under the build flock. The op is
    then cached in this process, so deepspeed.initialize, whose collectives need every worker, loads nothing."""
    from deepspeed.comm.torch import build_shm_op

    with exclusive_builds(extensions_root()):
        build_shm_op()
