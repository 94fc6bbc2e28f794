"""Opens a page in headless Chromium (Debian's `chromium` package) and reports on its images, through the Chrome
DevTools Protocol over aiohttp's websocket client; for tests that must see a page as a browser does."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

CHROMIUM = "chromium"
INSTALL_HINT = "apt-get install chromium (Debian's package; `make test` installs it)"
_IMAGES = "Array.from(document.images).map(i => [i.src.slice(0, 30), i.complete && i.naturalWidth > 0])"


@dataclass
class PageImages:
    ready_state: str              # document.readyState once the load event fired
    title: str
    images: list[tuple[str, bool]]  # (start of src, loaded: complete with a natural width)


def images_of(path: Path, timeout_s: float = 30.0) -> PageImages:
    """Loads the local file `path` in a fresh headless Chromium and returns what became of its images."""
    binary = shutil.which(CHROMIUM)
    if binary is None:
        raise RuntimeError(f"`{CHROMIUM}` is not on PATH: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="tapir-chromium-") as profile:
        # port 0: Chromium picks a free port and writes it to DevToolsActivePort in the profile directory; its own
        # session, so that its helper processes (zygote, renderer, crash handler) end with it
        browser = subprocess.Popen(
            [binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--no-default-browser-check", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            port = _debugging_port(Path(profile) / "DevToolsActivePort", browser, timeout_s)
            return asyncio.run(asyncio.wait_for(_inspect(port, path.resolve().as_uri()), timeout_s))
        finally:
            _stop(browser)


def _stop(browser: subprocess.Popen) -> None:
    """Ends the browser and every process of its session, before its profile directory is removed."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            browser.poll()
            try:
                os.killpg(browser.pid, 0)       # is any process of the session left?
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _debugging_port(active_port: Path, browser: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if browser.poll() is not None:
            raise RuntimeError(f"chromium exited with {browser.returncode} before it listened:\n"
                               f"{browser.stderr.read().decode(errors='replace')[-2000:]}")
        lines = active_port.read_text().splitlines() if active_port.exists() else []
        if lines and lines[0].isdigit():
            return int(lines[0])
        time.sleep(0.1)
    raise RuntimeError(f"chromium wrote no {active_port} within {timeout_s:.0f} s")


async def _inspect(port: int, url: str) -> PageImages:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _Session(ws)
            await cdp.call("Page.enable")
            navigated = await cdp.call("Page.navigate", url=url)
            if navigated.get("errorText"):
                raise RuntimeError(f"{url}: {navigated['errorText']}")
            await cdp.event("Page.loadEventFired")
            state = await cdp.evaluate("[document.readyState, document.title]")
            images = await cdp.evaluate(_IMAGES)
            return PageImages(state[0], state[1], [(src, loaded) for src, loaded in images])


class _Session:
    """Commands and events of one DevTools websocket: a command's reply matched by its id, events kept in
    arrival order until asked for."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self._ws, self._next_id, self._events = ws, 0, []

    async def _receive(self) -> dict:
        message = await self._ws.receive()
        if message.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"DevTools connection ended: {message.type!r} {message.data!r}")
        return json.loads(message.data)

    async def call(self, method: str, **params) -> dict:
        self._next_id += 1
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            reply = await self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self._events.append(reply)

    async def event(self, method: str) -> dict:
        while True:
            for index, event in enumerate(self._events):
                if event["method"] == method:
                    return self._events.pop(index)
            reply = await self._receive()
            if "method" in reply:
                self._events.append(reply)

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"]["value"]
