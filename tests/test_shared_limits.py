"""Several Ray workers share one rate limit through the named limits actor."""
import asyncio
import os

import pytest
import ray

from pipeline.config import EndpointConfig
from pipeline.llm.client import ChatClient, ChatReply, ChatRequest
from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.llm.secret import secret_from_env
from pipeline.llm.shared_limits import local_limits, shared_limits

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


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ[KEY_ENV] = "sk-shared-limit-test"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
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
