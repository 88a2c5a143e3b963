"""Headless Chromium driven through the DevTools protocol (CDP) with ``websocket-client``; no Playwright.

Only what the browser tier needs: start the system ``chromium`` on a free port with a throw-away profile, open a
page, evaluate JavaScript (awaiting promises, returning JSON values), set the window size, and take screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    override = os.environ.get("SILO_CHROMIUM")
    if override:
        return override if Path(override).is_file() else shutil.which(override)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process with one page (tab), stopped by its process group on :meth:`close`."""

    def __init__(self, executable: str, width: int = 1600, height: int = 1000, timeout: float = 60.0):
        self.port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="silo-chromium-")
        self.log_path = Path(self.profile) / "chromium.log"
        self._log = open(self.log_path, "w")
        cmd = [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               "--disable-background-networking", "--disable-component-update", "--mute-audio",
               f"--remote-debugging-port={self.port}", "--remote-allow-origins=*",
               f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self._id = 0
        self.ws = None
        self.console: list[str] = []
        deadline = time.monotonic() + timeout
        pages = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited (code {self.proc.returncode}): {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as r:
                    pages = [p for p in json.loads(r.read().decode()) if p.get("type") == "page"]
                if pages:
                    break
            time.sleep(0.2)
        if not pages:
            self.close()
            raise CDPError(f"chromium's DevTools endpoint did not answer within {timeout:.0f} s")
        import websocket

        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout,
                                              suppress_origin=True)
        self.send("Runtime.enable")
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    # -- protocol ---------------------------------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, timeout: float = 60.0):
        self._id += 1
        my_id = self._id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"{method}: no answer within {timeout:.0f} s")
            self.ws.settimeout(remaining)
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method = msg.get("method")
        params = msg.get("params") or {}
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            exc = details.get("exception") or {}
            self.console.append(f"exception: {exc.get('description') or details.get('text')}")

    def evaluate(self, expression: str, timeout: float = 60.0):
        """Evaluate ``expression`` in the page (promises are awaited); returns its JSON value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "timeout": int(timeout * 1000)},
                           timeout=timeout + 5)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            exc = details.get("exception") or {}
            raise CDPError(f"JavaScript error: {exc.get('description') or details.get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.25, what: str = ""):
        """Evaluate ``expression`` until it is truthy; returns that value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(CDPError):
                last = self.evaluate(expression, timeout=max(5.0, deadline - time.monotonic()))
                if last:
                    return last
            time.sleep(poll)
        raise CDPError(f"timed out after {timeout:.0f} s waiting for {what or expression} (last value {last!r})")

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout=timeout, what=f"{url} to load")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
