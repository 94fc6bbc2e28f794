"""The teacher/judge client against a real HTTP server on loopback that behaves like a paid API."""
import asyncio
import contextlib
import json
import logging
import os
import time

import pytest

from pipeline.config import EndpointConfig, PriceConfig
from pipeline.llm.client import (
    BudgetExceededWithResults,
    ChatClient,
    ChatReply,
    ChatRequest,
    EndpointError,
    RequestFailed,
    estimate_prompt_tokens,
    parse_reset,
    parse_retry_after,
)
from pipeline.llm.emulated_api import EmulatedAPI, Faults
from pipeline.llm.endpoint import RunEndpoints
from pipeline.llm.secret import MissingSecretError, Secret
from pipeline.llm.shared_limits import endpoint_key, local_limits

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
    # but not a timeout, which the server may have billed: each ended its row
    assert api.stats.faults["timeout"] == sum(f.reason == "timeout" for f in failed) > 0
    assert max(api.stats.answered_prompts.values()) == 1        # no answered (paid) call was sent twice
    assert api.stats.answered == len(answered)
    assert usage["test"]["requests"] == api.stats.received - api.stats.rate_limited
    # never under the server's bill: attempts whose usage is unknown (timeouts, resets, cut-off bodies) count
    # at their worst case
    assert usage["test"]["prompt_tokens"] + usage["test"]["completion_tokens"] > api.stats.tokens_charged
    assert usage["test"]["usage_estimated"] == sum(api.stats.faults[f] for f in ("timeout", "reset", "truncated"))


def test_a_request_that_keeps_failing_is_marked_with_its_last_reason_after_max_attempts():
    async def scenario():
        async with EmulatedAPI(faults=Faults(unavailable=1.0), api_key=KEY) as api:
            results, _ = await run_batch(api, endpoint(max_attempts=3), requests(2))
            return api, results

    api, results = asyncio.run(scenario())
    assert [(r.reason, r.attempts, r.status) for r in results] == [("http_503", 3, 503)] * 2
    assert api.stats.received == 6


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


def priced(worst_usd_per_request: float, max_tokens: int = 16) -> PriceConfig:
    """Prices at which a request of `requests(…)` (its prompt estimate + max_tokens) costs at most this."""
    tokens = estimate_prompt_tokens(requests(1)[0].messages) + max_tokens
    per_million = worst_usd_per_request / tokens * 1e6
    return PriceConfig(input_per_million_usd=per_million, output_per_million_usd=per_million)


def test_a_reply_without_usage_is_costed_at_its_worst_case_so_the_budget_still_holds(caplog):
    # With usage read as 0, all 100 requests were sent and answered under a cap worth 3 of them.
    price = priced(0.016)

    async def scenario():
        async with EmulatedAPI(api_key=KEY, faults=Faults(no_usage=1.0)) as api:
            config = endpoint(price=price)
            limits = local_limits([config], max_cost_usd=0.05)
            with pytest.raises(BudgetExceededWithResults) as caught:
                await run_batch(api, config, requests(100), limits=limits)
            return api, caught.value.results, limits

    api, results, limits = asyncio.run(scenario())
    answered = [r for r in results if isinstance(r, ChatReply)]
    assert 0 < len(answered) <= 3 and api.stats.answered == len(answered)
    assert all(r.usage_estimated for r in answered)
    assert api.stats.billed_usd(price.input_per_million_usd, price.output_per_million_usd) <= 0.05
    assert limits.limits.spent_usd == pytest.approx(0.016 * len(answered))          # flagged, never $0
    assert limits.limits.usage_by_stage()["test"]["usage_estimated"] == len(answered)
    assert "answered without usage" in caplog.text


def test_a_request_past_the_timeout_is_counted_at_its_worst_case_and_not_sent_again():
    price = priced(0.01)

    async def scenario():
        # The server answers, and bills, each request after 1.5 s; the client waits 0.3 s.
        async with EmulatedAPI(api_key=KEY, faults=Faults(slow=1.0), hang_s=1.5) as api:
            config = endpoint(price=price, timeout_s=0.3, max_attempts=4)
            results, limits = await run_batch(api, config, requests(5))
            while api.stats.answered < 5:              # the server finishes what the client gave up on
                await asyncio.sleep(0.1)
            return api, results, limits

    api, results, limits = asyncio.run(scenario())
    assert [(r.reason, r.attempts) for r in results] == [("timeout", 1)] * 5
    assert api.stats.received == 5 and max(api.stats.answered_prompts.values()) == 1     # paid once each
    billed = api.stats.billed_usd(price.input_per_million_usd, price.output_per_million_usd)
    assert limits.limits.spent_usd == pytest.approx(0.05) and limits.limits.spent_usd >= billed


def test_a_retry_after_past_max_pause_fails_the_rows_as_rate_limited_and_names_the_endpoint(caplog):
    async def scenario():
        async with EmulatedAPI(requests_per_minute=1, api_key=KEY, retry_after_s=3600) as api:
            api._window.append((time.monotonic(), 1))                  # the minute is used up
            config = endpoint(max_pause_s=300, max_attempts=6, max_concurrency=1)
            results, limits = await asyncio.wait_for(run_batch(api, config, requests(8)), 60)
            return api, results

    caplog.set_level(logging.WARNING)
    api, results = asyncio.run(scenario())
    assert {r.reason for r in results} == {"rate_limited"}
    assert api.stats.received == 1         # the rows after the first 429 were failed without being sent
    assert f"{api.base_url}/chat/completions asked for a pause of 3600 s (Retry-After: 3600.000)" in caplog.text


def test_a_reset_header_in_epoch_form_pauses_until_that_time_and_an_unknown_form_is_ignored(caplog):
    async def scenario():
        async with EmulatedAPI(requests_per_minute=2, api_key=KEY, reset_form="epoch") as api:
            config = endpoint()
            results, limits = await run_batch(api, config, requests(2))      # the second leaves 0 remaining
            return results, limits.limits.endpoints[endpoint_key(config)].paused_until - time.monotonic()

    results, paused_for = asyncio.run(scenario())
    assert all(isinstance(r, ChatReply) for r in results)
    assert 0 < paused_for <= 61            # read as a Unix time: not a pause of 1.8 billion seconds
    caplog.set_level(logging.WARNING)
    assert parse_reset("2026-12-01T08:00:00Z") is None and "not understood: '2026-12-01T08:00:00Z'" in caplog.text
    assert parse_reset("1764576000", now=1764575990.0) == pytest.approx(10.0)


def test_an_endpoint_that_is_down_stops_with_its_url_and_its_dead_attempts_take_no_place_in_the_window():
    async def scenario():
        async with EmulatedAPI(api_key=KEY) as api:
            await api.stop_listening()
            config = endpoint(max_connection_failures=3, max_attempts=6)
            limits = local_limits([config], None)
            with pytest.raises(EndpointError) as down:
                await run_batch(api, config, requests(10), limits=limits)
            await api.listen_again()                         # back: the same command, run again, goes on
            results, _ = await run_batch(api, config, requests(10))
            return api, down.value, limits.limits.endpoints[endpoint_key(config)], results

    api, down, books, results = asyncio.run(scenario())
    assert f"{api.base_url}/chat/completions is not reachable (" in str(down)
    assert "consecutive connection failures); start it or correct base_url" in str(down)
    assert len(books._events) == 0 and books.usage_by_stage["test"].requests == 0      # nothing charged to RPM
    assert books.usage_by_stage["test"].unreached >= 3
    assert all(isinstance(r, ChatReply) for r in results)


def test_the_client_does_not_burst_into_a_servers_slices_and_paces_itself_once_they_reject_it():
    async def scenario():
        # 120 a minute enforced as 2 a second, rejected requests counted (OpenAI): a client that sent a minute's
        # worth at once drew 1,742 429s for 58 of 360 rows in 15 minutes.
        async with EmulatedAPI(requests_per_minute=120, enforcement="slices", count_rejected=True,
                               api_key=KEY) as api:
            config = endpoint(requests_per_minute=120, max_attempts=6)
            results, limits = await run_batch(api, config, requests(20))
            return api, results, limits.limits.endpoints[endpoint_key(config)]

    api, results, books = asyncio.run(scenario())
    assert all(isinstance(r, ChatReply) for r in results)           # no row lost
    # the slow start's second slice (or third, when it straddled two of the server's) drew them; after that the
    # client went at the server's pace (going on doubling, or bursting after each pause, draws dozens)
    assert books.paced and 0 < api.stats.rate_limited <= 6


def test_run_endpoints_check_a_remote_key_at_once_and_start_no_local_teacher_before_a_stage_asks(monkeypatch):
    monkeypatch.delenv("TAPIR_TEST_REMOTE_KEY", raising=False)
    remote = EndpointConfig(kind="remote", base_url="http://127.0.0.1:9/v1", model="judge",
                            api_key_env="TAPIR_TEST_REMOTE_KEY")
    local = EndpointConfig(kind="local", api_key_env="TAPIR_TEST_LOCAL_KEY")
    monkeypatch.delenv("TAPIR_TEST_LOCAL_KEY", raising=False)
    with contextlib.ExitStack() as stack:
        with pytest.raises(MissingSecretError, match=r"judge API key is missing: set the environment variable "
                                                     r"\$TAPIR_TEST_REMOTE_KEY"):
            RunEndpoints(local, remote, "/nonexistent-cache", stack)
        monkeypatch.setenv("TAPIR_TEST_REMOTE_KEY", "remote-key")
        endpoints = RunEndpoints(local, remote, "/nonexistent-cache", stack)
        # the local teacher's key is drawn now, for the workers Ray starts next; its server is not started
        # (its model is not even looked up in the cache, which does not exist)
        drawn = os.environ["TAPIR_TEST_LOCAL_KEY"]
        assert len(drawn) >= 32 and endpoints._open == {}
        assert endpoints.judge().api_key.reveal() == "remote-key"
        os.environ.pop("TAPIR_TEST_LOCAL_KEY")
