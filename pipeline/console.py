"""What `tapir run` shows a person, and where everything else it prints goes.

Ray, Ray Data, vLLM, DeepSpeed and transformers write to the process's stdout and stderr: the driver's own
lines, the lines Ray forwards from its workers (`(RayTrainWorker pid=…)`), and what child processes inherit
(multiprocessing's resource_tracker). On a 2-round demo that is more than 2,000 lines. `route_to_log` points
both file descriptors at the run's log file for the rest of the process, so all of that lands there whatever
wrote it, and keeps a copy of the original terminal for the lines meant for a person: a line per stage, each
round's summary, the result, warnings of this project's own loggers, and an error with the log's path.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, TextIO

LOG_NAME = "run.log"

_out: Optional[TextIO] = None           # the original stdout and stderr once routed; None: sys.stdout/stderr
_err: Optional[TextIO] = None
_log_path: Optional[Path] = None
_pending = False                        # a progress line without its newline is on the terminal


def route_to_log(log_path: Path, command: str) -> None:
    """From now on fds 1 and 2 write to `log_path` (appended to: a resumed run's lines follow the earlier
    invocation's), and `say`/`error` to the terminal. Warnings and errors of this project's loggers are shown on
    the terminal too, as one line each (their tracebacks stay in the log)."""
    global _out, _err, _log_path
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    _err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n== {command} at {datetime.now(timezone.utc).isoformat(timespec='seconds')} ==\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _log_path = log_path
    handler = _TerminalHandler()
    for name in ("tapir", "pipeline", "training"):
        logging.getLogger(name).addHandler(handler)


def log_path() -> Optional[Path]:
    """The file the process's output goes to, once routed."""
    return _log_path


def terminal(err: bool = False) -> TextIO:
    """The terminal's stdout (or stderr), routed or not."""
    return (_err or sys.stderr) if err else (_out or sys.stdout)


def say(text: str) -> None:
    """A line for the person at the terminal."""
    _finish_progress()
    print(text, file=terminal(), flush=True)


def progress(text: str) -> None:
    """A line that the next `say` replaces: what is running now, shown only on a terminal (in a file or a pipe
    the finished line that follows says it)."""
    global _pending
    out = terminal()
    if out.isatty():
        _finish_progress()
        out.write(f"{text} …")
        out.flush()
        _pending = True


def error(message: str) -> None:
    """An error for the person at the terminal, with the log that holds what led to it."""
    _finish_progress()
    where = f"\n(what led to it, and its traceback: {_log_path})" if _log_path else ""
    print(f"tapir: error: {message}{where}", file=terminal(err=True), flush=True)


def _finish_progress() -> None:
    global _pending
    if _pending:
        terminal().write("\r\033[K")      # back to the line's start, and clear it
        _pending = False


class _TerminalHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        _finish_progress()
        print(f"tapir: {record.levelname.lower()}: {record.getMessage()}", file=_err, flush=True)
