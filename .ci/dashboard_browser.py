"""The job dashboard in a real browser, as a person would use it.

Seeds a fresh SQLite job store with the CLI (jobs that succeed, two that die,
one that runs for minutes, one waiting for it, a limited queue, a schedule),
runs `fastlane jobs work` on it and `fastlane jobs ui --port 0 --token T`, and
through headless Chromium (Debian's package): opens the page with its token,
waits for the seeded jobs to show (counts by state and queue, the chart's
bars, the running job's progress bar, the dead jobs with their errors, the
schedule), opens a dead job's attempts, clicks its "retry" button and waits for
the job to leave the dead list and succeed, then clicks "retry all dead fail"
for the other. It also checks that the API refuses a request without the token
and an action without the page's anti-forgery header. With --screenshot PATH it
saves what the page looks like (docs/jobs-dashboard.png is made so).

Usage: python .ci/dashboard_browser.py [--fastlane target/debug/fastlane] [--screenshot out.png]
Exits non-zero, saying what it saw, when a step fails.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from browser import Page, screenshot, start_chromium, wait_for_line

TOKEN = "dashboard-test-token"


def fail(message):
    sys.exit(f"dashboard_browser: {message}")


def cli(binary, *args):
    out = subprocess.run([binary, "jobs", *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        fail(f"`fastlane jobs {' '.join(args)}` failed: {out.stderr}")
    return out.stdout.strip()


def seed(binary, url):
    """The store the page is checked against; returns the ids of the two jobs that die."""
    cli(binary, "enqueue", "--url", url, "noop", "--count", "40")
    # Fails its first attempt and has no other: dead, until retried (then it succeeds).
    dead = [int(cli(binary, "enqueue", "--url", url, "fail", "--payload", '{"times": 1}', "--max-attempts", "1"))
            for _ in range(2)]
    # Runs for 30 s, reporting progress every 3 s.
    long = cli(binary, "enqueue", "--url", url, "sleep", "--payload", '{"ms": 30000}')
    cli(binary, "enqueue", "--url", url, "gather", "--after", long)
    cli(binary, "limit", "--url", url, "--queue", "default", "--concurrency", "8")
    return dead


def http(base, path, method="GET", headers=None):
    """Status and JSON body of a request made outside the browser."""
    request = urllib.request.Request(base + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def check_guards(base):
    status, body = http(base, "/api/overview")
    if status != 401 or "token" not in body.get("error", ""):
        fail(f"without its token the API answered {status} {body}")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, body = http(base, "/api/overview", headers=bearer)
    if status != 200 or "queues" not in body:
        fail(f"with its token the API answered {status} {body}")
    status, body = http(base, "/api/jobs/1/retry", method="POST", headers=bearer)
    if status != 403 or "x-fastlane-csrf" not in body.get("error", ""):
        fail(f"an action without the page's header answered {status} {body}")
    print("dashboard_browser: the API refuses a request without the token (401) and an action without the "
          "page's anti-forgery header (403)")


def drive(page, base, dead):
    page.call("Page.navigate", {"url": f"{base}/?token={TOKEN}"}, session=True)
    # The token becomes a cookie and leaves the address.
    page.wait_for("the page at / without the token", "location.pathname === '/' && !location.search")
    page.wait_for("the dead jobs", f"document.querySelectorAll('#dead tr[data-job]').length === {len(dead)}")
    # The sleep job reports its progress every 3 s: the bar fills with it.
    progress = page.wait_for(
        "the running job's progress",
        "(() => { const bar = document.querySelector('#running tr[data-job] .bar em');"
        " return bar && bar.innerText.endsWith('%') && bar.innerText; })()",
    )
    page.wait_for("40 succeeded jobs", "document.querySelector('[data-state=succeeded] b').innerText === '40'")
    page.wait_for("the waiting job", "document.querySelector('[data-state=waiting] b').innerText === '1'")
    page.wait_for("the chart's bars", "document.querySelectorAll('#chart rect').length > 0")
    page.wait_for("the schedule", "document.querySelector('#schedules').innerText.includes('pulse')")
    queue = page.js("document.querySelector('#queues tr[data-queue=default]').innerText")
    if "8 at once" not in queue:
        fail(f"the queue's row does not show its cap: {queue!r}")
    error = page.js(f"document.querySelector('#dead tr[data-job=\"{dead[0]}\"] td.error').innerText")
    if "failing on purpose" not in error:
        fail(f"the dead job's error is not shown: {error!r}")
    print(f"dashboard_browser: the page shows the seeded store: dead jobs {dead}, the running job at {progress}, "
          f"the chart, the schedule; queue row {queue.split()[0]!r} with its cap")

    # A dead job's attempts, as a person opens them.
    page.js(f"document.querySelector('#dead tr[data-job=\"{dead[0]}\"] button.link').click(); true")
    attempts = page.wait_for(
        "the dead job's attempts",
        f"(document.querySelector('tr[data-attempts=\"{dead[0]}\"] tbody') || {{}}).innerText",
    )
    if "failed" not in attempts:
        fail(f"the attempts of job {dead[0]} read {attempts!r}")

    page.js(f"document.querySelector('#dead tr[data-job=\"{dead[0]}\"] button.retry').click(); true")
    page.wait_for(f"job {dead[0]} to leave the dead list",
                  f"!document.querySelector('#dead tr[data-job=\"{dead[0]}\"]')")
    state = page.wait_for(
        f"job {dead[0]} to succeed",
        f"fetch('api/jobs/{dead[0]}').then(r => r.json()).then(j => j.state === 'succeeded' && j.state)",
    )
    print(f"dashboard_browser: clicked retry on dead job {dead[0]}: it left the dead list and is {state}")

    page.wait_for("the retry-all button", "!!document.querySelector('[data-retry-dead=fail]')")
    page.js("document.querySelector('[data-retry-dead=fail]').click(); true")
    page.wait_for("no dead job left", "document.querySelector('[data-state=dead] b').innerText === '0'")
    toast = page.js("document.getElementById('toast').innerText")
    print(f"dashboard_browser: clicked 'retry all dead fail': {toast!r}; no dead job left")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fastlane", default="target/debug/fastlane", help="the fastlane binary")
    parser.add_argument("--screenshot", help="save a PNG of the page after the clicks")
    args = parser.parse_args()
    binary = os.path.abspath(args.fastlane)
    scratch = tempfile.mkdtemp(prefix="fastlane-dashboard-")
    url = f"sqlite://{scratch}/jobs.db"
    procs = []
    try:
        dead = seed(binary, url)
        env = dict(os.environ, RUST_LOG="warn")
        procs.append(subprocess.Popen(
            [binary, "jobs", "work", "--url", url, "--schedule", "pulse=noop@every 1h"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        ui = subprocess.Popen([binary, "jobs", "ui", "--url", url, "--port", "0", "--token", TOKEN],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        procs.append(ui)
        base = wait_for_line(ui, ui.stdout, "fastlane jobs ui on ", "the dashboard's address").split()[0]
        base = base.split("/?")[0].rstrip("/")
        check_guards(base)
        chromium, ws = start_chromium()
        procs.append(chromium)
        page = Page(ws)
        drive(page, base, dead)
        if args.screenshot:
            # For the picture: a job that keeps failing (in "Failing", then
            # dead), one that fails for good, with its attempts open.
            cli(binary, "enqueue", "--url", url, "fail", "--payload", '{"times": 3}')
            gone = cli(binary, "enqueue", "--url", url, "fail", "--payload", '{"times": 9}', "--max-attempts", "1")
            page.wait_for("the new dead job", f"!!document.querySelector('#dead tr[data-job=\"{gone}\"] button.link')")
            page.js(f"document.querySelector('#dead tr[data-job=\"{gone}\"] button.link').click(); true")
            page.wait_for("the failing job", "document.querySelectorAll('#retrying tr[data-job]').length > 0")
            page.js("window.scrollTo(0, 0); true")
            time.sleep(2.5)  # one more refresh, with the attempts open
            screenshot(page, args.screenshot)
            print(f"dashboard_browser: screenshot in {args.screenshot}")
        page.ws.close()
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    print("dashboard_browser: OK")


if __name__ == "__main__":
    main()
