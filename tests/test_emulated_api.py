"""The loopback API's server models, on a clock the test holds: each limits requests as the real server it
stands for, so the client's tests and benchmarks meet the rules a paid API enforces."""
import asyncio

import aiohttp

from pipeline.llm.emulated_api import EmulatedAPI, Faults

KEY = "sk-emulated-0123"


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def statuses(api: EmulatedAPI, steps: list[tuple[float, int]], max_tokens: int = 16) -> list[list[int]]:
    """For each (time, n): the statuses of n requests sent one after another with the server's clock at time."""
    async def scenario():
        async with api, aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            seen = []
            for at, count in steps:
                api.clock.now = at
                codes = []
                for i in range(count):
                    body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"q{i}"}]}
                    async with session.post(f"{api.base_url}/chat/completions", json=body) as response:
                        codes.append(response.status)
                seen.append(codes)
            return seen

    return asyncio.run(scenario())


def test_a_sliding_minute_forgives_rejected_requests_where_openai_counts_them():
    steps = [(0.0, 1), (30.0, 1), (40.0, 1), (61.0, 1)]          # 2 a minute; a third at 40 s is rejected
    forgiving = statuses(EmulatedAPI(requests_per_minute=2, api_key=KEY, clock=Clock()), steps)
    counting = statuses(EmulatedAPI(requests_per_minute=2, api_key=KEY, clock=Clock(), count_rejected=True), steps)
    assert forgiving == [[200], [200], [429], [200]]              # at 61 s the request of 0 s has left the minute
    assert counting == [[200], [200], [429], [429]]               # but the rejected one of 40 s still counts


def test_openai_slices_a_minutes_limit_into_seconds():
    api = EmulatedAPI(requests_per_minute=120, api_key=KEY, clock=Clock(), enforcement="slices")
    assert statuses(api, [(0.0, 3), (0.9, 1), (1.0, 2), (1.5, 1)]) == [[200, 200, 429], [429], [200, 200], [429]]


def test_a_token_bucket_refills_continuously_up_to_a_minutes_limit():
    api = EmulatedAPI(requests_per_minute=60, api_key=KEY, clock=Clock(), enforcement="token_bucket")
    seen = statuses(api, [(0.0, 61), (1.0, 2), (600.0, 61)])       # one a second back; never more than 60 held
    assert seen[0] == [200] * 60 + [429] and seen[1] == [200, 429] and seen[2] == [200] * 60 + [429]


def test_where_max_tokens_are_held_a_request_counts_them_whatever_it_used():
    steps = [(0.0, 3)]                                            # 1000 tokens a minute, max_tokens 400 each
    used = statuses(EmulatedAPI(tokens_per_minute=1000, api_key=KEY, clock=Clock()), steps, max_tokens=400)
    held = statuses(EmulatedAPI(tokens_per_minute=1000, api_key=KEY, clock=Clock(), tokens_counted_as="requested"),
                    steps, max_tokens=400)
    assert used == [[200, 200, 200]] and held == [[200, 200, 429]]


def test_replies_without_usage_are_billed_all_the_same():
    api = EmulatedAPI(api_key=KEY, faults=Faults(no_usage=1.0), clock=Clock())
    assert statuses(api, [(0.0, 2)]) == [[200, 200]]
    assert api.stats.answered == 2 and api.stats.tokens_charged > 0
