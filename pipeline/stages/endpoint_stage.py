"""The base of the async Ray Data stages that call the teacher or judge endpoint.

When the budget refuses a request, the batch's other requests finish and the rows they paid for are written:
only the refused rows are left out of the stage's output (`paid_rows`), so the job's checkpoint does not count
them as done and the next command asks them again; the job then stops with BudgetExceeded (jobs.py). What a
refused row had already paid for is kept for that command (pipeline/llm/carried.py), not paid again.
"""
from __future__ import annotations

import asyncio
from typing import Optional, Union

import pyarrow as pa

from pipeline.config import EndpointConfig, ScoringConfig
from pipeline.llm.carried import CarriedReplies
from pipeline.llm.client import BUDGET_REFUSED, ChatClient, ChatReply, ChatRequest, RequestFailed, unless_refused
from pipeline.llm.secret import secret_from_env


class EndpointStage:
    """Holds what an actor needs to open its client; the key is read from the actor's environment.

    The client is opened on the first batch, inside the event loop Ray Data runs the async `__call__` in:
    an aiohttp session belongs to the loop that created it.
    """

    def __init__(self, endpoint: EndpointConfig, base_url: str, model: str, limits, role: str,
                 carried: Optional[CarriedReplies] = None):
        self.endpoint, self.base_url, self.model, self.limits, self.role = endpoint, base_url, model, limits, role
        self.carried = carried
        self._client: Optional[ChatClient] = None

    async def client(self) -> ChatClient:
        if self._client is None:
            self._client = await ChatClient(self.endpoint, self.base_url,
                                            secret_from_env(self.endpoint.api_key_env, self.role), self.limits,
                                            self.model, self.carried).__aenter__()
        return self._client

    async def ask(self, requests: dict[int, ChatRequest]) -> dict[int, Union[ChatReply, RequestFailed]]:
        """Every request at once (the client paces them); a request that fails for good is returned, not raised.
        No request opens no client: a stage whose rows need no call may have no endpoint (scoring.needs_teacher)."""
        if not requests:
            return {}
        client = await self.client()

        async def one(request: ChatRequest) -> Union[ChatReply, RequestFailed]:
            try:
                return await client.complete(request)
            except RequestFailed as failed:
                return failed

        return dict(zip(requests, await asyncio.gather(*(unless_refused(one(r)) for r in requests.values()))))


def paid_rows(table: pa.Table, refused: set[int]) -> pa.Table:
    """The stage's output without the rows at `refused` (see the module's doc)."""
    if not refused:
        return table
    return table.filter(pa.array([i not in refused for i in range(table.num_rows)]))


def refused_rows(replies: dict) -> set[int]:
    """The keys of `replies` whose request the budget refused."""
    return {i for i, reply in replies.items() if isinstance(reply, RequestFailed) and reply.reason == BUDGET_REFUSED}


def reply_columns(prefix: str, rows: int, replies: dict[int, Union[ChatReply, RequestFailed]],
                  unasked_status: str = "not_asked") -> dict[str, pa.Array]:
    """`{prefix}_response`, `_finish_reason`, `_prompt_tokens`, `_completion_tokens`, `_status`, `_error` for
    `rows` rows, from the replies by row index; a row with no request gets `unasked_status`."""
    columns = {name: [] for name in ("response", "finish_reason", "prompt_tokens", "completion_tokens", "status",
                                     "error")}
    for i in range(rows):
        reply = replies.get(i)
        if isinstance(reply, ChatReply):
            values = (reply.content, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens, "ok", None)
        elif isinstance(reply, RequestFailed):
            values = (None, None, 0, 0, reply.reason, str(reply))
        else:
            values = (None, None, 0, 0, unasked_status, None)
        for values_of, value in zip(columns.values(), values):
            values_of.append(value)
    types = {"prompt_tokens": pa.int32(), "completion_tokens": pa.int32()}
    return {f"{prefix}_{name}": pa.array(values, types.get(name, pa.string())) for name, values in columns.items()}


# An endpoint actor waits on the network; a small CPU share keeps it from taking a core that the
# read, repartition and write tasks of the same streaming job need on a laptop.
ENDPOINT_ACTOR_CPUS = 0.25


def endpoint_stage_options(scoring: ScoringConfig) -> dict:
    """`map_batches` options of an endpoint stage: rows per batch, actors, batches in flight per actor."""
    import ray.data

    return {"batch_size": scoring.batch_size, "batch_format": "pyarrow", "num_cpus": ENDPOINT_ACTOR_CPUS,
            "compute": ray.data.ActorPoolStrategy(
                size=scoring.actors_per_stage,
                max_tasks_in_flight_per_actor=scoring.batches_in_flight_per_actor,
                max_concurrent_calls_per_actor=scoring.batches_in_flight_per_actor)}
