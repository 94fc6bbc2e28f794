"""Request and token rate limits per endpoint, the run's budget, and usage accounting: pure logic, no I/O.

The limits mirror how a paid API counts: a sliding window of the last minute, in which the requests and
the tokens sent may not pass the limit. Each request is booked at the earliest time the window has room
for it, up to BOOK_AHEAD_S before it starts, so a client that starts requests at their booked times never
makes such a server answer 429 and uses the whole allowance (a fresh minute at once, then as it frees). The
client's window is one second longer than the server's, a margin for the time a request takes to arrive.

What a request holds of the minute's tokens follows the endpoint's `tokens_counted_as`: 'requested' (OpenAI's
rule) books the larger of max_tokens and the prompt's estimate and keeps it for the minute, answered or not;
'used' books prompt estimate + max_tokens and shrinks it to the usage the server reports. A request that was
rejected or failed still counts as one of the minute's requests, as OpenAI counts it; one that never reached
the server (connection refused) counts for nothing.

A server may enforce a per-minute limit in shorter slices (OpenAI: "60,000 requests/minute may be enforced as
1,000 requests/second"), and counts the requests it rejects. So a fresh minute is not sent at once but in a
slow start: a minute's limit / 60 in the first SLICE_S, twice as much in each slice after, until the whole
minute is in use (log2(60): 6 slices). A 429 means the server counts otherwise than the books, since every
request was sent at a time they had room for it: from the first one on, the endpoint is paced, no more than a
minute's limit / 60 in any SLICE_S (requests and tokens). Against a plain sliding minute no 429 comes, and the
minute is in full use after 6 s; against slices, the slow start draws a few 429s, not a minute's worth.

A 429 or exhausted rate-limit headers pause every request of the endpoint until the time the server gives;
a pause longer than the endpoint's max_pause_s refuses the requests instead (PausedTooLong). After
max_connection_failures consecutive connection failures the endpoint refuses every request (EndpointDown).

The budget is the run's, across all its endpoints and all the commands run on its directory: a request is
refused when its worst-case cost, added to what was spent before (`spent_before_usd`), what was spent since
and what is in flight, would pass max_cost_usd. A request whose usage is unknown (no `usage` in the reply, a
timeout, a reset, a cut-off body) is counted at its worst case. `record` is told the settled spend and a
bound the spend cannot have passed (what is settled, what is in flight at its worst, and RECORD_AHEAD of the cap
more) before a request could take the spend past the last bound told, and the exact spend whenever nothing is in
flight: the caller persists it, so a run killed with SIGKILL restarts from an amount it cannot have passed.

The same object runs in-process (one worker) or inside a named Ray actor (a whole cluster); callers
pass `now` so it can be tested with a made-up clock.
"""
from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional

from pipeline.config import EndpointConfig, PriceConfig
from pipeline.errors import UserError

WINDOW_S = 61.0          # the server's minute, plus a second for a request to reach it
BOOK_AHEAD_S = 1.0       # a request is booked at most this long before it may start
SLICE_S = 1.05           # a paced endpoint's slice: a second, plus a margin for arrival jitter
RECORD_AHEAD = 0.01      # share of the cap (without one, of the spend) the spend record is written ahead by
RECORD_AHEAD_MIN_USD = 0.01     # and without a cap at least this

# How an attempt ended, for the books: 'ok' answered with usage; 'estimated' answered without usage;
# 'unknown' given up on or cut off (timeout, reset, truncated body: the server may have billed it);
# 'rate_limited' a 429; 'failed' any other answer the server does not bill; 'unreached' never connected.
Outcome = Literal["ok", "estimated", "unknown", "rate_limited", "failed", "unreached"]


class BudgetExceeded(UserError, RuntimeError):
    """Sending the next request could take the run's API cost past max_cost_usd."""


class PausedTooLong(RuntimeError):
    """The server asked for a pause longer than the endpoint's max_pause_s."""


class EndpointDown(RuntimeError):
    """Too many consecutive connection failures: the endpoint is not reachable."""


def cost_usd(price: PriceConfig, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.input_per_million_usd + completion_tokens * price.output_per_million_usd) / 1e6


@dataclass
class Usage:
    requests: int = 0              # attempts that reached the server
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0          # 429 answers received
    usage_estimated: int = 0       # attempts costed at their worst case: no usage reported, or none known
    unreached: int = 0             # attempts that never connected (not billed, not counted by the server)

    def add(self, other: "Usage") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Reservation:
    """A request's place in the window: its start time, the tokens it holds there and its worst-case cost.

    `booked` is False when the request could not start within BOOK_AHEAD_S: nothing was charged, and the
    caller asks again shortly before `start`.
    """

    start: float
    tokens: int
    worst_cost_usd: float
    booked: bool = True
    event_id: int = -1
    issuer: str = ""           # the RunLimits that booked it: a restarted limits actor is another one


def _earliest(events: deque, start: float, window: float, requests: int, tokens: int, total: int,
              need: int) -> float:
    """The first time at or after `start` at which `events` ([start, tokens, …], by start) leave room in a
    `window` for one more request of `need` tokens; `total` is the tokens of all `events`."""
    count, index = len(events), 0
    while index < len(events) and events[index][0] <= start - window:
        count, total, index = count - 1, total - events[index][1], index + 1
    while (count + 1 > requests or total + need > tokens) and count:
        # Wait for the oldest booking in the window to leave it, with any others that leave at once.
        # (Counted by position: `time + window - window` need not equal `time` in floating point.)
        leaves_at = events[index][0]
        start = leaves_at + window
        while index < len(events) and events[index][0] <= leaves_at:
            count, total, index = count - 1, total - events[index][1], index + 1
    # With nothing left in the window a request bigger than the whole limit still goes, alone.
    return start


@dataclass
class EndpointLimits:
    requests_per_minute: int
    tokens_per_minute: int
    price: PriceConfig = field(default_factory=PriceConfig)
    tokens_counted_as: Literal["requested", "used"] = "requested"
    max_pause_s: float = float("inf")
    max_connection_failures: Optional[int] = None
    usage_by_stage: dict[str, Usage] = field(default_factory=dict)
    paced: bool = False                                  # set by the first 429: see the module's doc
    _first_start: float = float("inf")                   # of the first request booked: the slow start's origin
    connection_failures: int = 0                         # consecutive, across every worker
    _events: deque = field(default_factory=deque)      # [start, tokens, id] of booked requests, by start
    _by_id: dict = field(default_factory=dict)
    _tokens_in_window: int = 0
    _next_id: int = 0
    _last_start: float = float("-inf")
    _paused_until: float = float("-inf")

    @classmethod
    def of(cls, endpoint: EndpointConfig) -> "EndpointLimits":
        return cls(endpoint.requests_per_minute, endpoint.tokens_per_minute, endpoint.price,
                   endpoint.tokens_counted_as, endpoint.max_pause_s, endpoint.max_connection_failures)

    def booked_tokens(self, prompt_tokens: int, max_completion_tokens: int) -> int:
        """What a request holds of the minute's tokens until it is answered (see the module's doc)."""
        if self.tokens_counted_as == "requested":
            return max(prompt_tokens, max_completion_tokens)
        return prompt_tokens + max_completion_tokens

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def _forget_before(self, time: float) -> None:
        while self._events and self._events[0][0] <= time - WINDOW_S:
            _, tokens, event_id = self._events.popleft()
            self._tokens_in_window -= tokens
            self._by_id.pop(event_id, None)

    def earliest_start(self, now: float, tokens: int) -> float:
        """The first time at or after `now` (and every earlier booking) with room for `tokens` more."""
        # Bookings are made in time order and `now` only grows, so older requests are out of every window to come.
        self._forget_before(max(now, self._last_start))
        start = max(now, self._last_start, self._paused_until)
        while True:
            start = _earliest(self._events, start, WINDOW_S, self.requests_per_minute, self.tokens_per_minute,
                              self._tokens_in_window, tokens)
            if (in_slice := self._slice_limits(start)) is None:
                return start
            # from the newest back (bookings are in start order): a paced endpoint asks this of every request, and
            # scanning the whole minute's bookings each time capped the limits actor's leases a second
            recent = deque()
            for event in reversed(self._events):
                if event[0] <= start - 2 * SLICE_S:
                    break
                recent.appendleft(event)
            sliced = _earliest(recent, start, SLICE_S, *in_slice, sum(e[1] for e in recent), tokens)
            if sliced == start:
                return start
            start = sliced         # later in time: the minute can only have more room, but check it again

    def _slice_limits(self, start: float) -> Optional[tuple[int, int]]:
        """The most requests and tokens that may start in a SLICE_S at `start` (the module's doc says why), or
        None when the minute is the only bound."""
        doublings = 0 if self.paced else min(30, int(max(0.0, start - self._first_start) / SLICE_S))
        requests = max(1, self.requests_per_minute // 60) << doublings
        if requests >= self.requests_per_minute:
            return None
        return requests, max(1, self.tokens_per_minute // 60) << doublings

    def reserve(self, now: float, prompt_tokens: int, max_completion_tokens: int) -> Reservation:
        """Books a request (prompt estimate, max_tokens) if it can start within BOOK_AHEAD_S."""
        if self.max_connection_failures is not None and self.connection_failures >= self.max_connection_failures:
            raise EndpointDown(f"{self.connection_failures} consecutive connection failures")
        if self._paused_until - now > self.max_pause_s:
            raise PausedTooLong(f"the server asked for a pause of {self._paused_until - now:.0f} s, longer than "
                                f"max_pause_s={self.max_pause_s:g}")
        worst = cost_usd(self.price, prompt_tokens, max_completion_tokens)
        tokens = self.booked_tokens(prompt_tokens, max_completion_tokens)
        start = self.earliest_start(now, tokens)
        if start - now > BOOK_AHEAD_S:
            return Reservation(start, 0, 0.0, booked=False)
        event_id, self._next_id = self._next_id, self._next_id + 1
        event = [start, tokens, event_id]
        self._events.append(event)
        self._by_id[event_id] = event
        self._tokens_in_window += tokens
        self._last_start = start
        self._first_start = min(self._first_start, start)
        return Reservation(start, tokens, worst, True, event_id)

    def settle(self, reservation: Reservation, stage: str, outcome: Outcome, prompt_tokens: int,
               completion_tokens: int) -> float:
        """Books how an attempt ended; `prompt_tokens` and `completion_tokens` are what it is billed for (the
        worst case when its usage is unknown). Returns its cost."""
        event = self._by_id.get(reservation.event_id)
        if event is not None and (outcome == "unreached" or self.tokens_counted_as == "used"):
            used = 0 if outcome in ("unreached", "rate_limited", "failed") else prompt_tokens + completion_tokens
            self._tokens_in_window += used - event[1]
            event[1] = used
            if outcome == "unreached":       # the server never saw it: it is not one of the minute's requests
                self._events.remove(event)
                del self._by_id[event[2]]
        self.connection_failures = self.connection_failures + 1 if outcome == "unreached" else 0
        self.paced = self.paced or outcome == "rate_limited"
        usage = self.usage_by_stage.setdefault(stage, Usage())
        if outcome == "unreached":
            usage.unreached += 1
            return 0.0
        cost = cost_usd(self.price, prompt_tokens, completion_tokens)
        usage.requests += 1
        usage.failed_requests += outcome not in ("ok", "estimated")
        usage.rate_limited += outcome == "rate_limited"
        usage.usage_estimated += outcome in ("estimated", "unknown")
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.cost_usd += cost
        return cost

    def pause_until(self, until: float) -> None:
        """Holds every request not yet booked until `until` (a 429's Retry-After, or exhausted headers)."""
        self._paused_until = max(self._paused_until, until)


@dataclass
class RunLimits:
    """Every endpoint of a run, by name, under one budget."""

    max_cost_usd: Optional[float] = None
    spent_before_usd: float = 0.0       # by earlier commands on the run's directory, worst case
    record: Optional[Callable[[float, float], None]] = None     # (spent, a bound it cannot have passed)
    endpoints: dict[str, EndpointLimits] = field(default_factory=dict)
    _in_flight_cost: float = 0.0
    _in_flight: int = 0
    _recorded_usd: float = float("-inf")
    refusal: Optional[str] = None       # why the budget refused a request, once it has
    issuer: str = field(default_factory=lambda: uuid.uuid4().hex)

    def add_endpoint(self, name: str, endpoint: EndpointConfig) -> None:
        if name not in self.endpoints:
            self.endpoints[name] = EndpointLimits.of(endpoint)

    def reserve(self, endpoint: str, now: float, prompt_tokens: int, max_completion_tokens: int) -> Reservation:
        """Raises BudgetExceeded rather than book a request that could pass the budget."""
        limits = self.endpoints[endpoint]
        worst = cost_usd(limits.price, prompt_tokens, max_completion_tokens)
        committed = self.total_spent_usd + self._in_flight_cost
        if self.max_cost_usd is not None and committed + worst > self.max_cost_usd:
            self.refusal = (f"the next request could cost up to ${worst:.4f}; with ${self.total_spent_usd:.4f} "
                            f"spent (${self.spent_before_usd:.4f} of it by earlier commands) and "
                            f"${self._in_flight_cost:.4f} in flight it would pass "
                            f"max_cost_usd=${self.max_cost_usd:.2f}")
            raise BudgetExceeded(self.refusal)
        reservation = replace(limits.reserve(now, prompt_tokens, max_completion_tokens), issuer=self.issuer)
        if reservation.booked:
            self._in_flight_cost += reservation.worst_cost_usd
            self._in_flight += 1
            self._record_if_grown()
        return reservation

    def settle(self, endpoint: str, reservation: Reservation, stage: str, outcome: Outcome, prompt_tokens: int,
               completion_tokens: int) -> None:
        if reservation.issuer != self.issuer:
            # booked by this actor before it was restarted: its cost is counted below, on top of the bound the
            # record held for it in flight (counted twice rather than never), and its place in the window is gone
            reservation = replace(reservation, event_id=-1)
        else:
            self._in_flight -= 1
            # exactly 0 when idle, not what is left of subtracting the costs one by one in floating point
            self._in_flight_cost = self._in_flight_cost - reservation.worst_cost_usd if self._in_flight else 0.0
        self.endpoints[endpoint].settle(reservation, stage, outcome, prompt_tokens, completion_tokens)
        if not self._in_flight and self.record is not None:
            self.flush()                # idle: the record becomes exact
        else:
            self._record_if_grown()     # a reply may cost more than its estimate said

    def _record_if_grown(self) -> None:
        """Records an upper bound of the spend before it is passed: what is committed (spent + in flight at
        worst) and RECORD_AHEAD of the cap beyond it, never past the cap (without a cap, RECORD_AHEAD of the spend
        or RECORD_AHEAD_MIN_USD). One write per RECORD_AHEAD of growth rather than one per request: on object
        storage each is an upload."""
        committed = self.total_spent_usd + self._in_flight_cost
        if self.record is not None and committed > self._recorded_usd:
            if self.max_cost_usd is None:
                self._recorded_usd = committed + max(RECORD_AHEAD * committed, RECORD_AHEAD_MIN_USD)
            else:
                self._recorded_usd = min(committed + RECORD_AHEAD * self.max_cost_usd, self.max_cost_usd)
            self.record(self.total_spent_usd, self._recorded_usd)

    def flush(self) -> float:
        """Records the spend as it is now (exact when nothing is in flight); returns the run's total."""
        if self.record is not None:
            self._recorded_usd = self.total_spent_usd + self._in_flight_cost
            self.record(self.total_spent_usd, self._recorded_usd)
        return self.total_spent_usd

    def pause_until(self, endpoint: str, until: float) -> None:
        self.endpoints[endpoint].pause_until(until)

    @property
    def spent_usd(self) -> float:
        """Spent by this command."""
        return sum(u.cost_usd for e in self.endpoints.values() for u in e.usage_by_stage.values())

    @property
    def total_spent_usd(self) -> float:
        return self.spent_before_usd + self.spent_usd

    def usage_by_stage(self) -> dict[str, dict]:
        """Usage summed over endpoints, per stage, as plain dicts (for manifests and summaries)."""
        totals: dict[str, Usage] = {}
        for limits in self.endpoints.values():
            for stage, usage in limits.usage_by_stage.items():
                totals.setdefault(stage, Usage()).add(usage)
        return {stage: usage.as_dict() for stage, usage in totals.items()}
