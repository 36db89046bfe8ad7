"""Debian's headless Chromium, driven over the DevTools protocol (CDP) for tests.

Playwright would download a browser build of its own; this drives the distribution's
``chromium`` instead, through its remote-debugging websocket: navigate, evaluate
JavaScript, poll a condition with a deadline, set request headers, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import websocket

from tests.peers import require_tool, wait_for


class BrowserError(RuntimeError):
    """Chromium reported an error for a command or a script."""


class Page:
    def __init__(self, ws_url: str) -> None:
        self._ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv())
            if reply.get("id") != msg_id:
                continue  # an event
            if "error" in reply:
                raise BrowserError(f"{method}: {reply['error']}")
            result: dict[str, Any] = reply.get("result", {})
            return result

    def navigate(self, url: str, timeout: float = 30) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete", timeout,
                 f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        return wait_for(lambda: self.evaluate(expression), timeout, what, interval=0.2)

    def set_headers(self, headers: dict[str, str]) -> None:
        self.send("Network.enable")
        self.send("Network.setExtraHTTPHeaders", headers=headers)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


class Chromium:
    """One headless Chromium process with its own profile, on a free debugging port."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        exe = shutil.which("chromium") or require_tool("chromium")
        self.profile = Path(tempfile.mkdtemp(prefix="dicomnode-chromium-"))
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-sync",
             "--disable-background-networking", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = self.profile / "DevToolsActivePort"

        def port_file() -> bool:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}")
            return active.is_file() and len(active.read_text().splitlines()) >= 2

        wait_for(port_file, 60, "chromium's DevTools port")
        self.port = int(active.read_text().splitlines()[0])

    def page(self) -> Page:
        def target() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list",
                                        timeout=10) as rsp:
                targets = json.loads(rsp.read())
            pages = [t for t in targets if t.get("type") == "page"]
            return str(pages[0]["webSocketDebuggerUrl"]) if pages else None

        url = wait_for(target, 30, "a page target")
        return Page(url)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 900) -> Iterator[Page]:
    browser = Chromium(width, height)
    page: Page | None = None
    try:
        page = browser.page()
        yield page
    finally:
        if page is not None:
            page.close()
        browser.close()

