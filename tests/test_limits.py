"""The pacing, budget and usage arithmetic, with a made-up clock (no I/O, no Ray)."""
import pytest

from pipeline.config import PriceConfig
from pipeline.llm.limits import BOOK_AHEAD_S, BudgetExceeded, EndpointLimits, RunLimits


def max_in_any_minute(starts_and_tokens):
    """Largest (requests, tokens) that fall in any window [t, t+60): what a strict server counts."""
    events = sorted(starts_and_tokens)
    best_requests = best_tokens = 0
    for i, (t0, _) in enumerate(events):
        inside = [tok for t, tok in events[i:] if t < t0 + 60]
        best_requests, best_tokens = max(best_requests, len(inside)), max(best_tokens, sum(inside))
    return best_requests, best_tokens


def book(limits: EndpointLimits, now: float, tokens: int, max_completion: int):
    """What a client does: ask, and when told to wait, ask again shortly before the time given."""
    while True:
        reservation = limits.reserve(now, tokens, max_completion)
        if reservation.booked:
            return reservation, max(now, reservation.start)
        now = reservation.start - BOOK_AHEAD_S


def test_requests_never_pass_the_rpm_in_any_minute_and_use_nearly_all_of_it():
    limits = EndpointLimits(requests_per_minute=120, tokens_per_minute=10**9)
    now, starts = 0.0, []
    for _ in range(600):
        reservation, now = book(limits, now, 10, 5)
        starts.append((reservation.start, 10))
    requests, _ = max_in_any_minute(starts)
    assert requests == 120                                     # a fresh minute is used at once, never more
    first_minute = sum(1 for t, _ in starts if t < starts[0][0] + 60)
    later_rate = (len(starts) - first_minute) / (starts[-1][0] - starts[0][0]) * 60
    assert later_rate >= 0.97 * 120


def test_tokens_never_pass_the_tpm_and_unused_tokens_are_handed_back():
    limits = EndpointLimits(requests_per_minute=10**6, tokens_per_minute=6000)
    now, events = 0.0, []
    for _ in range(200):
        reservation, now = book(limits, now, 300, 200)
        limits.settle(reservation, "judge", prompt_tokens=80, completion_tokens=70, ok=True)   # used 150 of 300
        events.append((reservation.start, 150))
    _, tokens = max_in_any_minute(events)
    assert 0.97 * 6000 <= tokens <= 6000   # the refund lets the real usage, not the estimate, fill the minute


def test_booking_times_that_do_not_round_trip_in_floating_point_still_move_on():
    limits = EndpointLimits(requests_per_minute=2, tokens_per_minute=10**9)
    now = 103.89100470071521            # (now + 61) - 61 < now: a window edge that never compares equal
    first, now = book(limits, now, 1, 1)
    second, now = book(limits, now, 1, 1)
    third, _ = book(limits, now, 1, 1)
    assert third.start == pytest.approx(first.start + 61.0)


def test_a_pause_holds_every_request_until_it_ends():
    limits = EndpointLimits(requests_per_minute=6000, tokens_per_minute=10**9)
    limits.pause_until(30.0)
    early = limits.reserve(now=1.0, tokens=1, max_completion_tokens=1)
    assert not early.booked and early.start == 30.0
    assert book(limits, 1.0, 1, 1)[0].start == 30.0


def test_usage_and_cost_are_summed_per_stage():
    limits = RunLimits()
    limits.add_endpoint("t", 100, 10**6, PriceConfig(input_per_million_usd=2.0, output_per_million_usd=8.0))
    for stage, prompt, completion in (("judge", 1000, 100), ("judge", 500, 50), ("respond", 2000, 1000)):
        reservation = limits.reserve("t", 0.0, prompt + 500, 500)
        limits.settle("t", reservation, stage, prompt, completion, ok=True)
    failed = limits.reserve("t", 0.0, 100, 50)
    limits.settle("t", failed, "judge", 0, 0, ok=False, rate_limited=True)
    usage = limits.usage_by_stage()
    assert usage["judge"]["prompt_tokens"] == 1500 and usage["judge"]["completion_tokens"] == 150
    assert usage["judge"]["requests"] == 3 and usage["judge"]["failed_requests"] == 1
    assert usage["judge"]["rate_limited"] == 1
    assert usage["judge"]["cost_usd"] == pytest.approx((1500 * 2 + 150 * 8) / 1e6)
    assert limits.spent_usd == pytest.approx((3500 * 2 + 1150 * 8) / 1e6)


def test_the_budget_refuses_a_request_whose_worst_case_would_pass_the_cap():
    price = PriceConfig(input_per_million_usd=1_000_000.0, output_per_million_usd=1_000_000.0)   # $1 a token
    limits = RunLimits(max_cost_usd=10.0)
    limits.add_endpoint("teacher", 100, 10**6, price)
    limits.add_endpoint("judge", 100, 10**6, price)
    first = limits.reserve("teacher", 0.0, tokens=6, max_completion_tokens=3)      # worst case $6 in flight
    with pytest.raises(BudgetExceeded, match="max_cost_usd=.10.00"):
        limits.reserve("judge", 0.0, tokens=6, max_completion_tokens=3)           # 6 + 6 > 10, across endpoints
    limits.settle("teacher", first, "respond", prompt_tokens=2, completion_tokens=1, ok=True)   # spent $3
    limits.reserve("judge", 0.0, tokens=6, max_completion_tokens=3)               # 3 + 6 <= 10
    assert limits.spent_usd == pytest.approx(3.0)
