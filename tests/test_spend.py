"""The run's one budget: every command on a run directory pays under it, and a command killed with SIGKILL
leaves a record of its spend that the next one starts from (RUN_DIR/spend.json)."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import store
from pipeline.config import PoolConfig, PriceConfig, RunConfig
from pipeline.llm.client import estimate_prompt_tokens
from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.llm.endpoint import OpenEndpoint
from pipeline.llm.limits import BudgetExceeded
from pipeline.llm.secret import Secret
from pipeline.llm.spend import SPEND_FILE, SpendRecord
from pipeline.pool import import_pool, read_pool
from pipeline.task_labels import label_sample, labels_location, read_labels

KEY = "sk-spend-test-0123456789"
PRICE = PriceConfig(input_per_million_usd=2000.0, output_per_million_usd=2000.0)
LABEL_PRICE = PriceConfig(input_per_million_usd=20.0, output_per_million_usd=20.0)    # a label costs about $0.01

# A command that pays for 60 requests under the run's budget and record; run as its own process so it can be
# killed with SIGKILL in the middle.
PAYING_COMMAND = """
import asyncio, sys
from pipeline import store
from pipeline.config import EndpointConfig, PriceConfig
from pipeline.llm.client import ChatClient, ChatRequest
from pipeline.llm.limits import BudgetExceeded
from pipeline.llm.secret import secret_from_env
from pipeline.llm.shared_limits import local_limits
from pipeline.llm.spend import SpendRecord

base_url, run_dir, cap = sys.argv[1], sys.argv[2], float(sys.argv[3])
config = EndpointConfig(kind="remote", base_url=base_url, model="m", api_key_env="TAPIR_SPEND_TEST_KEY",
                        max_concurrency=4, price=PriceConfig(input_per_million_usd=2000.0, output_per_million_usd=2000.0))
limits = local_limits([config], cap, SpendRecord(store.locate(run_dir)))
requests = [ChatRequest([{"role": "user", "content": f"paid question {i}"}], max_tokens=16) for i in range(60)]

async def main():
    async with ChatClient(config, base_url, secret_from_env(config.api_key_env, "test"), limits) as client:
        try:
            await client.complete_all(requests)
        except BudgetExceeded:
            print("budget reached")

asyncio.run(main())
"""


def billed(api: EmulatedAPI, price: PriceConfig = PRICE) -> float:
    return api.stats.billed_usd(price.input_per_million_usd, price.output_per_million_usd)


def test_a_command_killed_with_sigkill_leaves_a_spend_record_the_resumed_command_cannot_pass_the_cap_from(tmp_path):
    worst = (estimate_prompt_tokens([{"content": "paid question 10"}]) + 16) * 2000.0 / 1e6   # about $0.04
    cap = 20 * worst
    api = EmulatedAPI(api_key=KEY, latency_s=0.3)
    env = {**os.environ, "TAPIR_SPEND_TEST_KEY": KEY}
    run_dir = str(tmp_path / "run")
    with api.serving_in_thread():
        first = subprocess.Popen([sys.executable, "-c", PAYING_COMMAND, api.base_url, run_dir, str(cap)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while api.stats.answered < 8 and first.poll() is None:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert first.returncode == -signal.SIGKILL, first.stdout.read()
        time.sleep(0.5)                          # what was in flight at the kill is answered, and billed, now
        killed = store.read_json(store.locate(run_dir), SPEND_FILE)
        assert killed["bound_usd"] >= billed(api)                      # what the server billed, in flight included
        second = subprocess.run([sys.executable, "-c", PAYING_COMMAND, api.base_url, run_dir, str(cap)], env=env,
                                capture_output=True, text=True, timeout=120)
    assert "budget reached" in second.stdout, second.stdout + second.stderr
    assert billed(api) <= cap                          # over both commands: the server's bill, not our books
    final = store.read_json(store.locate(run_dir), SPEND_FILE)
    assert billed(api) <= final["spent_usd"] == final["bound_usd"] <= cap


@pytest.fixture(scope="module")
def sample_pool(tmp_path_factory):
    location = store.locate(str(tmp_path_factory.mktemp("pool")))
    import_pool(["bundled:sample"], location, PoolConfig(), progress=False)
    return read_pool(location)


def test_labelling_is_paid_under_the_runs_one_cap_counted_in_its_spend_and_keeps_what_it_paid_for(
        tmp_path, sample_pool):
    """Labelling had a full max_cost_usd of its own, outside the run's spend: a run could pay twice its cap."""
    async def scenario():
        async with EmulatedAPI(api_key=KEY) as api:
            config = RunConfig.model_validate({
                "storage": {"run_dir": str(tmp_path / "run")}, "classifier": {"label_sample_size": 40},
                "max_cost_usd": 1.0, "teacher": {"kind": "remote", "base_url": api.base_url, "model": "teacher",
                                                 "max_concurrency": 1, "price": LABEL_PRICE.model_dump()}})
            run = store.locate(config.storage.run_dir)
            SpendRecord(run)(0.95, 0.0)                 # what earlier commands on this run directory spent
            with pytest.raises(BudgetExceeded, match=r"\$0.9500 of it by earlier commands"):
                await label_sample(config, OpenEndpoint(api.base_url, "teacher", Secret(KEY)), sample_pool,
                                   progress=False)
            return api, config

    api, config = asyncio.run(scenario())
    labels = read_labels(labels_location(config))
    paid = labels.filter(labels.column("error").is_null())
    assert 0 < api.stats.answered == paid.num_rows < 40          # every answer paid for is written
    assert labels.num_rows == 40                                 # the rest kept as budget_exceeded, asked again
    record = store.read_json(store.locate(config.storage.run_dir), SPEND_FILE)
    assert 0.95 + billed(api, LABEL_PRICE) <= record["spent_usd"] <= 1.0


def test_a_run_directory_from_before_spend_json_starts_from_what_its_state_says_it_spent(tmp_path):
    """A run directory written before spend.json existed started again at $0."""
    run_dir = store.locate(str(tmp_path))
    store.write_json(run_dir, "state.json", {"rounds": {}, "spent_usd": 3.5})
    record = SpendRecord(run_dir)
    assert record.spent_before() == 3.5
    store.write_json(run_dir, SPEND_FILE, {"spent_usd": 4.0, "bound_usd": 4.2})
    assert record.spent_before() == 4.2                   # once it exists, spend.json is the record
