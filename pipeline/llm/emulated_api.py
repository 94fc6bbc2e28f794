"""An OpenAI-compatible chat server on loopback that behaves like a paid API, for tests and benchmarks.

It enforces requests and tokens per minute (429 with Retry-After and x-ratelimit-* headers) as a chosen
real server does:

- `enforcement`: 'sliding_minute', a strict sliding 60-second window; 'slices', that window and also a
  minute's limit / 60 per `slice_s` slice of the clock (OpenAI: "60,000 requests/minute may be enforced as
  1,000 requests/second"); 'token_bucket', buckets of a minute's limit refilled continuously (Anthropic's
  documented model).
- `count_rejected`: a rejected request counts toward the limit as well (OpenAI: "unsuccessful requests
  contribute to your per-minute limit").
- `tokens_counted_as`: 'used' charges the tokens the reply uses; 'requested' charges the larger of
  max_tokens and the prompt's tokens, held for the minute (OpenAI's rule).
- `retry_after_s` replaces every 429's Retry-After (say a huge one); `reset_form` 'epoch' sends the
  x-ratelimit-reset-* headers as a Unix time instead of a duration.

It charges the tokens it reports in `usage`, adds latency, and injects faults at configured rates: 500, 503,
timeouts (no answer), slow answers (answered and billed after `hang_s`, past a client's timeout), replies
without `usage`, connection resets, truncated bodies and non-JSON bodies; `stop_listening()` refuses
connections until `listen_again()`. It answers structured-output requests (response_format json_schema)
with JSON that matches the schema, deterministically from the prompt. Everything it served is counted, so a
test can check that no paid call was lost or repeated.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

from aiohttp import web

_WINDOW_S = 60.0


@dataclass
class Faults:
    """Share of requests (0..1) that meet each fault; the rest are answered normally."""

    server_error: float = 0.0     # 500
    unavailable: float = 0.0      # 503
    timeout: float = 0.0          # never answered within the client's timeout
    reset: float = 0.0            # the connection is closed without an answer
    truncated: float = 0.0        # 200 whose body is cut off
    non_json: float = 0.0         # 200 with an HTML error page
    slow: float = 0.0             # answered (and billed) only after hang_s
    no_usage: float = 0.0         # 200 without `usage`, billed all the same

    def pick(self, rng: random.Random) -> Optional[str]:
        roll = rng.random()
        for name in ("server_error", "unavailable", "timeout", "reset", "truncated", "non_json", "slow", "no_usage"):
            roll -= getattr(self, name)
            if roll < 0:
                return name
        return None


@dataclass
class ServerStats:
    received: int = 0
    answered: int = 0                       # 200 with a valid completion: what a paid API bills
    rate_limited: int = 0
    faults: collections.Counter = field(default_factory=collections.Counter)
    answered_prompts: collections.Counter = field(default_factory=collections.Counter)
    tokens_charged: int = 0
    prompt_tokens_charged: int = 0
    completion_tokens_charged: int = 0
    answered_at: list = field(default_factory=list)    # (monotonic time, tokens) of each answered request
    arrivals: list = field(default_factory=list)       # (monotonic time, first message, status) of each request

    def billed_usd(self, input_per_million_usd: float, output_per_million_usd: float) -> float:
        """What a paid API at these prices would have billed for every answered request: the client's own
        books are checked against this, never against themselves."""
        return (self.prompt_tokens_charged * input_per_million_usd
                + self.completion_tokens_charged * output_per_million_usd) / 1e6


def count_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _from_schema(schema: dict, seed: int):
    """A value matching the small JSON schemas the pipeline uses (objects, enums, integers, strings)."""
    if "enum" in schema:
        return schema["enum"][seed % len(schema["enum"])]
    kind = schema.get("type")
    if kind == "object":
        return {name: _from_schema(sub, seed >> (3 * i)) for i, (name, sub) in
                enumerate(schema.get("properties", {}).items())}
    if kind in ("integer", "number"):
        low, high = int(schema.get("minimum", 0)), int(schema.get("maximum", 100))
        return low + seed % (high - low + 1)
    if kind == "boolean":
        return bool(seed % 2)
    return f"text {seed % 1000}"


def default_reply(body: dict) -> str:
    """Deterministic content for a request: JSON for a json_schema request, prose otherwise."""
    prompt = json.dumps(body.get("messages", []), sort_keys=True)
    seed = _digest(prompt)
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return json.dumps(_from_schema(response_format["json_schema"]["schema"], seed))
    words = min(int(body.get("max_tokens") or 64), 48)
    return " ".join(f"word{(seed >> (i % 50)) % 97}" for i in range(words))


_JUDGED_ANSWER = re.compile(r"\[The start of answer ([12])\]\n(.*?)\n\[The end of answer \1\]", re.DOTALL)
_REFUSAL = re.compile(r"^\s*I'?m sorry|^\s*I can(?:no|')t help", re.IGNORECASE)


def judge_by_length(body: dict) -> str:
    """A judge that can tell a complete answer from a damaged one, roughly: of the two answers of a pairwise judge
    prompt, a refusal scores 1, else the longer scores 8 and the shorter 3 (5 each when equal). Any other request
    gets default_reply, whose scores are a judge that answers at random."""
    answers = dict(_JUDGED_ANSWER.findall(body.get("messages", [{}])[-1].get("content", "")))
    if set(answers) != {"1", "2"}:
        return default_reply(body)

    def score(mine: str, other: str) -> int:
        if _REFUSAL.search(mine):
            return 1
        return 8 if len(mine) > len(other) else 3 if len(mine) < len(other) else 5
    return json.dumps({"score_1": score(answers["1"], answers["2"]), "score_2": score(answers["2"], answers["1"])})


class _Window(collections.deque):
    """(time, tokens) of the requests counted against the limits, with their tokens summed as they come and go.
    A minute's window at high limits holds tens of thousands of requests; summing them for every request made the
    emulator itself the bottleneck of a 50K-request benchmark, its cost per request growing with the run."""

    def __init__(self):
        super().__init__()
        self.tokens = 0

    def append(self, entry: tuple[float, int]) -> None:
        super().append(entry)
        self.tokens += entry[1]

    def extend(self, entries) -> None:
        for entry in entries:
            self.append(entry)

    def popleft(self) -> tuple[float, int]:
        entry = super().popleft()
        self.tokens -= entry[1]
        return entry


class EmulatedAPI:
    """`async with EmulatedAPI(rpm=600, tpm=100_000) as api: api.base_url`."""

    def __init__(self, requests_per_minute: int = 10_000, tokens_per_minute: int = 10_000_000,
                 latency_s: float = 0.0, latency_jitter_s: float = 0.0, faults: Optional[Faults] = None,
                 api_key: str = "test-key", hang_s: float = 3600.0, seed: int = 0, reply=default_reply,
                 enforcement: Literal["sliding_minute", "slices", "token_bucket"] = "sliding_minute",
                 slice_s: float = 1.0, count_rejected: bool = False,
                 tokens_counted_as: Literal["used", "requested"] = "used", retry_after_s: Optional[float] = None,
                 reset_form: Literal["duration", "epoch"] = "duration", clock=time.monotonic):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.enforcement, self.slice_s, self.count_rejected = enforcement, slice_s, count_rejected
        self.tokens_counted_as, self.retry_after_s, self.reset_form = tokens_counted_as, retry_after_s, reset_form
        self.clock = clock           # a test can hold the server's time still
        self._buckets = [float(requests_per_minute), float(tokens_per_minute), clock()]
        self.latency_s, self.latency_jitter_s = latency_s, latency_jitter_s
        self.faults = faults or Faults()
        self.api_key = api_key
        self.hang_s = hang_s
        self.reply = reply
        self.stats = ServerStats()
        self._rng = random.Random(seed)
        self._window = _Window()
        self._runner: Optional[web.AppRunner] = None
        self._site: Optional[web.TCPSite] = None
        self.port: Optional[int] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> "EmulatedAPI":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]
        return self

    async def stop_listening(self) -> None:
        """The endpoint goes down: connections to its port are refused."""
        await self._site.stop()

    async def listen_again(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    @contextlib.contextmanager
    def serving_in_thread(self):
        """Runs the server on its own event loop in a thread, for callers that are not async (Ray drivers)."""
        loop = asyncio.new_event_loop()
        ready, stop = threading.Event(), asyncio.Event()

        async def serve():
            async with self:
                ready.set()
                await stop.wait()

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
        thread.start()
        ready.wait(timeout=30)
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=30)

    def _usage_in_window(self, now: float) -> tuple[int, int]:
        while self._window and self._window[0][0] <= now - _WINDOW_S:
            self._window.popleft()
        return len(self._window), self._window.tokens

    def _limit_headers(self, now: float) -> dict:
        requests, tokens = self._usage_in_window(now)
        reset = (self._window[0][0] + _WINDOW_S - now) if self._window else 0.0
        reset_text = f"{time.time() + reset:.0f}" if self.reset_form == "epoch" else f"{reset:.3f}s"
        return {"x-ratelimit-limit-requests": str(self.rpm), "x-ratelimit-limit-tokens": str(self.tpm),
                "x-ratelimit-remaining-requests": str(max(0, self.rpm - requests)),
                "x-ratelimit-remaining-tokens": str(max(0, self.tpm - tokens)),
                "x-ratelimit-reset-requests": reset_text, "x-ratelimit-reset-tokens": reset_text}

    def _slice_limits(self) -> tuple[float, float]:
        share = self.slice_s / _WINDOW_S
        return max(1.0, float(int(self.rpm * share))), max(1.0, float(int(self.tpm * share)))

    def _admit_wait(self, now: float, tokens: int) -> float:
        """0 when a request of `tokens` may be served now, else the seconds until it could be."""
        if self.enforcement == "token_bucket":
            requests, bucket_tokens, _ = self._refilled(now)
            short = max((1 - requests) / (self.rpm / _WINDOW_S), (tokens - bucket_tokens) / (self.tpm / _WINDOW_S))
            return max(0.0, short) if requests < 1 or bucket_tokens < min(tokens, self.tpm) else 0.0
        requests_used, tokens_used = self._usage_in_window(now)
        wait = self._retry_after(now, tokens) if (requests_used + 1 > self.rpm or tokens_used + tokens > self.tpm) \
            else 0.0
        if self.enforcement == "slices":
            slice_start = now - now % self.slice_s
            inside = [charged for at, charged in self._window if at >= slice_start]
            max_requests, max_tokens = self._slice_limits()
            if inside and (len(inside) + 1 > max_requests or sum(inside) + tokens > max_tokens):
                wait = max(wait, slice_start + self.slice_s - now)
        return wait

    def _refilled(self, now: float) -> list:
        """The token buckets, refilled up to a minute's limit for the time since they were last looked at."""
        requests, tokens, then = self._buckets
        elapsed = now - then
        self._buckets = [min(self.rpm, requests + elapsed * self.rpm / _WINDOW_S),
                         min(self.tpm, tokens + elapsed * self.tpm / _WINDOW_S), now]
        return self._buckets

    def _count(self, now: float, tokens: int) -> None:
        """Counts a request against the limits."""
        self._window.append((now, tokens))
        if self.enforcement == "token_bucket":
            requests, bucket_tokens, _ = self._refilled(now)
            self._buckets[:2] = [max(0.0, requests - 1), max(0.0, bucket_tokens - tokens)]

    def _retry_after(self, now: float, tokens: int) -> float:
        """Seconds until the window has room for one more request of `tokens`."""
        requests_used, tokens_used = self._usage_in_window(now)
        wait = 0.0
        freed_requests = freed_tokens = 0
        for at, charged in self._window:
            if requests_used - freed_requests < self.rpm and tokens_used - freed_tokens + tokens <= self.tpm:
                break
            freed_requests, freed_tokens = freed_requests + 1, freed_tokens + charged
            wait = at + _WINDOW_S - now
        return max(wait, 0.001)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.stats.received += 1
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided."}}, status=401)
        try:
            body = await request.json()
            messages = body["messages"]
        except (ValueError, KeyError):
            return web.json_response({"error": {"message": "body must be JSON with 'messages'"}}, status=400)
        content = self.reply(body)
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages)
        completion_tokens = min(count_tokens(content), int(body.get("max_tokens") or 10**9))   # billed at most
        tokens = prompt_tokens + completion_tokens
        charged = max(int(body.get("max_tokens") or 0), prompt_tokens) if self.tokens_counted_as == "requested" \
            else tokens
        now = self.clock()
        first = str(messages[0].get("content", "")) if messages else ""
        if (wait := self._admit_wait(now, charged)) > 0:
            self.stats.rate_limited += 1
            self.stats.arrivals.append((now, first, 429))
            if self.count_rejected:
                self._count(now, charged if self.tokens_counted_as == "requested" else 0)
            retry_after = self.retry_after_s if self.retry_after_s is not None else max(wait, 0.001)
            headers = {**self._limit_headers(now), "Retry-After": f"{retry_after:.3f}"}
            return web.json_response({"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                     status=429, headers=headers)
        self.stats.arrivals.append((now, first, 200))
        self._count(now, charged)              # on arrival: requests that arrive meanwhile see it
        fault = self.faults.pick(self._rng)
        if fault not in ("timeout", "slow"):
            await asyncio.sleep(self.latency_s + self._rng.uniform(0, self.latency_jitter_s))
        if fault not in (None, "slow", "no_usage"):
            self.stats.faults[fault] += 1
            return await self._fault(fault, request)
        if fault is not None:
            self.stats.faults[fault] += 1
        if fault == "slow":
            await asyncio.sleep(self.hang_s)         # generated and billed even when the client gave up waiting
        self.stats.answered += 1
        self.stats.tokens_charged += tokens
        self.stats.prompt_tokens_charged += prompt_tokens
        self.stats.completion_tokens_charged += completion_tokens
        self.stats.answered_prompts[json.dumps(messages, sort_keys=True)] += 1
        self.stats.answered_at.append((now, tokens))
        usage = {} if fault == "no_usage" else {"usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": tokens}}
        return web.json_response({
            "id": f"chatcmpl-{self.stats.answered}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            **usage}, headers=self._limit_headers(now))

    async def _fault(self, fault: str, request: web.Request) -> web.StreamResponse:
        if fault == "server_error":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if fault == "unavailable":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if fault == "timeout":
            await asyncio.sleep(self.hang_s)
            return web.json_response({"error": {"message": "too late"}}, status=504)
        if fault == "non_json":
            return web.Response(text="<html><body>Bad gateway</body></html>", content_type="text/html")
        if fault == "reset":
            request.transport.close()
            return web.Response(status=500)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                           "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b'{"id": "chatcmpl-cut", "choices": [{"message": {"content": "par')
        request.transport.close()
        return response
