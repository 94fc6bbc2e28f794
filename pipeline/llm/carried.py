"""Replies paid for but not written, kept in RUN_DIR/carried_replies/ for the command that asks them again.

A budget refusal stops a stage after the batch in flight: the rows whose request was refused are left out of
the output so the next command asks them again. Some of those rows hold a reply that was already paid: the
teacher's answer of a row whose judge call was refused, or one order of a judge pair whose other order was.
Each such reply is kept here under the key of its request; a client that is asked the identical request
(same model, messages, max_tokens, temperature and schema) in a later command returns the kept reply, once,
instead of paying for it again. The reply's tokens were counted in the spend of the command that paid them.

One small JSON file a reply, listed once when a client opens: refusals are rare, and a listing per request
would cost an object-store call per request on S3.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from pipeline import store
from pipeline.llm.client import ChatReply, ChatRequest, request_key

CARRIED_DIR = "carried_replies"


class CarriedReplies:
    """Picklable (a Location), so a stage's constructor arguments can hold it."""

    def __init__(self, location: store.Location):
        self.location = location

    def keys(self) -> set[str]:
        return {path.rsplit("/", 1)[-1].removesuffix(".json") for path in self.location.list_files(".json")}

    def keep(self, model: str, request: ChatRequest, reply: ChatReply) -> None:
        self.location.makedirs()
        store.write_json(self.location, request_key(model, request) + ".json", dataclasses.asdict(reply))

    def take(self, key: str) -> Optional[ChatReply]:
        """The reply kept under `key`, removed so that it is used once; None if another worker took it."""
        name = key + ".json"
        fields = store.read_json(self.location, name)
        if fields is None:
            return None
        try:
            self.location.fs.delete_file(self.location.child(name).path)
        except (FileNotFoundError, OSError):
            return None                      # another worker took it between the read and the delete
        return ChatReply(**fields)


def carried_replies(run_dir: store.Location) -> CarriedReplies:
    return CarriedReplies(run_dir.child(CARRIED_DIR))

