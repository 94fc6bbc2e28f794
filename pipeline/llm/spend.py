"""The run's spend as it happens, in RUN_DIR/spend.json: what every command on the run directory has paid.

Written by whoever holds the run's limits (the limits actor, or the process of a command without Ray): the
settled spend, and a bound the spend cannot have passed, written before any request could pass it (limits.py:
what is settled, the requests in flight at their worst case, and 1% of the cap more, so that the record is
written about once per 1% of the cap rather than once per request). A command killed with SIGKILL leaves that
bound (requests in flight then may have been answered and billed), and the next command's budget starts from
it: at most 1% of the cap plus what was in flight is counted that was perhaps not spent, never less.
"""
from __future__ import annotations

import logging

from pipeline import store
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

SPEND_FILE = "spend.json"
STATE_FILE = "state.json"          # the run's state (pipeline/rounds.py)


class SpendRecord:
    def __init__(self, location: store.Location):
        self.location = location

    def spent_before(self) -> float:
        """What earlier commands spent, at worst: the bound the last one recorded."""
        record = store.read_json(self.location, SPEND_FILE)
        if record is None:
            # a run directory from before spend.json: its state.json kept what its finished commands spent
            record = {"spent_usd": (store.read_json(self.location, STATE_FILE) or {}).get("spent_usd", 0.0)}
        spent, bound = record.get("spent_usd", 0.0), record.get("bound_usd", 0.0)
        if bound > spent:
            log.warning("%s: the last command stopped without settling its spend (killed?); counting $%.4f, the "
                        "most it can have spent, not the $%.4f it had settled", self.location.child(SPEND_FILE).uri,
                        bound, spent)
        return max(spent, bound)

    def __call__(self, spent_usd: float, bound_usd: float) -> None:
        store.write_json(self.location, SPEND_FILE, {"spent_usd": spent_usd, "bound_usd": bound_usd})


def spend_record(config: RunConfig) -> SpendRecord:
    return SpendRecord(store.locate(config.storage.run_dir, config.storage.s3_endpoint_url))
