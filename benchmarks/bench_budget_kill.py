"""kill -9 under a budget: a process paying for 60 requests under max_cost_usd is SIGKILLed mid-batch, and the
same command run again. What the loopback API billed over both, and what RUN_DIR/spend.json held at the kill and
at the end (the command is tests/test_spend.py's).

    .venv/bin/python benchmarks/bench_budget_kill.py --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_spend import KEY, PAYING_COMMAND, billed  # noqa: E402

from pipeline import store  # noqa: E402
from pipeline.llm.client import estimate_prompt_tokens  # noqa: E402
from pipeline.llm.emulated_api import EmulatedAPI  # noqa: E402
from pipeline.llm.spend import SPEND_FILE  # noqa: E402


def one(kill_after: int, cap: float) -> dict:
    api = EmulatedAPI(api_key=KEY, latency_s=0.3)
    env = {**os.environ, "TAPIR_SPEND_TEST_KEY": KEY}
    run_dir = tempfile.mkdtemp(prefix="tapir-budget-kill-")
    with api.serving_in_thread():
        command = [sys.executable, "-c", PAYING_COMMAND, api.base_url, run_dir, str(cap)]
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while api.stats.answered < kill_after and first.poll() is None:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        at_kill = store.read_json(store.locate(run_dir), SPEND_FILE)
        time.sleep(1.0)                    # the requests in flight at the kill are answered, and billed
        billed_by_kill = billed(api)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        at_end = store.read_json(store.locate(run_dir), SPEND_FILE)
    return {"billed_by_kill": round(billed_by_kill, 4), "record_at_kill": at_kill, "billed_total": round(billed(api), 4),
            "answered_total": api.stats.answered, "record_at_end": at_end, "second_command": second.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    worst = (estimate_prompt_tokens([{"content": "paid question 10"}]) + 16) * 2000.0 / 1e6
    cap = 20 * worst
    runs = [one(8 + 3 * i, cap) for i in range(args.runs)]
    print(json.dumps({"cap_usd": round(cap, 4), "worst_per_request_usd": round(worst, 4), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
