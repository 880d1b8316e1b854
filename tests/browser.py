"""A minimal headless-Chromium driver over the Chrome DevTools protocol (`websocket-client`), for
the dashboard tests: open a page, evaluate JavaScript, collect console errors and exceptions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def chromium_path() -> str:
    """The OS Chromium; skips when it is absent, except in CI (where `scripts/setup.sh` installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no chromium on PATH in CI: scripts/setup.sh installs it (apt-get install chromium)")
    pytest.skip("no chromium on PATH: install it (apt-get install chromium, or run scripts/setup.sh as root)")


class Browser:
    def __init__(self, profile: Path, timeout: float = 30.0):
        import websocket

        self.timeout = timeout
        port_file = profile / "DevToolsActivePort"
        self.proc = subprocess.Popen(
            [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.n = 0
        self.errors: list[str] = []
        self.events: list[str] = []
        self.sessions: list[str] = []
        for m in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(m)
        # Out-of-process frames (a sandboxed iframe) attach paused, so their errors are seen too.
        self.call("Target.setAutoAttach", autoAttach=True, waitForDebuggerOnStart=True, flatten=True)

    def _note(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(p["exceptionDetails"])[:500])
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append(json.dumps(p.get("args"))[:500])
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            self.errors.append(p["entry"].get("text", "")[:500])
        if method == "Target.attachedToTarget":
            sid = p["sessionId"]
            self.sessions.append(sid)
            for m in ("Runtime.enable", "Log.enable", "Runtime.runIfWaitingForDebugger"):
                self.n += 1
                self.ws.send(json.dumps({"id": self.n, "method": m, "params": {}, "sessionId": sid}))
        if method:
            self.events.append(method)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.n += 1
        n = self.n
        msg: dict[str, Any] = {"id": n, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._note(msg)

    def goto(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.time() + self.timeout
        while "Page.loadEventFired" not in self.events:
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not load")
            self._note(json.loads(self.ws.recv()))

    def js(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def frame_js(self, expr: str, wait_for: str | None = None) -> Any:
        """Evaluate in the newest attached out-of-process frame; `wait_for` polls until truthy first."""
        deadline = time.time() + self.timeout
        while True:
            if self.sessions:
                sid = self.sessions[-1]
                probe = self.call(
                    "Runtime.evaluate", session=sid, expression=wait_for or "true", returnByValue=True
                )
                if probe["result"].get("value"):
                    r = self.call("Runtime.evaluate", session=sid, expression=expr, returnByValue=True)
                    return r["result"].get("value")
            else:
                self.call("Runtime.evaluate", expression="1")  # pump events
            if time.time() > deadline:
                raise TimeoutError(f"no frame satisfied {wait_for!r}")
            time.sleep(0.1)

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
