"""The ceiling of the run's limits actor (pipeline/llm/shared_limits.py): leases a second, and what a lease adds.

Every teacher and judge request of the cluster leases from one named actor (a reservation before the request,
a settle after it). This measures that actor alone, as the endpoint stages call it: caller Ray actors (async,
as the stages' actors are), each running its share of the concurrent callers as coroutines; each caller leases
(RayLimits.reserve), then settles the lease as answered (RayLimits.settle), and again, for --seconds. The
endpoint's limits are far above what is reached (10M requests and 10G tokens a minute), so every lease is booked
at once and what is measured is the actor's own cost; the run's budget is on (a cap no lease reaches) with its
spend record written to a temporary run directory, as in a real run.

Two designs side by side, each on a fresh actor: 'per-request' (before issue 22: one actor call per reserve and
per settle) and 'batched' (RayLimits now: each process's calls go to the actor in batches, one call in flight).
Reported per design and number of concurrent callers (8, 32, 128 by default): leases a second over the whole run (reserve
and settle both done), and the latency of the reserve call and of the whole lease (reserve + settle), p50 and
p99, in milliseconds. The load average is recorded before and after: the machine may be shared.

    nice -n 19 .venv/bin/python benchmarks/bench_limits_actor.py [--callers 8 32 128] [--seconds 10]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import store  # noqa: E402
from pipeline.config import EndpointConfig  # noqa: E402
from pipeline.llm.shared_limits import RayLimits, _call_actor, endpoint_key, shared_limits  # noqa: E402
from pipeline.llm.spend import SpendRecord  # noqa: E402

CALLER_ACTORS = 4          # Ray Data actors of the endpoint stages that share the limits (teacher + judge stages)


class PerRequestLimits(RayLimits):
    """The design before issue 22, as the baseline: one actor call per reserve, settle and pause."""

    async def _batched(self, method: str, *args):
        return await _call_actor(self.actor, method, *args)


DESIGNS = {"per-request": PerRequestLimits, "batched": RayLimits}


class Caller:
    """One caller actor: `coroutines` callers leasing and settling in a loop, as an endpoint stage's requests do."""

    def __init__(self, limits):
        self.limits = limits

    async def run(self, key: str, coroutines: int, seconds: float) -> dict:
        reserve_ms, lease_ms = [], []
        stop = time.monotonic() + seconds

        async def one() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                reservation = await self.limits.reserve(key, 200, 200)
                t1 = time.perf_counter()
                await self.limits.settle(key, reservation, "bench", "ok", 200, 100)
                t2 = time.perf_counter()
                reserve_ms.append((t1 - t0) * 1e3)
                lease_ms.append((t2 - t0) * 1e3)

        await asyncio.gather(*(one() for _ in range(coroutines)))
        return {"reserve_ms": reserve_ms, "lease_ms": lease_ms}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(callers: int, seconds: float, run_dir: str, label: str) -> dict:
    import ray

    endpoint = EndpointConfig(requests_per_minute=10_000_000, tokens_per_minute=10_000_000_000)
    record = SpendRecord(store.locate(run_dir))
    limits = DESIGNS[label](shared_limits(f"bench-{label}-{callers}", [endpoint], max_cost_usd=1e9,
                                          record=record).actor)
    actors = [ray.remote(num_cpus=0, max_concurrency=max(1, callers // CALLER_ACTORS) + 1)(Caller).remote(limits)
              for _ in range(min(CALLER_ACTORS, callers))]
    shares = [callers // len(actors) + (i < callers % len(actors)) for i in range(len(actors))]
    ray.get([a.run.remote(endpoint_key(endpoint), 1, 0.5) for a in actors])        # warm up: imports, handles
    start = time.monotonic()
    results = ray.get([a.run.remote(endpoint_key(endpoint), share, seconds) for a, share in zip(actors, shares)])
    elapsed = time.monotonic() - start
    reserve = [v for r in results for v in r["reserve_ms"]]
    lease = [v for r in results for v in r["lease_ms"]]
    for a in actors:
        ray.kill(a)
    ray.kill(limits.actor)
    return {"design": label, "callers": callers, "leases": len(lease), "seconds": round(elapsed, 2),
            "leases_per_s": round(len(lease) / elapsed, 1),
            "reserve_p50_ms": round(statistics.median(reserve), 2), "reserve_p99_ms": round(percentile(reserve, 0.99), 2),
            "lease_p50_ms": round(statistics.median(lease), 2), "lease_p99_ms": round(percentile(lease, 0.99), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="bench-limits", log_to_driver=False)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for callers in args.callers:
            for label in DESIGNS:         # old and new side by side, each on its own fresh actor
                rows.append(measure(callers, args.seconds, run_dir, label))
                print(json.dumps(rows[-1]), flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
