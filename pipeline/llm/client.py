"""The async client of an OpenAI-compatible `/v1/chat/completions` endpoint: every teacher and judge call.

One aiohttp session per client (connection reuse), a timeout per request, and for each request:
a lease from the run's shared limits (requests/min, tokens/min, budget), then the call; a 429 pauses every
worker of the endpoint for its Retry-After (a pause longer than `max_pause_s` is logged and fails the
request as 'rate_limited' instead); 408/409/5xx, resets, truncated and unparseable bodies are retried with
exponential backoff and jitter; a timeout is retried only with `retry_timeouts` (the server may have billed
it); any other 4xx fails at once with the server's message. After `max_attempts` the request fails with its
last reason: the caller marks the row, it is never dropped and never retried forever. After
`max_connection_failures` consecutive connection failures of the endpoint (any worker) every request
raises EndpointError naming the URL.

Money is never under-counted: an attempt whose usage is unknown (a timeout, a reset after the request was
sent, a cut-off body) and a reply without `usage` are booked at their worst case (prompt estimate +
max_tokens) and counted as `usage_estimated`; an attempt that never connected costs nothing. The API key
is kept in a Secret: it is in no repr, exception or log line.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Optional, TypeVar, Union

import aiohttp

from pipeline.config import EndpointConfig
from pipeline.errors import UserError
from pipeline.llm.limits import BudgetExceeded, EndpointDown, Outcome, PausedTooLong
from pipeline.llm.secret import Secret
from pipeline.llm.shared_limits import Limits, endpoint_key

if TYPE_CHECKING:
    from pipeline.llm.carried import CarriedReplies

log = logging.getLogger(__name__)
T = TypeVar("T")

_ERROR_BODY_CHARS = 500
BUDGET_REFUSED = "budget_exceeded"       # the reason of a request the budget did not let go
_RETRYABLE_STATUS = {408, 409, 429}
_BACKOFF_BASE_S = 0.5
_BACKOFF_CAP_S = 30.0
_CHARS_PER_TOKEN = 3     # a prompt-size estimate that errs high for English, so the token lease is not short


class EndpointError(UserError, RuntimeError):
    """The endpoint is unusable as configured (wrong URL, key or model): no request can succeed."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class RequestFailed(UserError, RuntimeError):
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
    usage_estimated: bool = False           # the server reported no usage: the tokens are the worst case


def request_key(model: str, request: ChatRequest) -> str:
    """What makes two requests the same call to a server (the stage's name does not)."""
    text = json.dumps([model, request.messages, request.max_tokens, request.temperature, request.json_schema],
                      sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


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


_EPOCH_AFTER_S = 1e9         # a plain number this large is a Unix time (2001 on), not a duration


def parse_reset(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds from an x-ratelimit-reset-* header: '20ms', '1s', '6m0s', a plain number of seconds, or a Unix
    time. Any other form is ignored with a warning (None)."""
    if not value:
        return None
    if (seconds := _plain_seconds(value)) is not None:
        if seconds >= _EPOCH_AFTER_S:
            return max(0.0, seconds - (now if now is not None else time.time()))
        return seconds
    if re.fullmatch(f"(?:{_DURATION.pattern})+", value.strip()):
        return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(value))
    log.warning("ignoring a rate-limit reset header in a form not understood: %r", value[:64])
    return None


def exhausted_for(headers, kind: str) -> Optional[float]:
    """How long the rate-limit headers of `kind` (requests, tokens) say no request can succeed (remaining 0),
    if they say so."""
    remaining = headers.get(f"x-ratelimit-remaining-{kind}")
    if remaining is None or remaining.strip() not in ("0", "0.0"):
        return None
    reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
    return reset if reset is not None else 1.0


def backoff_s(attempt: int) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, so retries spread out."""
    ceiling = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class _Transient(Exception):
    """A failed attempt; `final`: sending it again would not help, or could pay for it twice."""

    def __init__(self, reason: str, detail: str, status: Optional[int] = None, wait_s: Optional[float] = None,
                 final: bool = False):
        super().__init__(detail)
        self.reason, self.detail, self.status, self.wait_s, self.final = reason, detail, status, wait_s, final


class ChatClient:
    """`async with ChatClient(endpoint_config, base_url, api_key, limits) as client: await client.complete(req)`.

    Create it inside the event loop that uses it (in a Ray actor: on the first call, not in __init__).
    """

    def __init__(self, endpoint: EndpointConfig, base_url: str, api_key: Secret, limits: Limits,
                 model: Optional[str] = None, carried: Optional["CarriedReplies"] = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model or endpoint.served_model
        self.config = endpoint
        self.limits = limits
        self.limits_key = endpoint_key(endpoint)
        self._api_key = api_key
        self._session: Optional[aiohttp.ClientSession] = None
        self._in_flight = asyncio.Semaphore(endpoint.max_concurrency)
        self._structured = True
        self._warned_no_usage = False
        self.carried = carried
        self._carried_keys: set[str] = set()

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    async def __aenter__(self) -> "ChatClient":
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers={"Authorization": f"Bearer {self._api_key.reveal()}"},
            connector=aiohttp.TCPConnector(limit=self.config.max_concurrency))
        if self.carried is not None:
            self._carried_keys = self.carried.keys()
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
        if self._carried_keys:
            key = request_key(self.model, request)
            if key in self._carried_keys:
                self._carried_keys.discard(key)
                if (reply := self.carried.take(key)) is not None:
                    return reply
        prompt_estimate = estimate_prompt_tokens(request.messages)
        last: Optional[_Transient] = None
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                async with self._in_flight:
                    return await self._attempt(request, prompt_estimate, attempt)
            except _Transient as transient:
                last = transient
                if transient.status == 429 and not transient.final:
                    # every worker of this endpoint waits, whether or not this request is tried again
                    wait = transient.wait_s if transient.wait_s is not None else backoff_s(attempt)
                    await self.limits.pause_for(self.limits_key, wait)
                if attempt == self.config.max_attempts or transient.final:
                    break
                if transient.status != 429:          # after a 429 the lease waits out the pause
                    await asyncio.sleep(backoff_s(attempt))
        raise RequestFailed(last.reason, last.detail, attempt, last.status)

    def keep_paid(self, request: ChatRequest, reply: ChatReply) -> None:
        """Keeps a paid reply that its caller cannot write (a budget refusal left its row out) for the command
        that asks the same request again (pipeline/llm/carried.py)."""
        if self.carried is not None:
            self.carried.keep(self.model, request, reply)

    async def _pause_too_long(self, seconds: float, header: str) -> bool:
        """A pause past max_pause_s is logged and kept (every worker's requests then fail as rate_limited)."""
        if seconds <= self.config.max_pause_s:
            return False
        log.warning("%s asked for a pause of %.0f s (%s), longer than max_pause_s=%g: the rows waiting on it "
                    "fail as rate_limited", self.url, seconds, header, self.config.max_pause_s)
        await self.limits.pause_for(self.limits_key, seconds)
        return True

    async def _attempt(self, request: ChatRequest, prompt_estimate: int, attempt: int) -> ChatReply:
        try:
            reservation = await self.limits.reserve(self.limits_key, prompt_estimate, request.max_tokens)
        except PausedTooLong as err:
            raise _Transient("rate_limited", f"{self.url}: {err}", 429, final=True) from None
        except EndpointDown as err:
            raise EndpointError(f"{self.url} is not reachable ({err}); start it or correct base_url, then run "
                                f"the same command again") from None
        worst = (prompt_estimate, request.max_tokens)
        outcome: Outcome = "unknown"           # until the server's answer says otherwise
        billed = worst
        try:
            try:
                async with self._session.post(self.url, json=self._body(request)) as response:
                    status, headers = response.status, response.headers
                    text = await response.text()
            except asyncio.TimeoutError:
                raise _Transient("timeout", f"no answer within {self.config.timeout_s:.0f} s",
                                 final=not self.config.retry_timeouts) from None
            except aiohttp.ClientPayloadError as err:
                raise _Transient("truncated", f"the response body was cut off ({err})") from None
            except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as err:       # the server never saw it
                outcome, billed = "unreached", (0, 0)
                raise _Transient("connection", f"{type(err).__name__}: {err}") from None
            except aiohttp.ClientError as err:
                raise _Transient("connection", f"{type(err).__name__}: {err}") from None
            outcome, billed = "failed", (0, 0)
            for kind in ("requests", "tokens"):
                if (pause := exhausted_for(headers, kind)) is not None:
                    if not await self._pause_too_long(pause, f"x-ratelimit-reset-{kind}: "
                                                             f"{headers.get(f'x-ratelimit-reset-{kind}')}"):
                        await self.limits.pause_for(self.limits_key, pause)
            if status == 429:
                outcome = "rate_limited"
                retry_after = headers.get("Retry-After")
                wait = parse_retry_after(retry_after)
                too_long = wait is not None and await self._pause_too_long(wait, f"Retry-After: {retry_after}")
                raise _Transient("rate_limited", f"429: {text[:_ERROR_BODY_CHARS]}", 429, wait, final=too_long)
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
            reply = _parse_completion(text, attempt, worst)
            if reply.usage_estimated and not self._warned_no_usage:
                log.warning("%s answered without usage: such replies are counted at their worst case "
                            "(prompt estimate + max_tokens)", self.url)
                self._warned_no_usage = True
            outcome = "estimated" if reply.usage_estimated else "ok"
            billed = (reply.prompt_tokens, reply.completion_tokens)
            return reply
        finally:
            await self.limits.settle(self.limits_key, reservation, request.stage, outcome, *billed)

    async def complete_all(self, requests: list[ChatRequest]) -> list[Union[ChatReply, RequestFailed]]:
        """All requests concurrently; each gets its reply or the reason it failed, in order.

        When the budget is reached, requests not yet sent fail with reason 'budget_exceeded' and
        BudgetExceeded is raised after the others finish, so the caller keeps what was answered.
        """
        budget: list[BudgetExceeded] = []

        async def one(request: ChatRequest) -> Union[ChatReply, RequestFailed]:
            if budget:
                return RequestFailed(BUDGET_REFUSED, str(budget[0]), 0)
            try:
                return await self.complete(request)
            except RequestFailed as failed:
                return failed
            except BudgetExceeded as err:
                budget.append(err)
                return RequestFailed(BUDGET_REFUSED, str(err), 0)

        results = await asyncio.gather(*(one(r) for r in requests))
        if budget:
            raise BudgetExceededWithResults(budget[0], results)
        return results


async def unless_refused(call: Awaitable[T]) -> Union[T, RequestFailed]:
    """What `call` gives, or a RequestFailed with reason 'budget_exceeded' when the budget refused it: the
    caller keeps the batch's other answers, which were paid for."""
    try:
        return await call
    except BudgetExceeded as refused:
        return RequestFailed(BUDGET_REFUSED, str(refused), 0)


class BudgetExceededWithResults(BudgetExceeded):
    """The budget stopped a batch; `results` holds the replies that came and the rows left unsent."""

    def __init__(self, cause: BudgetExceeded, results: list):
        super().__init__(str(cause))
        self.results = results


def _parse_completion(text: str, attempt: int, worst: tuple[int, int]) -> ChatReply:
    """`worst`: (prompt, completion) tokens to bill when the reply reports no usage."""
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        reported = "prompt_tokens" in usage and "completion_tokens" in usage
        prompt, completion = (int(usage["prompt_tokens"]), int(usage["completion_tokens"])) if reported else worst
        return ChatReply(content=choice["message"]["content"] or "", finish_reason=choice.get("finish_reason"),
                         prompt_tokens=prompt, completion_tokens=completion, attempts=attempt,
                         usage_estimated=not reported)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _Transient("bad_response", f"not a chat completion ({type(err).__name__}): "
                         f"{text[:_ERROR_BODY_CHARS]}") from None
