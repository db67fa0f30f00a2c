"""The demo's /docs in a real browser, as a person would use it.

Starts `fastlane demo` on a free port and headless Chromium (Debian's package),
and through the DevTools protocol: loads /docs, checks that Swagger UI lists
the demo's routes, expands `GET /slow/sync`, clicks "Try it out", types a
value for `secs`, clicks "Execute" and waits for the demo's answer (status
200, "slept 0.300 s on the blocking lane") to show in the page. With
--screenshot PATH it saves what the page looks like then (the README's
picture is made so).

Usage: python .ci/docs_browser.py [--fastlane target/debug/fastlane] [--screenshot out.png]
Needs the `websockets` package (the test virtualenv of .ci/python-env has it).
Exits non-zero, saying what it saw, when a step fails.
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from websockets.sync.client import connect

ROUTE = "/slow/sync"
SECS = "0.3"
EXPECTED = "slept 0.300 s on the blocking lane"
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
    sys.exit(f"docs_browser: {what} did not come")


def start_demo(binary):
    """`fastlane demo --port 0`; returns the process and its base URL."""
    jobs_db = os.path.join(tempfile.mkdtemp(prefix="fastlane-docs-"), "jobs.db")
    env = dict(os.environ, FASTLANE_JOBS_URL=f"sqlite://{jobs_db}", RUST_LOG="warn")
    proc = subprocess.Popen(
        [binary, "demo", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    return proc, wait_for_line(proc, proc.stdout, "fastlane demo on ", "the demo's address")


def start_chromium():
    """Headless Chromium with its DevTools endpoint; returns the process and the ws URL."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("docs_browser: Chromium is not installed (apt-get install chromium; .ci/run does it)")
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
        sys.exit(f"docs_browser: gave up waiting for {what}; the page says:\n{text}")


# The operation block of ROUTE, found by the path Swagger UI shows on it.
OPBLOCK = f"""[...document.querySelectorAll('.opblock')]
  .find(b => (b.querySelector('.opblock-summary-path') || {{}}).getAttribute?.('data-path') === '{ROUTE}')"""


def drive(page, base):
    page.call("Page.navigate", {"url": f"{base}/docs"}, session=True)
    count = page.wait_for(
        "Swagger UI to list the routes", "document.querySelectorAll('.opblock').length"
    )
    title = page.js("(document.querySelector('.info .title') || {}).innerText || ''")
    print(f"docs_browser: /docs lists {count} operations under {title.splitlines()[0] if title else '?'}")
    if "fastlane demo" not in title:
        sys.exit(f"docs_browser: the page's title is {title!r}, not the demo's")

    page.wait_for(f"the {ROUTE} block", f"!!({OPBLOCK})")
    page.js(f"({OPBLOCK}).querySelector('.opblock-summary-control').click(); true")
    page.wait_for("the block to expand", f"!!({OPBLOCK}).querySelector('.try-out__btn')")
    page.js(f"({OPBLOCK}).querySelector('.try-out__btn').click(); true")
    page.wait_for("the secs field", f"!!({OPBLOCK}).querySelector('input[placeholder=\"secs\"]')")
    # Typed as a person types: focus the field, insert the text as key input.
    page.js(f"""({OPBLOCK}).querySelector('input[placeholder="secs"]').focus(); true""")
    page.call("Input.insertText", {"text": SECS}, session=True)
    # Swagger UI takes a field's value after a pause in typing (a debounce).
    page.wait_for(
        "the typed value to be taken",
        f"""({OPBLOCK}).querySelector('input[placeholder="secs"]').value === '{SECS}'""",
    )
    time.sleep(1.0)
    page.js(f"({OPBLOCK}).querySelector('button.execute').click(); true")
    answer = page.wait_for(
        "the demo's answer in the page",
        f"""(() => {{
          const block = {OPBLOCK};
          const status = block.querySelector('.live-responses-table tbody .response-col_status');
          const body = block.querySelector('.live-responses-table .response-col_description pre');
          return status && body && body.innerText.includes('slept') ? [status.innerText.trim(), body.innerText.trim()] : null;
        }})()""",
    )
    status, body = answer
    print(f"docs_browser: Try it out -> Execute on GET {ROUTE}?secs={SECS}: {status} {body!r}")
    if not status.startswith("200") or EXPECTED not in body:
        sys.exit(f"docs_browser: expected 200 and {EXPECTED!r}, the page shows {status} {body!r}")
    request_url = page.js(f"(({OPBLOCK}).querySelector('.request-url pre') || {{}}).innerText || ''")
    if f"{ROUTE}?secs={SECS}" not in request_url:
        sys.exit(f"docs_browser: the request the page shows is {request_url!r}")


def screenshot(page, path):
    # Bring the tried route to the top of the picture.
    page.js(f"({OPBLOCK}).scrollIntoView({{block: 'start'}}); window.scrollBy(0, -90)")
    time.sleep(0.3)
    data = page.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))
    print(f"docs_browser: screenshot in {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fastlane", default="target/debug/fastlane", help="the fastlane binary")
    parser.add_argument("--screenshot", help="save a PNG of the page after the request")
    args = parser.parse_args()
    demo, base = start_demo(args.fastlane)
    chromium = None
    try:
        chromium, ws = start_chromium()
        page = Page(ws)
        drive(page, base)
        if args.screenshot:
            screenshot(page, args.screenshot)
        page.ws.close()
    finally:
        for proc in (chromium, demo):
            if proc is not None:
                proc.kill()
                proc.wait()
    print("docs_browser: OK")


if __name__ == "__main__":
    main()
