"""The async client of an OpenAI-compatible `/v1/chat/completions` endpoint (the teacher and the judge).

One aiohttp session per client, reused across requests. The API key is sent as a bearer header and
is kept in a Secret, so it appears in no repr, exception or log line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp

from pipeline.llm.secret import Secret

_ERROR_BODY_CHARS = 500


class EndpointError(RuntimeError):
    """A request the endpoint answered with an error, or did not answer properly."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChatResult:
    content: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int


class ChatClient:
    """`async with ChatClient(url, model, key) as client: await client.complete(messages)`."""

    def __init__(self, base_url: str, model: str, api_key: Secret, timeout_s: float):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: Optional[aiohttp.ClientSession] = None

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    async def __aenter__(self) -> "ChatClient":
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, headers={"Authorization": f"Bearer {self._api_key.reveal()}"})
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def complete(self, messages: list[dict], max_tokens: int = 512, temperature: float = 0.0,
                       **extra: Any) -> ChatResult:
        if self._session is None:
            raise RuntimeError("use the client inside `async with`")
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, **extra}
        async with self._session.post(self.url, json=body) as response:
            text = await response.text()
            if response.status != 200:
                raise EndpointError(f"{self.url} answered {response.status}: {text[:_ERROR_BODY_CHARS]}",
                                    response.status)
        return _parse_completion(self.url, text)


def _parse_completion(url: str, text: str) -> ChatResult:
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return ChatResult(content=choice["message"]["content"] or "", finish_reason=choice.get("finish_reason"),
                          prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)))
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise EndpointError(f"{url} sent a response that is not a chat completion ({err!r}): "
                            f"{text[:_ERROR_BODY_CHARS]}") from None
