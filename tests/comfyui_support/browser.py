"""Headless Chromium driven over the DevTools protocol: load ComfyUI's frontend, run JS in it, take screenshots.

Why by hand: Playwright/Selenium need their own browser downloads, which this machine cannot make; Debian's
`chromium` package plus the DevTools protocol over one websocket (`websocket-client`, already used for ComfyUI's
events) is all a test needs. Commands are sent one at a time; console messages and uncaught exceptions are
recorded so a test can assert the page loaded cleanly.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from .server import free_port

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page. Use as a context manager."""

    def __init__(self, executable: str | None = None, width: int = 1600, height: int = 1000):
        self.executable = executable or find_browser()
        if self.executable is None:
            raise FileNotFoundError("no Chromium found (apt-get install -y chromium)")
        self.width, self.height = width, height
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="dd_chromium_")
        self.process: subprocess.Popen | None = None
        self._ws = None
        self._next_id = 0
        self.console: list[dict] = []  # {"level", "text"}
        self.exceptions: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self):
        self.process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        page = self._page_target(timeout=30)
        import websocket  # websocket-client

        self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        return self

    def __exit__(self, *exc):
        try:
            if self._ws is not None:
                self._ws.close()
        finally:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def _page_target(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as response:
                    pages = [t for t in json.load(response) if t.get("type") == "page"]
                if pages:
                    return pages[0]
            except OSError:
                pass
            if self.process.poll() is not None:
                raise BrowserError(f"{self.executable} exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise BrowserError(f"{self.executable} opened no DevTools page within {timeout} s")
            time.sleep(0.2)

    # -- protocol --------------------------------------------------------------------------------------------
    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            self._ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)
            if time.monotonic() > deadline:
                raise BrowserError(f"{method}: no answer within {timeout} s")

    def _record(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append({"level": params.get("type"), "text": text})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append({"level": entry.get("level"), "text": f"{entry.get('text')} {entry.get('url', '')}"})

    def errors(self) -> list[str]:
        """Uncaught exceptions and console/log errors so far."""
        return self.exceptions + [m["text"] for m in self.console if m["level"] in ("error", "assert")]

    # -- page ------------------------------------------------------------------------------------------------
    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JS expression (promises awaited), JSON-serialised by the page."""
        result = self.send("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, poll: float = 0.25):
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout} s; errors: {self.errors()[:5]}")
            time.sleep(poll)

    def screenshot(self, path: str | Path, fmt: str = "png", quality: int = 85, clip: dict | None = None) -> Path:
        params = {"format": fmt}
        if fmt == "jpeg":
            params["quality"] = quality
        if clip:
            params["clip"] = {**clip, "scale": clip.get("scale", 1)}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
