"""Headless Chromium for tests: open a local page and record everything it asked the network for.

Talks the Chrome DevTools Protocol over `--remote-debugging-pipe` (JSON messages separated by NUL
bytes on file descriptors 3 and 4), so no port is opened and no websocket library is needed.
One call to `load_page` starts a browser, loads the page, takes a screenshot and closes it.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
]


def find_chromium() -> str | None:
    """Debian's `chromium` (or another Chromium build on PATH); None when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@dataclass
class PageLoad:
    url: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, in order
    failed: list[str] = field(default_factory=list)  # "url: error" for requests that failed
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, error logs
    dom: str = ""  # the rendered document (outerHTML after load)
    values: dict = field(default_factory=dict)  # JavaScript expression -> its value after load
    screenshot: bytes = b""  # PNG of the viewport


class _DevTools:
    """A minimal CDP client over the two pipes Chromium opens with --remote-debugging-pipe."""

    def __init__(self, to_browser: int, from_browser: int):
        self.to_browser, self.from_browser = to_browser, from_browser
        # poll, not select: select() refuses descriptors >= 1024, which a long pytest session reaches
        # (mosaicml-streaming keeps its shared-memory blocks open for the life of the process)
        self.readable = select.poll()
        self.readable.register(from_browser, select.POLLIN)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.to_browser, data):]
        return self.next_id

    def _read(self, deadline: float) -> dict | None:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.readable.poll(left * 1000):
                return None
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        """Send a command and wait for its answer; events that arrive meanwhile are kept."""
        wanted = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while (msg := self._read(deadline)) is not None:
            if msg.get("id") == wanted:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)
        raise TimeoutError(f"no answer to {method} within {timeout} s")

    def wait_for(self, method: str, timeout: float) -> bool:
        """Wait until an event named `method` has arrived (it may already have)."""
        deadline = time.monotonic() + timeout
        if any(e.get("method") == method for e in self.events):
            return True
        while (msg := self._read(deadline)) is not None:
            self.events.append(msg)
            if msg.get("method") == method:
                return True
        return False

    def drain(self, quiet: float) -> None:
        """Collect events until none has arrived for `quiet` seconds (the page has settled)."""
        while (msg := self._read(time.monotonic() + quiet)) is not None:
            self.events.append(msg)


def load_page(path: str | os.PathLike, width: int = 1280, height: int = 4000, timeout: float = 60,
              evaluate: tuple[str, ...] = ()) -> PageLoad:
    """Open the local file `path` in headless Chromium; return its requests, errors, DOM and screenshot.

    `evaluate`: JavaScript expressions to evaluate once the page has loaded (values in `.values`).
    """
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("chromium is not on PATH")
    url = Path(path).resolve().as_uri()
    page = PageLoad(url=url)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        to_r, to_w = os.pipe()  # we write commands, chromium reads them on fd 3
        from_r, from_w = os.pipe()  # chromium writes answers on fd 4, we read them

        def map_pipes():  # runs in the child before exec; first lift both ends clear of fds 3 and 4
            high_r, high_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            close_fds=False, preexec_fn=map_pipes,  # fds 3 and 4 are made in the child, so not close_fds
        )
        os.close(to_r)
        os.close(from_w)
        cdp = _DevTools(to_w, from_r)
        try:
            target = cdp.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Network", "Page", "Runtime", "Log"):
                cdp.call(f"{domain}.enable", session=session)
            cdp.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            cdp.events.clear()  # only what the page itself does counts
            cdp.call("Page.navigate", {"url": url}, session=session)
            if not cdp.wait_for("Page.loadEventFired", timeout):
                raise TimeoutError(f"{url} did not finish loading within {timeout} s")
            cdp.drain(quiet=0.5)
            for expression in ("document.documentElement.outerHTML", *evaluate):
                answer = cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
                if "exceptionDetails" in answer:
                    raise RuntimeError(f"{expression}: {answer['exceptionDetails'].get('text')}")
                page.values[expression] = answer["result"].get("value")
            page.dom = page.values.pop("document.documentElement.outerHTML")
            shot = cdp.call("Page.captureScreenshot", {"format": "png"}, session=session, timeout=timeout)
            page.screenshot = base64.b64decode(shot["data"])
            _collect(page, cdp.events, session)
            try:
                cdp.call("Browser.close", timeout=5)
            except (RuntimeError, TimeoutError):
                pass
        finally:
            os.close(to_w)
            os.close(from_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    return page


def _collect(page: PageLoad, events: list[dict], session: str) -> None:
    urls: dict[str, str] = {}
    for e in events:
        if e.get("sessionId") != session:
            continue
        method, p = e.get("method"), e.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[p["requestId"]] = p["request"]["url"]
            page.requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed":
            page.failed.append(f"{urls.get(p['requestId'], p['requestId'])}: {p.get('errorText')}")
        elif method == "Runtime.exceptionThrown":
            page.errors.append(f"exception: {p['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            page.errors.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            page.errors.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
