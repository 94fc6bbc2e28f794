"""The teacher/judge client against a real HTTP server on loopback that behaves like a paid API."""
import asyncio
import json
import logging
import time

import pytest

from pipeline.config import EndpointConfig, PriceConfig
from pipeline.llm.client import (BudgetExceededWithResults, ChatClient, ChatReply, ChatRequest, EndpointError,
                                 RequestFailed, parse_reset, parse_retry_after)
from pipeline.llm.emulated_api import EmulatedAPI, Faults
from pipeline.llm.secret import Secret
from pipeline.llm.shared_limits import local_limits

KEY = "sk-test-0123456789abcdef"


def endpoint(**fields) -> EndpointConfig:
    values = {"kind": "remote", "base_url": "http://127.0.0.1:1/v1", "model": "emulated", "max_attempts": 4,
              "timeout_s": 2.0, **fields}
    return EndpointConfig(**values)


def requests(n: int, stage: str = "test", **fields) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": f"question number {i}"}], max_tokens=16, stage=stage, **fields)
            for i in range(n)]


async def run_batch(api: EmulatedAPI, config: EndpointConfig, batch, limits=None, key=KEY):
    limits = limits or local_limits([config], None)
    async with ChatClient(config, api.base_url, Secret(key), limits) as client:
        return await client.complete_all(batch), limits


def test_every_row_is_answered_or_failed_with_a_reason_under_injected_faults():
    faults = Faults(server_error=0.05, unavailable=0.05, reset=0.04, truncated=0.03, non_json=0.03, timeout=0.02)

    async def scenario():
        async with EmulatedAPI(faults=faults, api_key=KEY, hang_s=5.0, seed=7) as api:
            results, limits = await run_batch(api, endpoint(max_attempts=6, timeout_s=1.0), requests(200))
            return api, results, await limits.usage_by_stage()

    api, results, usage = asyncio.run(scenario())
    assert len(results) == 200
    answered = [r for r in results if isinstance(r, ChatReply)]
    failed = [r for r in results if isinstance(r, RequestFailed)]
    assert len(answered) + len(failed) == 200
    assert all(f.reason in {"http_500", "http_503", "connection", "truncated", "bad_response", "timeout"}
               for f in failed)
    assert sum(api.stats.faults.values()) >= 20                 # the faults really happened
    assert any(r.attempts > 1 for r in answered)                # and were retried
    assert max(api.stats.answered_prompts.values()) == 1        # no answered (paid) call was sent twice
    assert api.stats.answered == len(answered)
    assert usage["test"]["requests"] == api.stats.received - api.stats.rate_limited
    assert usage["test"]["prompt_tokens"] + usage["test"]["completion_tokens"] == api.stats.tokens_charged


def test_a_request_that_keeps_failing_is_marked_with_its_last_reason_after_max_attempts():
    async def scenario():
        async with EmulatedAPI(faults=Faults(unavailable=1.0), api_key=KEY) as api:
            results, _ = await run_batch(api, endpoint(max_attempts=3), requests(2))
            return api, results

    api, results = asyncio.run(scenario())
    assert [(r.reason, r.attempts, r.status) for r in results] == [("http_503", 3, 503)] * 2
    assert api.stats.received == 6


def test_a_429_pauses_every_worker_for_its_retry_after_and_then_succeeds():
    async def scenario():
        # The server allows 3 requests a minute; the client believes 600, so the server must push back.
        async with EmulatedAPI(requests_per_minute=3, api_key=KEY) as api:
            config = endpoint(requests_per_minute=600, max_attempts=2)
            api._window.extend([(time.monotonic() - 59.0, 1)] * 3)        # the minute is full for 1 more second
            started = time.monotonic()
            results, limits = await run_batch(api, config, requests(2))
            return api, results, time.monotonic() - started, await limits.usage_by_stage()

    api, results, elapsed, usage = asyncio.run(scenario())
    assert all(isinstance(r, ChatReply) for r in results)
    assert api.stats.rate_limited >= 1 and usage["test"]["rate_limited"] == api.stats.rate_limited
    assert elapsed >= 0.9          # nobody went before the Retry-After the server gave


def test_other_4xx_fail_at_once_with_the_servers_message_and_a_wrong_key_stops_with_no_key_in_it(caplog):
    async def scenario():
        async with EmulatedAPI(api_key=KEY) as api:
            bad = ChatRequest([{"role": "user", "content": "x"}], stage="test")
            async with ChatClient(endpoint(), api.base_url, Secret(KEY), local_limits([endpoint()], None)) as client:
                client._body = lambda request: {"model": "m"}              # a malformed body: no messages
                with pytest.raises(RequestFailed) as caught:
                    await client.complete(bad)
            with pytest.raises(EndpointError) as wrong_key:
                await run_batch(api, endpoint(), requests(1), key="sk-wrong-key-999")
            return api, caught.value, wrong_key.value

    caplog.set_level(logging.DEBUG)
    api, failed, wrong_key = asyncio.run(scenario())
    assert (failed.reason, failed.attempts) == ("http_400", 1)
    assert "body must be JSON with 'messages'" in str(failed)
    assert wrong_key.status == 401 and "Incorrect API key" in str(wrong_key)
    assert "sk-wrong-key-999" not in str(wrong_key) and "sk-wrong-key-999" not in caplog.text
    assert KEY not in caplog.text


def test_structured_output_is_requested_and_parsed():
    schema = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
              "required": ["score"]}

    async def scenario():
        async with EmulatedAPI(api_key=KEY) as api:
            results, _ = await run_batch(api, endpoint(), requests(5, json_schema=schema))
            return results

    for reply in asyncio.run(scenario()):
        assert 1 <= json.loads(reply.content)["score"] <= 10


def test_the_budget_stops_new_requests_and_keeps_what_was_answered():
    price = PriceConfig(input_per_million_usd=100_000.0, output_per_million_usd=100_000.0)    # $0.1 a token

    async def scenario():
        async with EmulatedAPI(api_key=KEY, latency_s=0.05) as api:
            config = endpoint(price=price, max_concurrency=1)
            limits = local_limits([config], max_cost_usd=20.0)
            with pytest.raises(BudgetExceededWithResults) as caught:
                await run_batch(api, config, requests(40), limits=limits)
            return api, caught.value, limits

    api, stopped, limits = asyncio.run(scenario())
    answered = [r for r in stopped.results if isinstance(r, ChatReply)]
    unsent = [r for r in stopped.results if isinstance(r, RequestFailed)]
    assert answered and unsent and len(answered) + len(unsent) == 40
    assert {r.reason for r in unsent} == {"budget_exceeded"}
    assert api.stats.answered == len(answered)
    assert limits.limits.spent_usd <= 20.0
    assert "max_cost_usd=$20.00" in str(stopped)


def test_retry_after_and_reset_headers_are_read_in_every_form():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.25") == 0.25
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None
    assert parse_reset("6m0s") == 360.0 and parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1.5s") == 1.5 and parse_reset("3") == 3.0


def test_the_client_and_its_key_stay_out_of_reprs_and_pickles():
    import pickle

    client = ChatClient(endpoint(), "http://127.0.0.1:9/v1", Secret(KEY), local_limits([endpoint()], None))
    assert KEY not in repr(client) and KEY not in repr(client._api_key)
    with pytest.raises(TypeError, match="not serialisable"):
        pickle.dumps(Secret(KEY))
