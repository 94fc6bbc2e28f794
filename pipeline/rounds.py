"""`tapir run CONFIG`: all of TAPIR, round after round, resumable from any point.

One round: score the pool with the round's student → plan (difficulty and task resampling) → expand (the
teacher writes new instructions from the seeds) → respond (the teacher answers in the task's style) →
write the training set → train the next student. Every stage writes its output and a manifest under
`run/round_R/`; a finished stage is skipped when the command runs again and an interrupted one continues
from what it wrote. `run/state.json` says where the run is, what it has spent, how it ended and the config it
ran with: a run resumed with settings that shaped a finished stage is refused (`pipeline/resume.py`).

A run ends cleanly, with everything written so far kept, when the budget would be passed, on SIGTERM, or
when `tapir stop` leaves a STOP file in the run directory (checked before each stage, and
removed when it has stopped a run).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline import console, expansion, planning, responding, resume, scoring, store
from pipeline.classification import classifier_location, round_location, run_dir
from pipeline.config import RunConfig
from pipeline.llm.endpoint import RunEndpoints
from pipeline.llm.limits import BudgetExceeded
from pipeline.llm.spend import STATE_FILE
from pipeline.pool import pool_location
from pipeline.round_summary import format_round_summary, round_summary

log = logging.getLogger(__name__)

# STATE_FILE: RUN_DIR/state.json, named in spend.py, whose budget reads what an older run recorded there
STOP_FILE = "STOP"
STAGES = ("score", "plan", "expand", "respond", "train_set", "train")


class StopRequested(Exception):
    """`tapir stop` asked the run to stop between stages."""


class StageIncomplete(RuntimeError):
    """A stage ended without all of its rows (it says which); the same command continues it."""


def run(config: RunConfig, progress: bool = True) -> dict:
    """Runs every round not yet finished and returns the run's state (also in `run/state.json`)."""
    from pipeline.ray_runtime import init_ray, run_limits

    location = run_dir(config)
    location.makedirs()
    state = store.read_json(location, STATE_FILE) or {"rounds": {}}
    key = scoring.config_hash(config)
    prepared = [name for name, done in ((resume.POOL_IMPORT, pool_location(config).child(store.MANIFEST)),
                                        (resume.CLASSIFIER, classifier_location(config).child("config.json")))
                if done.exists()]
    changed = resume.check(state, config, key, location.child(STATE_FILE).uri, prepared)
    if changed:
        log.info("resumed with changed settings that shaped no finished stage: %s", ", ".join(changed))
        state.setdefault("config_changes", []).append({"at": _now(), "settings": changed})
    state.update(status="running", rounds_planned=config.curriculum.rounds, config_hash=key,
                 config=config.model_dump(mode="json"), last_started=_now(), stopped_because=None)
    limits = None

    def save() -> None:
        if limits is not None:          # every command's spend on this run directory, as spend.json keeps it
            state["spent_usd"] = asyncio.run(limits.record_spend())
        state["updated"] = _now()
        store.write_json(location, STATE_FILE, state)

    previous_handler = None
    try:
        with contextlib.ExitStack() as stack:
            log_dir = _log_dir(location, stack)
            # before Ray starts: a local teacher's key reaches the workers only through the environment they
            # inherit from this process
            endpoints = RunEndpoints(config.teacher, config.judge, config.storage.cache_dir, stack, log_dir)
            init_ray(config.ray, min_cpus=max(scoring.job_cpus(config), config.training.num_workers + 3))
            # after ray.init, which installs a SIGTERM handler of its own that exits without a word
            previous_handler = signal.signal(signal.SIGTERM, _interrupt)
            limits = run_limits(config)
            for round_index in range(config.curriculum.rounds):
                _round(config, round_index, endpoints, state, save, progress)
            if measures_heldout(config):
                _heldout(config, state, save)
        state["status"] = "finished"
    except StopRequested:
        location.fs.delete_file(location.child(STOP_FILE).path)      # done with: the next run goes on
        state.update(status="stopped", stopped_because="stop requested (tapir stop)")
    except KeyboardInterrupt:
        state.update(status="stopped", stopped_because="interrupted (SIGTERM or Ctrl-C)")
    except BudgetExceeded as err:
        state.update(status="stopped", stopped_because=f"budget: {err}")
    except StageIncomplete as err:
        state.update(status="incomplete", stopped_because=str(err))
    except BaseException as err:
        state.update(status="failed", stopped_because=f"{type(err).__name__}: {err}")
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        save()
    return state


def _round(config: RunConfig, r: int, endpoints: RunEndpoints, state: dict, save: Callable[[], None],
           progress: bool) -> None:
    """One round from top to bottom; each step is skipped when it finished in an earlier invocation."""
    from training import sft

    done = state["rounds"].setdefault(str(r), {"finished": [], "summaries": {}})

    def step(name: str, work: Callable[[], dict]) -> dict:
        if name in done["finished"]:
            return done["summaries"][name]
        if run_dir(config).child(STOP_FILE).exists():
            raise StopRequested()
        state.update(round=r, stage=name)
        save()
        log.info("round %d: %s", r, name)
        console.progress(f"round {r}: {name}")
        started = time.perf_counter()
        summary = work()
        if not summary.get("complete"):
            raise StageIncomplete(f"round {r} {name}: the stage did not finish all of its rows; run the same "
                                  f"command again to continue it")
        done["finished"].append(name)
        done["summaries"][name] = _brief(summary)
        console.say(f"round {r}: {name} done in {time.perf_counter() - started:.1f} s")
        save()
        return done["summaries"][name]

    step("score", lambda: scoring.score(config, r, progress, endpoints))
    step("plan", lambda: planning.plan(config, r))
    step("expand", lambda: expansion.expand(config, r, endpoints))
    new_rows = expansion.read_new_rows(config, r)
    step("respond", lambda: responding.respond(config, r, new_rows, endpoints))
    step("train_set", lambda: planning.write_training_set(config, r, new_rows, responding.read_answers(config, r)))
    skip_smoke = (f"round {r + 1}'s scoring loads it in vLLM" if r < config.curriculum.rounds - 1 else
                  "the held-out reference loss loads it in vLLM" if measures_heldout(config) else None)
    step("train", lambda: sft.train(config, r, skip_smoke))
    if "summary" not in done:
        summary = round_summary(config, r, done["summaries"])
        store.write_json(round_location(config, r), "summary.json", summary)
        text = format_round_summary(summary)
        store.write_text(round_location(config, r), "summary.txt", text)
        console.say(text)
        done["summary"] = True
        save()


def measures_heldout(config: RunConfig) -> bool:
    return bool(config.eval.held_out_path) and config.eval.reference_loss_after_run


def _heldout(config: RunConfig, state: dict, save: Callable[[], None]) -> None:
    """The run's last step: the starting and the last student's reference loss on the held-out rows."""
    from pipeline.evaluation.heldout_loss import format_heldout, measure

    if run_dir(config).child(STOP_FILE).exists():
        raise StopRequested()
    state.update(stage="heldout_loss")
    save()
    console.progress("held-out reference loss")
    summary = measure(config, config.curriculum.rounds - 1)
    state["heldout_loss"] = summary
    console.say(format_heldout(summary))
    save()


def _log_dir(location: store.Location, stack: contextlib.ExitStack) -> Path:
    """Where a local teacher writes its log: RUN_DIR/logs on a local file system; on object storage a local
    folder, copied to RUN_DIR/logs once the teacher has stopped (when `stack` closes)."""
    if location.is_local:
        return Path(location.path) / "logs"
    local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tapir-logs-")))

    def keep() -> None:
        if any(local.iterdir()):
            store.copy_dir(str(local), location.child("logs"))

    stack.callback(keep)
    return local


def _brief(summary: dict) -> dict:
    """A stage summary as kept in state.json: without the bulky per-row lists."""
    return {k: v for k, v in summary.items() if k not in ("smoke", "stages", "eval")}


def request_stop(config: RunConfig) -> str:
    """`tapir stop`: the running command stops before its next stage; returns the STOP file's URI."""
    location = run_dir(config)
    store.write_text(location, STOP_FILE, f"stop requested at {_now()}\n")
    return location.child(STOP_FILE).uri


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
