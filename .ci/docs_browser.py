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
import os
import subprocess
import sys
import tempfile
import time

from browser import Page, start_chromium, wait_for_line
from browser import screenshot as capture

ROUTE = "/slow/sync"
SECS = "0.3"
EXPECTED = "slept 0.300 s on the blocking lane"


def start_demo(binary):
    """`fastlane demo --port 0`; returns the process and its base URL."""
    jobs_db = os.path.join(tempfile.mkdtemp(prefix="fastlane-docs-"), "jobs.db")
    env = dict(os.environ, FASTLANE_JOBS_URL=f"sqlite://{jobs_db}", RUST_LOG="warn")
    proc = subprocess.Popen(
        [binary, "demo", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    return proc, wait_for_line(proc, proc.stdout, "fastlane demo on ", "the demo's address")


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
    capture(page, path)
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
