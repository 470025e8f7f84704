"""A small Chrome DevTools Protocol client for headless Chromium, over C{--remote-debugging-pipe}.

Chromium reads commands on its fd 3 and writes answers and events on its fd 4, each one JSON
message ended by a NUL byte: no WebSocket and no port to guess.  Twisted's C{spawnProcess}
maps those descriptors (C{childFDs}), so the client runs on the test's reactor beside the
service under test.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(Exception):
    pass


class Chromium(ProcessProtocol):
    """One headless Chromium; L{call} sends a command and fires with its result."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.buffer = b""
        self.next_id = 0
        self.pending: dict[int, Deferred[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.output = b""
        self.ended: Deferred[None] = Deferred()
        self.session: str | None = None

    @classmethod
    def launch(cls, reactor: Any, binary: str, profile: str, width: int = 1200,
               height: int = 800) -> Chromium:
        proto = cls(reactor)
        args = [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update",
                "--no-proxy-server", "--hide-scrollbars", "--mute-audio",
                f"--window-size={width},{height}", "about:blank"]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["HOME"] = profile
        reactor.spawnProcess(proto, binary, args, env=env,
                             childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"})
        return proto

    # -- process -------------------------------------------------------------------------

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 4:
            self.output = (self.output + data)[-20000:]
            return
        self.buffer += data
        while b"\0" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            if "id" in message and message["id"] in self.pending:
                d = self.pending.pop(message["id"])
                if "error" in message:
                    d.errback(CDPError(f"{message['error'].get('message')}"))
                else:
                    d.callback(message.get("result", {}))
            else:
                self.events.append(message)

    def processEnded(self, reason: Failure) -> None:
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(CDPError("chromium exited: " + self.output.decode("utf-8", "replace")[-2000:]))
        self.ended.callback(None)

    # -- protocol ------------------------------------------------------------------------

    def call(self, method: str, session: str | None = None, **params: Any) -> Deferred[Any]:
        assert self.transport is not None
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        d: Deferred[Any] = Deferred()
        self.pending[self.next_id] = d
        self.transport.writeToChild(3, json.dumps(message).encode() + b"\0")
        return d

    def page(self, method: str, **params: Any) -> Deferred[Any]:
        """A command to the page this client attached to (L{open_page})."""
        return self.call(method, session=self.session, **params)

    async def open_page(self, width: int = 1200, height: int = 800) -> None:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session = attached["sessionId"]
        await self.page("Page.enable")
        await self.page("Runtime.enable")
        await self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)

    async def evaluate(self, expression: str) -> Any:
        result = await self.page("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0, interval: float = 0.1) -> Any:
        """Poll C{expression} in the page until it is truthy (navigations in between are fine)."""
        waited = 0.0
        last: Any = None
        while waited < timeout:
            try:
                last = await self.evaluate(expression)
                if last:
                    return last
            except CDPError as e:  # the context went away during a navigation
                last = e
            await deferLater(self.reactor, interval, lambda: None)
            waited += interval
        raise AssertionError(f"timed out after {timeout}s waiting for {expression!r} (last: {last!r})")

    async def navigate(self, url: str) -> None:
        await self.page("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def screenshot(self) -> bytes:
        result = await self.page("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        if self.transport is None or self.ended.called:
            return
        try:
            self.call("Browser.close").addErrback(lambda _: None)
        except Exception:
            pass
        timer = self.reactor.callLater(10, self._kill)
        await self.ended
        if timer.active():
            timer.cancel()

    def _kill(self) -> None:
        try:
            assert self.transport is not None
            self.transport.signalProcess("KILL")
        except Exception:
            pass
