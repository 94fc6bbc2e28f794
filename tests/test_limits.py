"""The pacing, budget and usage arithmetic, with a made-up clock (no I/O, no Ray)."""
import pytest

from pipeline.config import EndpointConfig, PriceConfig
from pipeline.llm.limits import BOOK_AHEAD_S, BudgetExceeded, EndpointDown, EndpointLimits, PausedTooLong, RunLimits


def max_in_any_minute(starts_and_tokens):
    """Largest (requests, tokens) that fall in any window [t, t+60): what a strict server counts."""
    events = sorted(starts_and_tokens)
    best_requests = best_tokens = 0
    for i, (t0, _) in enumerate(events):
        inside = [tok for t, tok in events[i:] if t < t0 + 60]
        best_requests, best_tokens = max(best_requests, len(inside)), max(best_tokens, sum(inside))
    return best_requests, best_tokens


def book(limits: EndpointLimits, now: float, prompt: int, max_completion: int):
    """What a client does: ask, and when told to wait, ask again shortly before the time given."""
    while True:
        reservation = limits.reserve(now, prompt, max_completion)
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
    assert requests == 120                                     # a fresh minute is used within seconds, never more
    # the rate over whole windows: the schedule repeats every 61 s (each booking frees its place then)
    four_windows = sum(1 for t, _ in starts if t < starts[0][0] + 4 * 61)
    assert four_windows / (4 * 61) * 60 >= 0.97 * 120


def test_tokens_never_pass_the_tpm_and_unused_tokens_are_handed_back_where_the_server_counts_usage():
    limits = EndpointLimits(requests_per_minute=10**6, tokens_per_minute=6000, tokens_counted_as="used")
    now, events = 0.0, []
    for _ in range(200):
        reservation, now = book(limits, now, 100, 200)
        limits.settle(reservation, "judge", "ok", prompt_tokens=80, completion_tokens=70)   # used 150 of 300
        events.append((reservation.start, 150))
    _, tokens = max_in_any_minute(events)
    assert 0.97 * 6000 <= tokens <= 6000   # the refund lets the real usage, not the estimate, fill the minute


def test_where_the_server_holds_max_tokens_a_request_holds_them_for_the_minute_whatever_it_used():
    # OpenAI counts max(max_tokens, prompt estimate) and keeps it: 6000 / 500 = 12 requests a minute, however
    # little each one used. Shrinking the booking to the usage drew 63 429s in 427 attempts from such a server.
    limits = EndpointLimits(requests_per_minute=10**6, tokens_per_minute=6000, tokens_counted_as="requested")
    now, events = 0.0, []
    for _ in range(60):
        reservation, now = book(limits, now, 100, 500)
        assert reservation.tokens == 500
        limits.settle(reservation, "judge", "ok", prompt_tokens=80, completion_tokens=70)
        events.append((reservation.start, 500))
    assert max_in_any_minute(events) == (12, 6000)


def test_a_rejected_request_still_counts_toward_the_minute_and_one_that_never_connected_does_not():
    limits = EndpointLimits(requests_per_minute=2, tokens_per_minute=10**9)
    first, _ = book(limits, 0.0, 1, 1)
    refused, _ = book(limits, 0.0, 1, 1)
    limits.settle(refused, "t", "unreached", 0, 0)             # connection refused: the server never saw it
    rejected, _ = book(limits, 0.0, 1, 1)
    assert rejected.start == refused.start                     # so its place went to the next request
    limits.settle(rejected, "t", "rate_limited", 0, 0)         # a 429: the server counted it (OpenAI)
    assert book(limits, 0.0, 1, 1)[0].start == pytest.approx(first.start + 61.0)
    usage = limits.usage_by_stage["t"]
    assert (usage.requests, usage.rate_limited, usage.unreached) == (1, 1, 1)


def test_a_fresh_minute_starts_slowly_and_after_a_429_the_endpoint_is_paced_into_one_second_slices():
    limits = EndpointLimits(requests_per_minute=120, tokens_per_minute=10**9)
    now, starts = 0.0, []
    for _ in range(120):
        reservation, now = book(limits, now, 10, 5)
        starts.append(reservation.start)
    # 2, 4, 8, … a slice: a slicing server rejects a few, not a minute's worth; a sliding one has it all in 6 s
    assert sum(1 for t in starts if t < 1.0) == 2 and sum(1 for t in starts if t < 2 * 1.05) == 6
    assert starts[-1] < 6 * 1.05
    limits.settle(reservation, "t", "rate_limited", 0, 0)      # the server counts otherwise: slices
    assert limits.paced
    paced = []
    for _ in range(240):
        reservation, now = book(limits, now, 10, 5)
        paced.append(reservation.start)
    assert max(sum(1 for t in paced if t0 <= t < t0 + 1.0) for t0 in paced) <= 2     # 120 / 60 a second
    assert max_in_any_minute([(t, 1) for t in starts + paced])[0] <= 120
    steady = [t for t in paced if t >= paced[0] + 61]
    assert len(steady) / (steady[-1] - steady[0]) * 60 >= 0.9 * 120        # and still near the configured rate


def test_consecutive_connection_failures_stop_the_endpoint_and_any_answer_resets_the_count():
    limits = EndpointLimits(requests_per_minute=6000, tokens_per_minute=10**9, max_connection_failures=3)
    for outcome in ("unreached", "unreached", "failed", "unreached", "unreached"):
        limits.settle(book(limits, 0.0, 1, 1)[0], "t", outcome, 0, 0)
    limits.settle(book(limits, 0.0, 1, 1)[0], "t", "unreached", 0, 0)
    with pytest.raises(EndpointDown, match="3 consecutive connection failures"):
        limits.reserve(0.0, 1, 1)


def test_a_pause_longer_than_max_pause_refuses_requests_instead_of_holding_them():
    limits = EndpointLimits(requests_per_minute=6000, tokens_per_minute=10**9, max_pause_s=300)
    limits.pause_until(1.0 + 3600)                             # Retry-After: 3600
    with pytest.raises(PausedTooLong, match="3600 s, longer than max_pause_s=300"):
        limits.reserve(1.0, 1, 1)
    limits.pause_until(4000.0 + 200)                           # an hour later, a short pause is waited out
    assert book(limits, 4000.0, 1, 1)[0].start == 4200.0


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
    early = limits.reserve(now=1.0, prompt_tokens=1, max_completion_tokens=1)
    assert not early.booked and early.start == 30.0
    assert book(limits, 1.0, 1, 1)[0].start == 30.0


def endpoint(rpm: int = 100, price: PriceConfig = PriceConfig()) -> EndpointConfig:
    return EndpointConfig(kind="remote", base_url="http://127.0.0.1:1/v1", model="m", requests_per_minute=rpm,
                          price=price)


def test_usage_and_cost_are_summed_per_stage():
    limits = RunLimits()
    limits.add_endpoint("t", endpoint(price=PriceConfig(input_per_million_usd=2.0, output_per_million_usd=8.0)))
    for stage, prompt, completion in (("judge", 1000, 100), ("judge", 500, 50), ("respond", 2000, 1000)):
        reservation = limits.reserve("t", 0.0, prompt, 500)
        limits.settle("t", reservation, stage, "ok", prompt, completion)
    failed = limits.reserve("t", 0.0, 100, 50)
    limits.settle("t", failed, "judge", "rate_limited", 0, 0)
    usage = limits.usage_by_stage()
    assert usage["judge"]["prompt_tokens"] == 1500 and usage["judge"]["completion_tokens"] == 150
    assert usage["judge"]["requests"] == 3 and usage["judge"]["failed_requests"] == 1
    assert usage["judge"]["rate_limited"] == 1
    assert usage["judge"]["cost_usd"] == pytest.approx((1500 * 2 + 150 * 8) / 1e6)
    assert limits.spent_usd == pytest.approx((3500 * 2 + 1150 * 8) / 1e6)


def test_the_budget_refuses_a_request_whose_worst_case_would_pass_the_cap():
    price = PriceConfig(input_per_million_usd=1_000_000.0, output_per_million_usd=1_000_000.0)   # $1 a token
    limits = RunLimits(max_cost_usd=10.0)
    limits.add_endpoint("teacher", endpoint(price=price))
    limits.add_endpoint("judge", endpoint(price=price))
    first = limits.reserve("teacher", 0.0, prompt_tokens=3, max_completion_tokens=3)      # worst case $6 in flight
    with pytest.raises(BudgetExceeded, match="max_cost_usd=.10.00"):
        limits.reserve("judge", 0.0, prompt_tokens=3, max_completion_tokens=3)           # 6 + 6 > 10, across endpoints
    limits.settle("teacher", first, "respond", "ok", prompt_tokens=2, completion_tokens=1)   # spent $3
    limits.reserve("judge", 0.0, prompt_tokens=3, max_completion_tokens=3)               # 3 + 6 <= 10
    assert limits.spent_usd == pytest.approx(3.0)


def test_earlier_commands_spend_counts_against_the_cap_and_the_record_never_lags_the_money():
    price = PriceConfig(input_per_million_usd=1_000_000.0, output_per_million_usd=1_000_000.0)   # $1 a token
    recorded = []
    limits = RunLimits(max_cost_usd=10.0, spent_before_usd=4.0, record=lambda spent, in_flight: recorded.append(
        (spent, in_flight)))
    limits.add_endpoint("teacher", endpoint(price=price))
    first = limits.reserve("teacher", 0.0, prompt_tokens=2, max_completion_tokens=2)      # 4 + 4 <= 10
    assert recorded[-1] == (4.0, 8.0 + 0.1)      # written before the request goes: a kill now leaves $8.10
    assert len(recorded) == 1
    with pytest.raises(BudgetExceeded, match=r"\$4.0000 of it by earlier commands"):
        limits.reserve("teacher", 0.0, prompt_tokens=2, max_completion_tokens=2)         # 8 + 4 > 10
    limits.settle("teacher", first, "teacher", "unknown", 2, 2)      # a timeout: counted at its worst case
    assert limits.total_spent_usd == 8.0 and limits.usage_by_stage()["teacher"]["usage_estimated"] == 1
    assert recorded[-1] == (8.0, 8.0) and limits.flush() == 8.0     # idle: the record is exact


def test_the_spend_record_is_written_once_per_percent_of_the_cap_and_never_lags_the_money():
    price = PriceConfig(input_per_million_usd=1_000.0, output_per_million_usd=1_000.0)       # $0.001 a token
    recorded = []
    limits = RunLimits(max_cost_usd=10.0, record=lambda spent, bound: recorded.append(bound))
    limits.add_endpoint("teacher", endpoint(rpm=10**6, price=price))
    held = [limits.reserve("teacher", 0.0, prompt_tokens=5, max_completion_tokens=5)]         # $0.01 at worst
    for _ in range(999):
        held.append(limits.reserve("teacher", 0.0, prompt_tokens=5, max_completion_tokens=5))
        limits.settle("teacher", held.pop(0), "t", "ok", 5, 5)
        assert recorded[-1] >= limits.total_spent_usd + 0.01                # the spend and the one in flight
    assert 90 <= len(recorded) <= 110                                       # ~$10 spent: ~100 writes, not 1000
