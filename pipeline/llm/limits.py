"""Request and token rate limits per endpoint, the run's budget, and usage accounting: pure logic, no I/O.

The limits are paced, not windowed: each request is given the earliest start time at which both the
requests-per-minute and the tokens-per-minute schedules have room for it (a generic cell rate
algorithm: a theoretical arrival time per limit, advanced by 60/limit per request or per token). A
client that starts requests at those times never exceeds either rate over any window, so the server
has no reason to answer 429, and the full rate is used because nothing is left idle.

The token cost of a request is not known until it is answered: it is reserved as prompt estimate +
max_tokens and corrected by the usage the server reports. A 429 or exhausted rate-limit headers pause
every request until the time the server gives.

The budget is the run's, across all its endpoints: a request is refused when its worst-case cost, added
to what was spent and what is in flight, would pass max_cost_usd.

The same object runs in-process (one worker) or inside a named Ray actor (a whole cluster); callers
pass `now` so it can be tested with a made-up clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipeline.config import PriceConfig

# Requests may start this far ahead of their paced time, so concurrent workers can start together. Pacing
# at limit × 60/(60 + burst) keeps every 60-second window at or under the limit even with that burst, so a
# server counting a strict sliding minute never sees more than it allows, and 98.4% of the limit is used.
# A request estimated at more than a second's worth of tokens goes when the bucket is full; since its real
# usage (what the server counts) is usually well under the estimate, the minute stays within the limit.
_BURST_S = 1.0
_WINDOW_S = 60.0


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
    """What one request was granted: its start time, and what it was charged before its usage was known."""

    start: float
    tokens: int
    worst_cost_usd: float


@dataclass
class EndpointLimits:
    requests_per_minute: int
    tokens_per_minute: int
    price: PriceConfig = field(default_factory=PriceConfig)
    _next_request_at: float = 0.0       # theoretical arrival time of the request schedule
    _next_token_at: float = 0.0         # ... of the token schedule
    _paused_until: float = 0.0
    usage_by_stage: dict[str, Usage] = field(default_factory=dict)

    def reserve(self, now: float, tokens: int, max_completion_tokens: int) -> Reservation:
        """Books a request of `tokens` (estimate) and returns when it may start."""
        worst = cost_usd(self.price, tokens - max_completion_tokens, max_completion_tokens)
        request_interval = (_WINDOW_S + _BURST_S) / self.requests_per_minute
        token_interval = (_WINDOW_S + _BURST_S) / self.tokens_per_minute
        # A token bucket in time units: the request fits once the schedule, with its own cost added, is no
        # more than the burst ahead of now. Its capacity, limit × burst/(60 + burst), plus 60 s of refill at
        # limit × 60/(60 + burst), is exactly the limit: no 60-second window ever holds more. A request
        # bigger than the bucket waits for it to be full rather than forever.
        start = max(now, self._paused_until,
                    self._next_request_at + min(request_interval - _BURST_S, 0.0),
                    self._next_token_at + min(tokens * token_interval - _BURST_S, 0.0))
        self._next_request_at = max(self._next_request_at, start) + request_interval
        self._next_token_at = max(self._next_token_at, start) + tokens * token_interval
        return Reservation(start, tokens, worst)

    def settle(self, reservation: Reservation, stage: str, prompt_tokens: int, completion_tokens: int,
               ok: bool, rate_limited: bool = False) -> None:
        """Replaces a reservation by what the request really used (0 tokens when it failed unanswered)."""
        used = prompt_tokens + completion_tokens
        # Tokens reserved but not used are handed back to the schedule (or, if more were used, taken).
        self._next_token_at -= (reservation.tokens - used) * (_WINDOW_S + _BURST_S) / self.tokens_per_minute
        usage = self.usage_by_stage.setdefault(stage, Usage())
        usage.requests += 1
        usage.failed_requests += 0 if ok else 1
        usage.rate_limited += 1 if rate_limited else 0
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.cost_usd += cost_usd(self.price, prompt_tokens, completion_tokens)

    def pause_until(self, until: float) -> None:
        """Holds every request until `until` (a 429's Retry-After, or exhausted rate-limit headers)."""
        self._paused_until = max(self._paused_until, until)
        # Requests paced before the pause would all fire at its end: restart the schedules from there.
        self._next_request_at = max(self._next_request_at, until)
        self._next_token_at = max(self._next_token_at, until)


@dataclass
class RunLimits:
    """Every endpoint of a run, by name, under one budget."""

    max_cost_usd: Optional[float] = None
    endpoints: dict[str, EndpointLimits] = field(default_factory=dict)
    _in_flight_cost: float = 0.0

    def add_endpoint(self, name: str, requests_per_minute: int, tokens_per_minute: int, price: PriceConfig) -> None:
        if name not in self.endpoints:
            self.endpoints[name] = EndpointLimits(requests_per_minute, tokens_per_minute, price)

    def reserve(self, endpoint: str, now: float, tokens: int, max_completion_tokens: int) -> Reservation:
        """Raises BudgetExceeded rather than book a request that could pass the budget."""
        limits = self.endpoints[endpoint]
        worst = cost_usd(limits.price, tokens - max_completion_tokens, max_completion_tokens)
        if self.max_cost_usd is not None and self.spent_usd + self._in_flight_cost + worst > self.max_cost_usd:
            raise BudgetExceeded(
                f"the next request could cost up to ${worst:.4f}; with ${self.spent_usd:.4f} spent and "
                f"${self._in_flight_cost:.4f} in flight it would pass max_cost_usd=${self.max_cost_usd:.2f}")
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
