"""Whether a run may go on with the config it is resumed with.

`state.json` keeps the config a run last ran with. Resumed with another one, the run compares them setting by
setting: a setting that shaped the output of a stage the run has finished (in any round) would mix two configs
in one run, so the run is refused with the settings that differ; settings that shape no output (the budget, the
number of rounds, where and how fast the work runs) may change, and each change is recorded in `state.json`.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable

from pipeline.config import TRAINING_RESUME_NEUTRAL, RunConfig, redacted
from pipeline.errors import UserError

# Settings that shape no stage's output: what a run may spend, how many rounds it has, and where and how fast the
# work runs (run_dir too: the state was found in it, however it is spelled now). A prefix covers what is under it.
FREE_SETTINGS = (
    "max_cost_usd", "curriculum.rounds", "ray.", "eval.", "storage.run_dir", "storage.cache_dir",
    "storage.s3_endpoint_url", *(f"training.{name}" for name in TRAINING_RESUME_NEUTRAL),
    "student.num_actors", "student.batch_size", "classifier.num_actors", "classifier.batch_size",
    "scoring.actors_per_stage", "scoring.batches_in_flight_per_actor", "scoring.batch_size",
    *(f"{role}.{name}" for role in ("teacher", "judge") for name in (
        "requests_per_minute", "tokens_per_minute", "max_concurrency", "price.", "local.host", "local.port",
        "local.startup_timeout_s")),
)
_ALL = ("score", "plan", "expand", "respond", "train_set", "train")
# What a run prepares once, before its first round's scoring finishes; the caller says which of them exist.
POOL_IMPORT, CLASSIFIER = "pool import", "classifier"
# The stages whose output a section (or a single setting, which takes precedence) shapes.
_SHAPES = {
    "pool": (POOL_IMPORT, *_ALL), "storage": _ALL, "classifier": (CLASSIFIER, "score", "expand"),
    "student": ("score",), "teacher": (CLASSIFIER, "score", "expand", "respond"), "judge": ("score",),
    "scoring": ("score", "expand", "respond"),
    "curriculum": ("plan", "expand", "train_set"), "curriculum.keep_reference_outputs": ("score",),
    "curriculum.expansion_per_round": ("expand",), "expansion": ("expand",), "respond": ("respond",),
    "training": ("train",),
}


log = logging.getLogger(__name__)


class ResumeRefused(UserError, ValueError):
    """A run resumed with a config that changes what its finished stages produced."""


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config dump as {dotted.setting: value}."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _is_free(setting: str) -> bool:
    return any(setting == free or (free.endswith(".") and setting.startswith(free)) for free in FREE_SETTINGS)


def _unknown_to(settings: dict[str, Any], setting: str) -> bool:
    """Whether a config dump has no trace of a setting: neither it nor a value enclosing it (`judge: null` encloses
    judge.model). A setting the code added or removed since is not a change the user made."""
    parts = setting.split(".")
    return all(".".join(parts[:n]) not in settings for n in range(1, len(parts) + 1))


def _stages_shaped(setting: str) -> tuple[str, ...]:
    if setting in _SHAPES:
        return _SHAPES[setting]
    return _SHAPES.get(setting.split(".", 1)[0], _ALL)       # a setting not listed is taken to shape everything


def check(state: dict, config: RunConfig, config_hash: str, where: str,
          prepared: Iterable[str] = ()) -> dict[str, list]:
    """The settings changed since the run last ran, {setting: [before, now]} (empty for a new run or the same
    config); raises ResumeRefused when one of them shaped a stage the run has finished, or what it has `prepared`
    (POOL_IMPORT, CLASSIFIER). `where`: state.json's URI."""
    finished = {(stage, f"{stage} of round {r}") for r, done in state.get("rounds", {}).items()
                for stage in done.get("finished", [])} | {(stage, stage) for stage in prepared}
    before = state.get("config")
    if before is None:
        # A state.json written before settings were recorded holds only a hash of the whole config, which every
        # setting the code adds changes too: it cannot tell a user's change from an upgrade, so it only warns.
        if finished and state.get("config_hash") not in (None, config_hash):
            log.warning("%s: this run started before its settings were recorded, with a config that hashes "
                        "differently (%s, now %s); settings are compared from now on", where,
                        state["config_hash"], config_hash)
        return {}
    now = config.model_dump(mode="json")
    old, new = _flat(before), _flat(now)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    refused = []
    for setting, (was, is_now) in changed.items():
        if _is_free(setting) or _unknown_to(old, setting) or _unknown_to(new, setting):
            continue
        shaped = sorted(label for stage, label in finished if stage in _stages_shaped(setting))
        if shaped:
            refused.append(f"  {setting}: {_shown(was)} → {_shown(is_now)} (shaped {', '.join(shaped[:3])}"
                           f"{', …' if len(shaped) > 3 else ''})")
    if refused:
        raise ResumeRefused(
            f"{where}: this run was started with another config, and these settings shaped stages it has already "
            f"finished:\n" + "\n".join(refused) + "\nPut the config back as it was to continue the run, or give "
            "the new config another storage.run_dir to start a new run. (The budget, the number of rounds and where "
            "and how fast the work runs may change on a resume.)")
    return changed


def _shown(value: Any) -> str:
    text = json.dumps(redacted(value), ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
