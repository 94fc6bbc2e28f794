"""Where a run's limits live: in this process, or in one named Ray actor that every worker leases from.

Both give the client the same async interface. The actor answers with a delay relative to its own clock,
so workers on other nodes need no synchronised clocks. A worker process sends its leases, settles and pauses to
the actor in batches, one actor call in flight at a time (see _Batcher): one call per request held one actor near
1,000 leases a second on 2 cores, with the latency of a lease growing with the callers (docs/benchmarks.md).
"""
from __future__ import annotations

import asyncio
import random
import time
import weakref
from typing import Awaitable, Callable, Optional, Protocol

from pipeline.config import EndpointConfig
from pipeline.llm.limits import BOOK_AHEAD_S, Outcome, Reservation, RunLimits
from pipeline.llm.spend import SpendRecord


def endpoint_key(endpoint: EndpointConfig) -> str:
    """Endpoints that share a URL and model share their limits (a judge that is the teacher, say)."""
    return f"{endpoint.base_url or 'local'}|{endpoint.served_model}"


async def _lease(try_reserve: Callable[[], Awaitable[tuple[float, Reservation]]]) -> Reservation:
    """Asks for a booking until one is made, then waits for its start. `try_reserve` gives (delay, reservation)."""
    while True:
        delay, reservation = await try_reserve()
        if reservation.booked:
            await asyncio.sleep(max(0.0, delay))
            return reservation
        # Spread the callers that wait for the same moment, so they do not all ask at once.
        await asyncio.sleep(max(0.01, delay - BOOK_AHEAD_S) + random.uniform(0, BOOK_AHEAD_S / 2))


class Limits(Protocol):
    async def reserve(self, endpoint: str, prompt_tokens: int, max_completion_tokens: int) -> Reservation: ...
    async def settle(self, endpoint: str, reservation: Reservation, stage: str, outcome: Outcome,
                     prompt_tokens: int, completion_tokens: int) -> None: ...
    async def pause_for(self, endpoint: str, seconds: float) -> None: ...
    async def usage_by_stage(self) -> dict[str, dict]: ...
    async def record_spend(self) -> float: ...


class LocalLimits:
    """The limits of a run held in this process (one worker, or tests)."""

    def __init__(self, limits: RunLimits):
        self.limits = limits

    async def reserve(self, endpoint: str, prompt_tokens: int, max_completion_tokens: int) -> Reservation:
        async def attempt() -> tuple[float, Reservation]:
            now = time.monotonic()
            reservation = self.limits.reserve(endpoint, now, prompt_tokens, max_completion_tokens)
            return reservation.start - now, reservation
        return await _lease(attempt)

    async def settle(self, endpoint, reservation, stage, outcome, prompt_tokens, completion_tokens) -> None:
        self.limits.settle(endpoint, reservation, stage, outcome, prompt_tokens, completion_tokens)

    async def pause_for(self, endpoint: str, seconds: float) -> None:
        self.limits.pause_until(endpoint, time.monotonic() + seconds)

    async def usage_by_stage(self) -> dict[str, dict]:
        return self.limits.usage_by_stage()

    async def record_spend(self) -> float:
        return self.limits.flush()


class LimitsActor:
    """The body of the named Ray actor; created by `shared_limits`."""

    def __init__(self, max_cost_usd: Optional[float], record: Optional[SpendRecord] = None,
                 endpoints: Optional[dict[str, EndpointConfig]] = None):
        """A restarted actor runs this again with the same arguments: it comes back with the run's endpoints
        and, through `record`, with the spend recorded before it died (at worst, see spend.py)."""
        self.limits = _run_limits(max_cost_usd, record)
        for name, endpoint in (endpoints or {}).items():
            self.limits.add_endpoint(name, endpoint)

    def add_endpoint(self, name: str, endpoint: EndpointConfig) -> None:
        self.limits.add_endpoint(name, endpoint)

    def reserve(self, endpoint: str, prompt_tokens: int, max_completion_tokens: int) -> tuple[float, Reservation]:
        now = time.monotonic()
        reservation = self.limits.reserve(endpoint, now, prompt_tokens, max_completion_tokens)
        return reservation.start - now, reservation

    def settle(self, *args) -> None:
        self.limits.settle(*args)

    def pause_for(self, endpoint: str, seconds: float) -> None:
        self.limits.pause_until(endpoint, time.monotonic() + seconds)

    def usage_by_stage(self) -> dict[str, dict]:
        return self.limits.usage_by_stage()

    def record_spend(self) -> float:
        return self.limits.flush()

    def many(self, calls: list[tuple[str, tuple]]) -> list:
        """A worker's batch (see _Batcher), in its order: each call's result, or the exception it raised, so that one
        refused lease (the budget, a pause too long) fails its own request and not the batch's others."""
        results = []
        for method, args in calls:
            if method not in _BATCHED:
                raise ValueError(f"{method} is not a batched limits call")
            try:
                results.append(getattr(self, method)(*args))
            except Exception as err:          # handed back to the one caller that made this call
                results.append(err)
        return results

    def paused_until(self, endpoint: str) -> float:
        """Until when the endpoint is paused, on this node's monotonic clock (the same for every process)."""
        return self.limits.endpoints[endpoint].paused_until

    def refusal(self) -> Optional[str]:
        return self.limits.refusal


# How long a caller waits for a restarting limits actor before its call fails (a restart takes about a second;
# the actor lives on the driver's node, so a node that stays gone took the run down with it).
ACTOR_RESTART_WAIT_S = 60.0


# The calls a lease makes, batched; the others (usage, spend, refusal) are rare and go one by one.
_BATCHED = ("reserve", "settle", "pause_for")


async def _call_actor(actor, method: str, *args):
    """The actor's method; while the actor restarts, asked again (a settle or reservation then may be counted twice:
    more spend counted, never less)."""
    import ray

    waited = 0.0
    while True:
        try:
            return await getattr(actor, method).remote(*args)
        except ray.exceptions.ActorUnavailableError:
            if waited >= ACTOR_RESTART_WAIT_S:
                raise
            await asyncio.sleep(0.5)
            waited += 0.5


class _Batcher:
    """One event loop's calls to the limits actor, sent as a group commit: while one batch is at the actor, the calls
    made meanwhile wait, and all go in the next batch. An idle worker's call goes at once (no added wait); a busy one's
    many requests cost the actor one call, not one each, which is what bounded its leases a second."""

    def __init__(self, actor):
        self.actor = actor
        self.pending: list[tuple[str, tuple, asyncio.Future]] = []
        self.sender: Optional[asyncio.Task] = None

    async def call(self, method: str, *args):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((method, args, future))
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                results = await _call_actor(self.actor, "many", [(method, args) for method, args, _ in batch])
            except Exception as err:           # the actor call itself failed: every caller of the batch sees why
                results = [err] * len(batch)
            for (_, _, future), result in zip(batch, results):
                if future.done():              # its caller was cancelled
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class RayLimits:
    """A worker's handle on the run's LimitsActor. Picklable: Ray Data ships it to every actor; each process (and
    event loop) batches its own calls."""

    def __init__(self, actor):
        self.actor = actor
        self._batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        return {"actor": self.actor}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["actor"])

    async def _batched(self, method: str, *args):
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self.actor)
        return await batcher.call(method, *args)

    async def reserve(self, endpoint: str, prompt_tokens: int, max_completion_tokens: int) -> Reservation:
        return await _lease(lambda: self._batched("reserve", endpoint, prompt_tokens, max_completion_tokens))

    async def settle(self, endpoint, reservation, stage, outcome, prompt_tokens, completion_tokens) -> None:
        await self._batched("settle", endpoint, reservation, stage, outcome, prompt_tokens, completion_tokens)

    async def pause_for(self, endpoint: str, seconds: float) -> None:
        await self._batched("pause_for", endpoint, seconds)

    async def usage_by_stage(self) -> dict[str, dict]:
        return await _call_actor(self.actor, "usage_by_stage")

    async def record_spend(self) -> float:
        return await _call_actor(self.actor, "record_spend")

    def budget_refusal(self) -> Optional[str]:
        """Why the budget refused a request, if it has: a stage's failure is then the budget's doing (Ray Data
        does not carry the stage's own exception back to the driver, only its text)."""
        import ray

        return ray.get(self.actor.refusal.remote())


def shared_limits(run_name: str, endpoints: list[EndpointConfig], max_cost_usd: Optional[float],
                  namespace: str = "tapir", record: Optional[SpendRecord] = None) -> RayLimits:
    """The run's limits actor (created on first use, found by name afterwards) with its endpoints registered.
    `record`: where the run's spend is kept; the budget counts what it holds, and a restarted actor reads it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: losing another node must not take the run's spend and rate windows with it (a
    # restarted actor would start from zero), and the driver's own node going takes the run down anyway.
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor_class = ray.remote(num_cpus=0, max_restarts=-1)(LimitsActor)
    actor = actor_class.options(name=f"tapir-limits-{run_name}", namespace=namespace, get_if_exists=True,
                                scheduling_strategy=driver_node).remote(
        max_cost_usd, record, {endpoint_key(e): e for e in endpoints})
    # an actor found by name was created with another command's endpoints
    ray.get([actor.add_endpoint.remote(endpoint_key(e), e) for e in endpoints])
    return RayLimits(actor)


def local_limits(endpoints: list[EndpointConfig], max_cost_usd: Optional[float],
                 record: Optional[SpendRecord] = None) -> LocalLimits:
    limits = _run_limits(max_cost_usd, record)
    for e in endpoints:
        limits.add_endpoint(endpoint_key(e), e)
    return LocalLimits(limits)


def _run_limits(max_cost_usd: Optional[float], record: Optional[SpendRecord]) -> RunLimits:
    return RunLimits(max_cost_usd, record.spent_before() if record else 0.0, record)
