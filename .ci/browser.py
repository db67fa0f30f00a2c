"""Headless Chromium driven over the DevTools protocol, for the scripts that
test pages as a person would (.ci/docs_browser.py, .ci/dashboard_browser.py):
start Chromium (Debian's package), open a tab, run JavaScript in it, wait for
what the page shows, take screenshots. Needs the `websockets` package (the
test virtualenv of .ci/python-env has it).
"""

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from websockets.sync.client import connect

STEP_TIMEOUT = 20.0


def wait_for_line(proc, stream, marker, what):
    """The rest of the first line of `stream` (the process's stdout or stderr)
    after `marker`; exits saying `what` did not come within 30 s."""
    deadline = time.monotonic() + 30
    for line in stream:
        if marker in line:
            # Keep reading its output so that the process never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
            return line.split(marker, 1)[1].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    sys.exit(f"{what} did not come")


def start_chromium():
    """Headless Chromium with its DevTools endpoint; returns the process and the ws URL."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    profile = tempfile.mkdtemp(prefix="fastlane-chromium-")
    # The flags that keep Chromium from reaching out to Google's hosts, which
    # this machine's closed network refuses (see the machine notes).
    args = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
        "--window-size=1280,1600", "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, wait_for_line(proc, proc.stderr, "DevTools listening on ", "Chromium's DevTools address")


class Page:
    """One tab, driven over the browser's DevTools WebSocket."""

    def __init__(self, ws_url):
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=10)
        self.next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 1100, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def call(self, method, params=None, session=False):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=STEP_TIMEOUT))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression):
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, session=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, what, expression):
        """Polls `expression` until it is truthy; exits saying `what` it waited for."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        text = self.js("document.body ? document.body.innerText.slice(0, 2000) : ''")
        sys.exit(f"gave up waiting for {what}; the page says:\n{text}")




def screenshot(page, path):
    """Saves what the tab shows as a PNG."""
    data = page.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))
