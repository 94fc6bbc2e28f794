"""Several Ray workers share one rate limit through the named limits actor."""
import asyncio
import os
import time

import pytest
import ray

from pipeline import store
from pipeline.config import EndpointConfig, PriceConfig
from pipeline.llm.client import ChatClient, ChatReply, ChatRequest, RequestFailed
from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.llm.limits import BudgetExceeded, Reservation
from pipeline.llm.secret import secret_from_env
from pipeline.llm.shared_limits import endpoint_key, local_limits, shared_limits
from pipeline.llm.spend import SpendRecord

pytestmark = pytest.mark.slow
KEY_ENV = "TAPIR_TEST_EMULATED_KEY"


@ray.remote(num_cpus=0.25)
class Worker:
    async def send(self, config: EndpointConfig, base_url: str, limits, count: int, tag: str) -> int:
        limits = limits or local_limits([config], None)        # None: this worker paces only itself
        requests = [ChatRequest([{"role": "user", "content": f"{tag} {i}"}], max_tokens=8) for i in range(count)]
        async with ChatClient(config, base_url, secret_from_env(config.api_key_env, "test"), limits) as client:
            results = await client.complete_all(requests)
        return sum(isinstance(r, ChatReply) for r in results)

    async def send_one(self, config: EndpointConfig, base_url: str, limits, prompt: str) -> tuple[str, int]:
        request = ChatRequest([{"role": "user", "content": prompt}], max_tokens=8)
        async with ChatClient(config, base_url, secret_from_env(config.api_key_env, "test"), limits) as client:
            try:
                return "ok", (await client.complete(request)).attempts
            except RequestFailed as failed:
                return failed.reason, failed.attempts


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ[KEY_ENV] = "sk-shared-limit-test"
    # "local": never the cluster a `ray start` left in Ray's address file (test_cluster_run's, run beside)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_workers(api: EmulatedAPI, shared: bool, tag: str) -> int:
    config = EndpointConfig(kind="remote", base_url=api.base_url, model="m", api_key_env=KEY_ENV,
                            requests_per_minute=api.rpm, max_attempts=1)
    limits = shared_limits(f"test-{tag}", [config], None) if shared else None
    workers = [Worker.remote() for _ in range(3)]
    return sum(ray.get([w.send.remote(config, api.base_url, limits, 8, f"{tag}-{i}") for i, w in enumerate(workers)]))


def test_workers_sharing_the_limit_never_get_a_429_where_separate_pacing_does(ray_cluster):
    # 3 workers x 8 requests against 20 a minute: more than one minute's worth, so pacing must hold (~70 s).
    api = EmulatedAPI(requests_per_minute=20, api_key=os.environ[KEY_ENV])
    with api.serving_in_thread():
        answered = run_workers(api, shared=True, tag="shared")
        assert (answered, api.stats.rate_limited) == (24, 0)
    separate = EmulatedAPI(requests_per_minute=20, api_key=os.environ[KEY_ENV])
    with separate.serving_in_thread():
        run_workers(separate, shared=False, tag="separate")
        assert separate.stats.rate_limited > 0        # three workers each pacing at the full rate overrun it


def test_a_429_one_worker_gets_pauses_another_worker_until_its_retry_after(ray_cluster):
    api = EmulatedAPI(requests_per_minute=3, api_key=os.environ[KEY_ENV])
    with api.serving_in_thread():
        config = EndpointConfig(kind="remote", base_url=api.base_url, model="m", api_key_env=KEY_ENV,
                                requests_per_minute=600, max_attempts=1)
        limits = shared_limits("test-pause", [config], None)
        first, second = Worker.remote(), Worker.remote()
        ray.get([first.__ray_ready__.remote(), second.__ray_ready__.remote()])
        # The server allows 3 requests a minute and its minute is full for 3 more seconds; the client believes 600.
        api._window.extend([(time.monotonic() - 57.0, 1)] * 3)
        # the first worker's only attempt draws the 429, and the pause is recorded in the run's limits actor
        assert ray.get(first.send_one.remote(config, api.base_url, limits, "first")) == ("rate_limited", 1)
        paused_until = ray.get(limits.actor.paused_until.remote(endpoint_key(config)))
        # the second worker, another process, asks only after the pause it never saw a 429 for
        assert ray.get(second.send_one.remote(config, api.base_url, limits, "second")) == ("ok", 1)
    arrivals = {prompt: (at, status) for at, prompt, status in api.stats.arrivals}
    assert arrivals["first"][1] == 429 and arrivals["second"][1] == 200 and api.stats.rate_limited == 1
    assert arrivals["first"][0] < paused_until <= arrivals["second"][0]      # monotonic: one clock per machine


def test_a_restarted_limits_actor_comes_back_with_the_runs_endpoints_and_its_spend(ray_cluster, tmp_path):
    """A restarted actor came back with no endpoint registered (every lease failed) and with $0 spent."""
    price = PriceConfig(input_per_million_usd=10_000.0, output_per_million_usd=10_000.0)
    api = EmulatedAPI(api_key=os.environ[KEY_ENV])
    with api.serving_in_thread():
        config = EndpointConfig(kind="remote", base_url=api.base_url, model="m", api_key_env=KEY_ENV, price=price)
        limits = shared_limits("test-restart", [config], 100.0, record=SpendRecord(store.locate(str(tmp_path))))
        worker = Worker.remote()
        assert ray.get(worker.send.remote(config, api.base_url, limits, 3, "before")) == 3
        spent = ray.get(limits.actor.record_spend.remote())
        ray.kill(limits.actor, no_restart=False)
        assert ray.get(worker.send_one.remote(config, api.base_url, limits, "after")) == ("ok", 1)
        assert ray.get(limits.actor.record_spend.remote()) > spent > 0


def test_leases_sent_together_are_each_held_to_the_budget_and_a_refusal_fails_only_its_own_request(ray_cluster):
    """A worker's concurrent leases reach the actor in one batch: the budget still books them one by one."""
    price = PriceConfig(input_per_million_usd=1_000_000.0, output_per_million_usd=1_000_000.0)
    config = EndpointConfig(kind="remote", base_url="http://127.0.0.1:9", model="m", price=price)
    # each lease's worst case is (10 + 10) tokens at $1 a token = $20: a $50 cap holds two of them in flight
    limits = shared_limits("test-batched-budget", [config], 50.0)

    async def lease_all():
        return await asyncio.gather(*(limits.reserve(endpoint_key(config), 10, 10) for _ in range(5)),
                                    return_exceptions=True)

    results = asyncio.run(lease_all())
    assert sum(isinstance(r, Reservation) and r.booked for r in results) == 2
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 3
