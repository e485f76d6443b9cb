"""A page in headless Chromium (the Debian build tests/api/test_api_admin_page.py drives),
steered over the DevTools protocol: what the browser laid out and painted, measured by
script run from outside the page (its own policy allows none), and every request the
page made (the browser's own background traffic is not the page's)."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # Nothing leaves the machine: a page that asks for a URL fails at once, and shows
    # up in requests() all the same.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


class Browser:
    """One headless Chromium and one page in it, driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            pytest.fail("chromium is not installed: run scripts/ensure-chromium")
        profile.mkdir(parents=True, exist_ok=True)
        self._log = (profile / "chromium.log").open("w")
        self._proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._stack = ExitStack()
        self._ws: ClientConnection = self._stack.enter_context(
            connect(self._endpoint(profile), max_size=None)
        )
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Network", "Page", "Runtime"):
            self.call(f"{domain}.enable", session=True)

    def _endpoint(self, profile: Path) -> str:
        # Chromium writes the port it bound (and the browser's path) once it listens.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"chromium exited: {(profile / 'chromium.log').read_text()[-2000:]}")
            lines = port_file.read_text().split() if port_file.exists() else []
            if len(lines) == 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.1)
        pytest.fail("chromium did not open its DevTools port within 60 s")

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one command (to the page with ``session``) and return its result."""
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self._ws.send(json.dumps(message))
        while True:
            reply = json.loads(self._ws.recv(timeout=60))
            if reply.get("id") != msg_id:
                self.events.append(reply)
            elif "error" in reply:
                raise AssertionError(f"{method}: {reply['error']}")
            else:
                result: dict[str, Any] = reply.get("result", {})
                return result

    def wait_for(self, event: str, timeout: float = 60) -> None:
        """Read events until ``event`` arrives from the page."""
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {event} within {timeout} s")
            self.events.append(json.loads(self._ws.recv(timeout=left)))

    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        """Load ``url`` in a window of ``width`` x ``height`` CSS pixels."""
        self.call(
            "Emulation.setDeviceMetricsOverride", session=True,
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` evaluated in the page."""
        done = self.call(
            "Runtime.evaluate", session=True,
            expression=expression, returnByValue=True, awaitPromise=True,
        )  # fmt: skip
        if "exceptionDetails" in done:
            raise AssertionError(f"page script failed: {done['exceptionDetails']}")
        return done["result"].get("value")

    def requests(self) -> list[str]:
        """Every URL the page asked for (its own, data: URLs included), in order."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == self.session
        ]

    def screenshot(self, box: dict[str, float]) -> bytes:
        """A PNG of the page's area ``box`` (x, y, width, height in page pixels)."""
        clip = {k: box[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
        shot = self.call(
            "Page.captureScreenshot", session=True,
            format="png", clip=clip, captureBeyondViewport=True,
        )  # fmt: skip
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        self._stack.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
