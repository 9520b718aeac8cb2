"""Drive the listening kit in headless Chromium (Debian's package) over the DevTools protocol.

No browser download and no driver binary: Chromium is started with a debugging port and
spoken to with JSON messages over a websocket (``websockets``), which is all a test needs:
type a name, click answers, press the export button, catch the download, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with one page; ``js`` evaluates an expression in the page."""

    def __init__(self, downloads: Path, width: int = 1000, height: int = 900):
        exe = chromium()
        if exe is None:
            raise RuntimeError("chromium is not installed (bash scripts/install.sh --test installs it)")
        self.profile = Path(tempfile.mkdtemp(prefix="esn-chromium-"))
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
             "--autoplay-policy=no-user-gesture-required", f"--window-size={width},{height}",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        port = self._port()
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(p for p in pages if p["type"] == "page")
        self._stack = contextlib.ExitStack()  # connect() is a context manager (websockets >= 17 insists)
        self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=2**26, open_timeout=20))
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        downloads.mkdir(parents=True, exist_ok=True)
        self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))

    def _port(self) -> int:
        # Chromium writes the port it picked to DevToolsActivePort in the profile
        marker = self.profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while time.time() < deadline:
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its debugging port within 30 s")

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.js("document.readyState") == "complete" and self.js("typeof window.ESN_KIT") == "object":
                return
            time.sleep(0.1)
        raise TimeoutError(f"{url} did not load the kit")

    def wait(self, expression: str, timeout: float = 10):
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


def click_answer(browser: Browser, answer: str) -> None:
    clicked = browser.js(
        f"(() => {{ const b = document.querySelector('#answers button[data-answer=\"{answer}\"]');"
        f" if (!b) return false; b.click(); return true; }})()")
    if not clicked:
        raise AssertionError(f"no answer button {answer!r} on the page: {browser.js('document.body.innerText')[:500]}")


def wait_for_file(folder: Path, pattern: str, timeout: float = 20) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if done:
            return done[0]
        time.sleep(0.1)
    raise TimeoutError(f"no {pattern} downloaded into {folder}")


def screenshot_kit(kit_dir: Path, out: Path, answers: tuple[str, ...] = ("A", "indecisive", "B", "A")) -> None:
    """The README's picture: the kit's A/B page after a few answers, 860x540."""
    browser = Browser(Path(tempfile.mkdtemp(prefix="esn-downloads-")))
    try:
        browser.call("Emulation.setDeviceMetricsOverride", width=860, height=540, deviceScaleFactor=1, mobile=False)
        browser.open((Path(kit_dir) / "index.html").resolve().as_uri())
        browser.js("localStorage.clear(); document.getElementById('listener').value = 'L07';"
                   " document.getElementById('start').click()")
        for answer in answers:
            click_answer(browser, answer)
        browser.wait("Array.from(document.querySelectorAll('audio')).every(a => a.duration > 0)")
        browser.screenshot(Path(out))
    finally:
        browser.close()


if __name__ == "__main__":  # python tests/kit_browser.py results/human/kit docs/listening_kit.png
    import sys

    screenshot_kit(Path(sys.argv[1]), Path(sys.argv[2]))
