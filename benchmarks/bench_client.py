"""Teacher-client benchmarks against the emulated paid API (real HTTP on loopback).

1. Pacing: achieved / configured requests per minute (RPM-bound) and tokens per minute (TPM-bound), with 2
   and with 8 Ray workers sharing one limit, against a strict sliding minute; 429s the server sent.
   "Achieved" is the server's own count: the mean, over the run after its first minute, of what its sliding
   60-second window held (sampled every 0.5 s), over the limit; the measured span is `--minutes` long.
2. Server models: our client (2 Ray workers sharing one limit) against what distilabel does (the openai SDK's
   AsyncOpenAI with its default retries, requests fired with asyncio.gather), same rows, same server, for each
   way a real server enforces 120 requests/min: a sliding minute; OpenAI's rules (one-second slices, rejected
   requests counted, max_tokens held against TPM); a continuously refilled token bucket. Rows completed per
   minute, achieved / configured rate, 429s drawn, rows lost.
3. With 20% injected faults: every row answered or failed with a reason; none lost, none paid twice.

    .venv/bin/python benchmarks/bench_client.py --minutes 2 [--only models]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections import Counter

import ray

from pipeline.config import EndpointConfig
from pipeline.llm.client import ChatClient, ChatReply, ChatRequest
from pipeline.llm.emulated_api import EmulatedAPI, Faults
from pipeline.llm.secret import secret_from_env
from pipeline.llm.shared_limits import shared_limits

KEY_ENV = "TAPIR_BENCH_KEY"
UNLIMITED = 10**9


@ray.remote(num_cpus=0.1)
class Worker:
    async def send(self, config: EndpointConfig, base_url: str, limits, prompts: list[str], max_tokens: int):
        requests = [ChatRequest([{"role": "user", "content": p}], max_tokens=max_tokens) for p in prompts]
        async with ChatClient(config, base_url, secret_from_env(KEY_ENV, "bench"), limits) as client:
            results = await client.complete_all(requests)
        return [("ok", r.attempts) if isinstance(r, ChatReply) else (r.reason, r.attempts) for r in results]


def prompts(count: int, tag: str, words: int = 60) -> list[str]:
    return [f"{tag} request {i}: " + " ".join(f"w{(i * 7 + j) % 101}" for j in range(words)) for i in range(count)]


def window_utilisation(events: list[tuple[float, int]], weight_tokens: bool) -> tuple[float, float, float]:
    """(mean, max, measured seconds) of what the server's sliding minute held, after the first minute."""
    events = sorted(events)
    first, last = events[0][0], events[-1][0]
    values, t = [], first + 60.0
    while t <= last:
        inside = [tokens for at, tokens in events if t - 60.0 < at <= t]
        values.append(sum(inside) if weight_tokens else len(inside))
        t += 0.5
    return (sum(values) / len(values), max(values), last - first - 60.0) if values else (0.0, 0.0, 0.0)


def run_workers(api: EmulatedAPI, workers: int, rows: int, tag: str, rpm: int, tpm: int,
                max_tokens: int = 128, **endpoint_fields) -> dict:
    config = EndpointConfig(kind="remote", base_url=api.base_url, model="bench", api_key_env=KEY_ENV,
                            requests_per_minute=rpm, tokens_per_minute=tpm, **endpoint_fields)
    limits = shared_limits(f"bench-{tag}", [config], None)
    actors = [Worker.remote() for _ in range(workers)]
    all_prompts = prompts(rows, tag)
    started = time.monotonic()
    outcomes = ray.get([actor.send.remote(config, api.base_url, limits, all_prompts[i::workers], max_tokens)
                        for i, actor in enumerate(actors)])
    elapsed = time.monotonic() - started
    flat = [o for worker in outcomes for o in worker]
    return {"workers": workers, "rows": rows, "results": len(flat), "answered": api.stats.answered,
            "outcomes": dict(Counter(reason for reason, _ in flat)), "seconds": round(elapsed, 1),
            "server_429": api.stats.rate_limited, "paid_twice": sum(n - 1 for n in api.stats.answered_prompts.values()),
            "server_faults": dict(api.stats.faults)}


def bench_pacing(minutes: float) -> list[dict]:
    results = []
    rpm, tpm, tokens_per_request = 600, 60_000, 150       # the server counts about 150 tokens per request here
    for workers in (2, 8):
        for bound, limit in (("rpm", rpm), ("tpm", tpm)):
            api = EmulatedAPI(requests_per_minute=rpm if bound == "rpm" else UNLIMITED,
                              tokens_per_minute=tpm if bound == "tpm" else UNLIMITED,
                              latency_s=0.2, latency_jitter_s=0.2, api_key=os.environ[KEY_ENV])
            per_minute = rpm if bound == "rpm" else tpm // tokens_per_request
            with api.serving_in_thread():
                # this server counts the tokens a reply used, and the client is told so
                result = run_workers(api, workers, int(per_minute * (minutes + 1.5)), f"{bound}{workers}",
                                     rpm if bound == "rpm" else UNLIMITED, tpm if bound == "tpm" else UNLIMITED,
                                     tokens_counted_as="used")
            mean, peak, span = window_utilisation(api.stats.answered_at, weight_tokens=bound == "tpm")
            results.append({"bound": bound, "limit": limit, "ratio": round(mean / limit, 4),
                            "peak_window_over_limit": round(peak / limit, 4), "measured_s": round(span, 1), **result})
    return results


async def sdk_baseline(api: EmulatedAPI, rows: int, concurrency: int, max_tokens: int) -> dict:
    """What distilabel's OpenAI LLM does: AsyncOpenAI (2 retries, its own backoff), asyncio.gather, no limiter."""
    import openai

    client = openai.AsyncOpenAI(base_url=api.base_url, api_key=os.environ[KEY_ENV], max_retries=2, timeout=60)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> str:
        async with gate:
            try:
                await client.chat.completions.create(model="bench", max_tokens=max_tokens,
                                                     messages=[{"role": "user", "content": prompt}])
                return "ok"
            except openai.APIStatusError as err:
                return f"http_{err.status_code}"
            except openai.APIError as err:
                return type(err).__name__

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(p) for p in prompts(rows, "sdk")))
    elapsed = time.monotonic() - started
    await client.close()
    return {"rows": rows, "seconds": round(elapsed, 1), "outcomes": dict(Counter(outcomes)),
            "completed_per_min": round(outcomes.count("ok") / elapsed * 60, 1), "server_429": api.stats.rate_limited}


SERVER_MODELS = {
    "sliding_minute": {},
    "openai": {"enforcement": "slices", "count_rejected": True, "tokens_counted_as": "requested"},
    "token_bucket": {"enforcement": "token_bucket"},
}


def bench_server_models(rows: int) -> list[dict]:
    """`rows` per client and model, at 120 requests/min (and, for OpenAI's rules, 120 x max_tokens tokens/min)."""
    rpm, max_tokens, workers = 120, 512, 2
    results = []
    for name, model in SERVER_MODELS.items():
        tpm = rpm * max_tokens if name == "openai" else UNLIMITED

        def server() -> EmulatedAPI:
            return EmulatedAPI(requests_per_minute=rpm, tokens_per_minute=tpm, latency_s=0.2, latency_jitter_s=0.2,
                               api_key=os.environ[KEY_ENV], **model)

        sdk_api = server()

        async def baseline():
            async with sdk_api:
                return await sdk_baseline(sdk_api, rows, 16 * workers, max_tokens)

        sdk = asyncio.run(baseline())
        ours_api = server()
        with ours_api.serving_in_thread():
            ours = run_workers(ours_api, workers, rows, f"model-{name}", rpm, tpm, max_tokens)
        ours["completed_per_min"] = round(ours["outcomes"].get("ok", 0) / ours["seconds"] * 60, 1)
        mean, peak, span = window_utilisation([(at, 1) for at, _ in ours_api.stats.answered_at], weight_tokens=False)
        results.append({"server": name, "rpm": rpm, "rows": rows, "sdk_gather": sdk, "tapir_client": ours,
                        "tapir_achieved_over_configured": round(mean / rpm, 3), "measured_s": round(span, 1),
                        "tapir_lost": rows - ours["results"],
                        "completed_per_min_ratio": round(ours["completed_per_min"] / max(sdk["completed_per_min"],
                                                                                          1e-9), 2)})
    return results


def bench_faults() -> dict:
    faults = Faults(server_error=0.05, unavailable=0.05, timeout=0.02, reset=0.03, truncated=0.025, non_json=0.025)
    api = EmulatedAPI(requests_per_minute=6000, latency_s=0.05, faults=faults, hang_s=30,
                      api_key=os.environ[KEY_ENV], seed=1)
    with api.serving_in_thread():
        result = run_workers(api, 8, 1000, "faults", 6000, UNLIMITED, max_attempts=4, timeout_s=3.0)
    ok = result["outcomes"].get("ok", 0)
    return {"fault_rate": 0.2, **result, "lost": 1000 - result["results"], "answered_rows": ok,
            "failed_rows": 1000 - ok}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--only", choices=["faults", "pacing", "models"], action="append",
                        help="run only these parts (repeatable); all by default")
    args = parser.parse_args()
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    parts = {"faults": bench_faults, "pacing": lambda: bench_pacing(args.minutes),
             "models": lambda: bench_server_models(int(120 * (args.minutes + 1)))}
    report = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "minutes": args.minutes,
              **{name: run() for name, run in parts.items() if not args.only or name in args.only}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
