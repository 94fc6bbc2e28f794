"""Request and token rate limits per endpoint, the run's budget, and usage accounting: pure logic, no I/O.

The limits mirror how a paid API counts: a sliding window of the last minute, in which the requests and
the tokens sent may not pass the limit. Each request is booked at the earliest time the window has room
for it, so a client that starts requests at their booked times never makes the server answer 429, and
uses the whole allowance (a fresh minute at once, then as it frees). The client's window is one second
longer than the server's, a margin for the time a request takes to arrive.

A request's tokens are not known until it is answered: it is booked as prompt estimate + max_tokens and
corrected to the usage the server reports. Requests are booked at most a moment ahead of their start,
so the corrections of finished requests free room for the next ones; a request that cannot start soon
is told when to ask again. A 429 or exhausted rate-limit headers pause every request of the endpoint
until the time the server gives.

The budget is the run's, across all its endpoints: a request is refused when its worst-case cost, added
to what was spent and what is in flight, would pass max_cost_usd.

The same object runs in-process (one worker) or inside a named Ray actor (a whole cluster); callers
pass `now` so it can be tested with a made-up clock.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from pipeline.config import PriceConfig

WINDOW_S = 61.0          # the server's minute, plus a second for a request to reach it
BOOK_AHEAD_S = 1.0       # a request is booked at most this long before it may start


class BudgetExceeded(RuntimeError):
    """Sending the next request could take the run's API cost past max_cost_usd."""


def cost_usd(price: PriceConfig, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.input_per_million_usd + completion_tokens * price.output_per_million_usd) / 1e6


@dataclass
class Usage:
    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0          # 429 answers received

    def add(self, other: "Usage") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Reservation:
    """A request's place in the window: its start time and what it was charged before its usage was known.

    `booked` is False when the request could not start within BOOK_AHEAD_S: nothing was charged, and the
    caller asks again shortly before `start`.
    """

    start: float
    tokens: int
    worst_cost_usd: float
    booked: bool = True
    event_id: int = -1


@dataclass
class EndpointLimits:
    requests_per_minute: int
    tokens_per_minute: int
    price: PriceConfig = field(default_factory=PriceConfig)
    usage_by_stage: dict[str, Usage] = field(default_factory=dict)
    _events: deque = field(default_factory=deque)      # [start, tokens, id] of booked requests, by start
    _by_id: dict = field(default_factory=dict)
    _tokens_in_window: int = 0
    _next_id: int = 0
    _last_start: float = float("-inf")
    _paused_until: float = float("-inf")

    def _forget_before(self, time: float) -> None:
        while self._events and self._events[0][0] <= time - WINDOW_S:
            _, tokens, event_id = self._events.popleft()
            self._tokens_in_window -= tokens
            del self._by_id[event_id]

    def earliest_start(self, now: float, tokens: int) -> float:
        """The first time at or after `now` (and every earlier booking) with room for `tokens` more."""
        # Bookings are made in time order and `now` only grows, so older requests are out of every window to come.
        self._forget_before(max(now, self._last_start))
        start = max(now, self._last_start, self._paused_until)
        count, total = len(self._events), self._tokens_in_window
        index = 0
        while index < len(self._events) and self._events[index][0] <= start - WINDOW_S:
            count, total, index = count - 1, total - self._events[index][1], index + 1
        while (count + 1 > self.requests_per_minute or total + tokens > self.tokens_per_minute) and count:
            # Wait for the oldest booking in the window to leave it, with any others that leave at once.
            # (Counted by position: `time + WINDOW_S - WINDOW_S` need not equal `time` in floating point.)
            leaves_at = self._events[index][0]
            start = leaves_at + WINDOW_S
            while index < len(self._events) and self._events[index][0] <= leaves_at:
                count, total, index = count - 1, total - self._events[index][1], index + 1
        # With nothing left in the window a request bigger than the whole minute still goes, alone.
        return start

    def reserve(self, now: float, tokens: int, max_completion_tokens: int) -> Reservation:
        """Books a request of `tokens` (estimate) if it can start within BOOK_AHEAD_S."""
        worst = cost_usd(self.price, tokens - max_completion_tokens, max_completion_tokens)
        start = self.earliest_start(now, tokens)
        if start - now > BOOK_AHEAD_S:
            return Reservation(start, 0, 0.0, booked=False)
        event_id, self._next_id = self._next_id, self._next_id + 1
        event = [start, tokens, event_id]
        self._events.append(event)
        self._by_id[event_id] = event
        self._tokens_in_window += tokens
        self._last_start = start
        return Reservation(start, tokens, worst, True, event_id)

    def settle(self, reservation: Reservation, stage: str, prompt_tokens: int, completion_tokens: int,
               ok: bool, rate_limited: bool = False) -> None:
        """Replaces a booking's estimate by what the request really used (0 tokens when it failed unanswered)."""
        used = prompt_tokens + completion_tokens
        event = self._by_id.get(reservation.event_id)
        if event is not None:
            self._tokens_in_window += used - event[1]
            event[1] = used
        usage = self.usage_by_stage.setdefault(stage, Usage())
        usage.requests += 1
        usage.failed_requests += 0 if ok else 1
        usage.rate_limited += 1 if rate_limited else 0
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.cost_usd += cost_usd(self.price, prompt_tokens, completion_tokens)

    def pause_until(self, until: float) -> None:
        """Holds every request not yet booked until `until` (a 429's Retry-After, or exhausted headers)."""
        self._paused_until = max(self._paused_until, until)


@dataclass
class RunLimits:
    """Every endpoint of a run, by name, under one budget."""

    max_cost_usd: Optional[float] = None
    endpoints: dict[str, EndpointLimits] = field(default_factory=dict)
    _in_flight_cost: float = 0.0
    refusal: Optional[str] = None       # why the budget refused a request, once it has

    def add_endpoint(self, name: str, requests_per_minute: int, tokens_per_minute: int, price: PriceConfig) -> None:
        if name not in self.endpoints:
            self.endpoints[name] = EndpointLimits(requests_per_minute, tokens_per_minute, price)

    def reserve(self, endpoint: str, now: float, tokens: int, max_completion_tokens: int) -> Reservation:
        """Raises BudgetExceeded rather than book a request that could pass the budget."""
        limits = self.endpoints[endpoint]
        worst = cost_usd(limits.price, tokens - max_completion_tokens, max_completion_tokens)
        if self.max_cost_usd is not None and self.spent_usd + self._in_flight_cost + worst > self.max_cost_usd:
            self.refusal = (f"the next request could cost up to ${worst:.4f}; with ${self.spent_usd:.4f} spent and "
                            f"${self._in_flight_cost:.4f} in flight it would pass max_cost_usd=${self.max_cost_usd:.2f}")
            raise BudgetExceeded(self.refusal)
        reservation = limits.reserve(now, tokens, max_completion_tokens)
        self._in_flight_cost += reservation.worst_cost_usd
        return reservation

    def settle(self, endpoint: str, reservation: Reservation, stage: str, prompt_tokens: int,
               completion_tokens: int, ok: bool, rate_limited: bool = False) -> None:
        self._in_flight_cost -= reservation.worst_cost_usd
        self.endpoints[endpoint].settle(reservation, stage, prompt_tokens, completion_tokens, ok, rate_limited)

    def pause_until(self, endpoint: str, until: float) -> None:
        self.endpoints[endpoint].pause_until(until)

    @property
    def spent_usd(self) -> float:
        return sum(u.cost_usd for e in self.endpoints.values() for u in e.usage_by_stage.values())

    def usage_by_stage(self) -> dict[str, dict]:
        """Usage summed over endpoints, per stage, as plain dicts (for manifests and summaries)."""
        totals: dict[str, Usage] = {}
        for limits in self.endpoints.values():
            for stage, usage in limits.usage_by_stage.items():
                totals.setdefault(stage, Usage()).add(usage)
        return {stage: usage.as_dict() for stage, usage in totals.items()}
