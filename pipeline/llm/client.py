"""The async client of an OpenAI-compatible `/v1/chat/completions` endpoint: every teacher and judge call.

One aiohttp session per client (connection reuse), a timeout per request, and for each request:
a lease from the run's shared limits (requests/min, tokens/min, budget), then the call; a 429 pauses every
worker of the endpoint for its Retry-After; 408/409/5xx, timeouts, resets, truncated and unparseable
bodies are retried with exponential backoff and jitter; any other 4xx fails at once with the server's
message. After `max_attempts` the request fails with its last reason: the caller marks the row, it is
never dropped and never retried forever. The API key is kept in a Secret: it is in no repr, exception
or log line.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import aiohttp

from pipeline.config import EndpointConfig
from pipeline.llm.limits import BudgetExceeded
from pipeline.llm.secret import Secret
from pipeline.llm.shared_limits import Limits, endpoint_key

log = logging.getLogger(__name__)

_ERROR_BODY_CHARS = 500
_RETRYABLE_STATUS = {408, 409, 429}
_BACKOFF_BASE_S = 0.5
_BACKOFF_CAP_S = 30.0
_CHARS_PER_TOKEN = 3     # a prompt-size estimate that errs high for English, so the token lease is not short


class EndpointError(RuntimeError):
    """The endpoint is unusable as configured (wrong URL, key or model): no request can succeed."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class RequestFailed(RuntimeError):
    """One request that did not succeed; `reason` is a short code for counting, the message is for people."""

    def __init__(self, reason: str, detail: str, attempts: int, status: Optional[int] = None):
        super().__init__(f"{reason} after {attempts} attempt(s): {detail}")
        self.reason, self.detail, self.attempts, self.status = reason, detail, attempts, status


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    max_tokens: int = 512
    temperature: float = 0.0
    json_schema: Optional[dict] = None      # ask for structured output that matches this schema
    stage: str = "default"                  # usage and cost are summed per stage


@dataclass(frozen=True)
class ChatReply:
    content: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    attempts: int


def estimate_prompt_tokens(messages: list[dict]) -> int:
    return sum(len(str(m.get("content", ""))) // _CHARS_PER_TOKEN + 4 for m in messages) + 2


def _plain_seconds(value: str) -> Optional[float]:
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    if (seconds := _plain_seconds(value)) is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: Optional[str]) -> Optional[float]:
    """Seconds from an x-ratelimit-reset-* header: '20ms', '1s', '6m0s', or a plain number of seconds."""
    if not value:
        return None
    if (seconds := _plain_seconds(value)) is not None:
        return seconds
    parts = _DURATION.findall(value)
    return sum(float(n) * _UNIT_S[unit] for n, unit in parts) if parts else None


def exhausted_for(headers) -> Optional[float]:
    """How long the rate-limit headers say no request can succeed (remaining 0), if they say so."""
    waits = []
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is not None and remaining.strip() in ("0", "0.0"):
            reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
            waits.append(reset if reset is not None else 1.0)
    return max(waits) if waits else None


def backoff_s(attempt: int) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, so retries spread out."""
    ceiling = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class _Transient(Exception):
    def __init__(self, reason: str, detail: str, status: Optional[int] = None, wait_s: Optional[float] = None):
        super().__init__(detail)
        self.reason, self.detail, self.status, self.wait_s = reason, detail, status, wait_s


class ChatClient:
    """`async with ChatClient(endpoint_config, base_url, api_key, limits) as client: await client.complete(req)`.

    Create it inside the event loop that uses it (in a Ray actor: on the first call, not in __init__).
    """

    def __init__(self, endpoint: EndpointConfig, base_url: str, api_key: Secret, limits: Limits,
                 model: Optional[str] = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model or endpoint.served_model
        self.config = endpoint
        self.limits = limits
        self.limits_key = endpoint_key(endpoint)
        self._api_key = api_key
        self._session: Optional[aiohttp.ClientSession] = None
        self._in_flight = asyncio.Semaphore(endpoint.max_concurrency)
        self._structured = True

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    async def __aenter__(self) -> "ChatClient":
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers={"Authorization": f"Bearer {self._api_key.reveal()}"},
            connector=aiohttp.TCPConnector(limit=self.config.max_concurrency))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _body(self, request: ChatRequest) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": request.messages,
                                "max_tokens": request.max_tokens, "temperature": request.temperature}
        if request.json_schema is not None and self._structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": request.json_schema}}
        return body

    async def complete(self, request: ChatRequest) -> ChatReply:
        """One request, retried as the module doc says. Raises RequestFailed, EndpointError or BudgetExceeded."""
        if self._session is None:
            raise RuntimeError("use the client inside `async with`")
        estimate = estimate_prompt_tokens(request.messages) + request.max_tokens
        last: Optional[_Transient] = None
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                async with self._in_flight:
                    return await self._attempt(request, estimate, attempt)
            except _Transient as transient:
                last = transient
                if attempt == self.config.max_attempts:
                    break
                if transient.status == 429:
                    wait = transient.wait_s if transient.wait_s is not None else backoff_s(attempt)
                    await self.limits.pause_for(self.limits_key, wait)   # every worker of this endpoint waits
                else:
                    await asyncio.sleep(backoff_s(attempt))
        raise RequestFailed(last.reason, last.detail, self.config.max_attempts, last.status)

    async def _attempt(self, request: ChatRequest, estimate: int, attempt: int) -> ChatReply:
        reservation = await self.limits.reserve(self.limits_key, estimate, request.max_tokens)
        prompt_tokens = completion_tokens = 0
        ok = rate_limited = False
        try:
            try:
                async with self._session.post(self.url, json=self._body(request)) as response:
                    status, headers = response.status, response.headers
                    text = await response.text()
            except asyncio.TimeoutError:
                raise _Transient("timeout", f"no answer within {self.config.timeout_s:.0f} s") from None
            except aiohttp.ClientPayloadError as err:
                raise _Transient("truncated", f"the response body was cut off ({err})") from None
            except aiohttp.ClientError as err:
                raise _Transient("connection", f"{type(err).__name__}: {err}") from None
            if (pause := exhausted_for(headers)) is not None:
                await self.limits.pause_for(self.limits_key, pause)
            if status == 429:
                rate_limited = True
                raise _Transient("rate_limited", f"429: {text[:_ERROR_BODY_CHARS]}", 429,
                                 parse_retry_after(headers.get("Retry-After")))
            if status in _RETRYABLE_STATUS or status >= 500:
                raise _Transient(f"http_{status}", f"{status}: {text[:_ERROR_BODY_CHARS]}", status)
            if status == 400 and self._structured and request.json_schema is not None and "response_format" in text:
                log.warning("%s does not accept response_format; parsing free-form answers instead", self.url)
                self._structured = False
                raise _Transient("no_structured_output", text[:_ERROR_BODY_CHARS], status)
            if status in (401, 403, 404):
                raise EndpointError(f"{self.url} answered {status}: {text[:_ERROR_BODY_CHARS]} (check base_url, "
                                    f"model and ${self.config.api_key_env})", status)
            if status != 200:
                raise RequestFailed(f"http_{status}", f"{status}: {text[:_ERROR_BODY_CHARS]}", attempt, status)
            reply = _parse_completion(text, attempt)
            prompt_tokens, completion_tokens, ok = reply.prompt_tokens, reply.completion_tokens, True
            return reply
        finally:
            await self.limits.settle(self.limits_key, reservation, request.stage, prompt_tokens,
                                     completion_tokens, ok, rate_limited)

    async def complete_all(self, requests: list[ChatRequest]) -> list[Union[ChatReply, RequestFailed]]:
        """All requests concurrently; each gets its reply or the reason it failed, in order.

        When the budget is reached, requests not yet sent fail with reason 'budget_exceeded' and
        BudgetExceeded is raised after the others finish, so the caller keeps what was answered.
        """
        budget: list[BudgetExceeded] = []

        async def one(request: ChatRequest) -> Union[ChatReply, RequestFailed]:
            if budget:
                return RequestFailed("budget_exceeded", str(budget[0]), 0)
            try:
                return await self.complete(request)
            except RequestFailed as failed:
                return failed
            except BudgetExceeded as err:
                budget.append(err)
                return RequestFailed("budget_exceeded", str(err), 0)

        results = await asyncio.gather(*(one(r) for r in requests))
        if budget:
            raise BudgetExceededWithResults(budget[0], results)
        return results


class BudgetExceededWithResults(BudgetExceeded):
    """The budget stopped a batch; `results` holds the replies that came and the rows left unsent."""

    def __init__(self, cause: BudgetExceeded, results: list):
        super().__init__(str(cause))
        self.results = results


def _parse_completion(text: str, attempt: int) -> ChatReply:
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return ChatReply(content=choice["message"]["content"] or "", finish_reason=choice.get("finish_reason"),
                         prompt_tokens=int(usage.get("prompt_tokens", 0)),
                         completion_tokens=int(usage.get("completion_tokens", 0)), attempts=attempt)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _Transient("bad_response", f"not a chat completion ({type(err).__name__}): "
                         f"{text[:_ERROR_BODY_CHARS]}") from None
