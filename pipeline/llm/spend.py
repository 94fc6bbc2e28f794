"""The run's spend as it happens, in RUN_DIR/spend.json: what every command on the run directory has paid.

Written by whoever holds the run's limits (the limits actor, or the process of a command without Ray) each
time the worst case of what was spent grows, that is about once per request sent: the settled spend and the
worst case of the requests in flight. A command killed with SIGKILL leaves a record that its spend cannot have
passed (requests in flight then may have been answered and billed, so they count at their worst case), and the
next command's budget starts from it.
"""
from __future__ import annotations

import logging

from pipeline import store
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

SPEND_FILE = "spend.json"


class SpendRecord:
    def __init__(self, location: store.Location):
        self.location = location

    def spent_before(self) -> float:
        """What earlier commands spent, worst case: their settled spend and what they had in flight."""
        record = store.read_json(self.location, SPEND_FILE) or {}
        in_flight = record.get("in_flight_worst_usd", 0.0)
        if in_flight:
            log.warning("%s: the last command stopped with requests in flight; counting them at their worst "
                        "case, $%.4f", self.location.child(SPEND_FILE).uri, in_flight)
        return record.get("spent_usd", 0.0) + in_flight

    def __call__(self, spent_usd: float, in_flight_worst_usd: float) -> None:
        store.write_json(self.location, SPEND_FILE,
                         {"spent_usd": spent_usd, "in_flight_worst_usd": in_flight_worst_usd})


def spend_record(config: RunConfig) -> SpendRecord:
    return SpendRecord(store.locate(config.storage.run_dir, config.storage.s3_endpoint_url))
