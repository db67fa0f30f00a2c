#!/usr/bin/env python3
"""Runs README.md's shell lines as a new user would, and fails if one fails or
prints something other than what the README says it shows.

The README marks each checked code block with an HTML comment on the line
before it: `<!-- readme-check: NAME -->`. A section's check below takes its
blocks by name, so a README edit that breaks a line (or a block that loses its
marker) fails CI instead of misleading a user.

Sections checked:
  fastapi  "For FastAPI apps": in a fresh virtualenv in a scratch directory,
           `pip install fastapi <this clone>` (maturin builds the binary;
           `--profile dev` here, so that CI reuses the test build), then
           `fastlane serve main:app` with the README's main.py, then the
           README's curl line, whose output must be /fast's answer before
           /blocks' one.

Usage: python3 .ci/readme_check.py [SECTION...]   (default: all)
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MARKER = re.compile(r"^<!-- readme-check: ([a-z0-9-]+) -->\s*$")


def blocks(readme):
    """Each marked block's lines, by name."""
    found = {}
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            sys.exit(f"README.md:{i + 1}: `{line}` is not followed by a code block")
        body = []
        for inner in lines[i + 2:]:
            if inner.startswith("```"):
                break
            body.append(inner)
        found[m.group(1)] = body
    return found


def need(found, name):
    if name not in found:
        sys.exit(f"README.md has no block marked `<!-- readme-check: {name} -->`")
    return found[name]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def run_line(line, cwd, env, timeout):
    """One README line, in bash with the virtualenv active, as typed."""
    print(f"$ {line}", flush=True)
    return subprocess.run(
        ["bash", "-c", f". .venv/bin/activate && {line}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def check_fastapi(found):
    app = "\n".join(need(found, "fastapi-app")) + "\n"
    install, serve = [l for l in need(found, "fastapi-serve") if l.strip()]
    tries = [l for l in need(found, "fastapi-try") if l.strip()]
    if not install.startswith("pip install") or not serve.startswith("fastlane serve"):
        sys.exit(f"fastapi-serve: expected a `pip install` line and a `fastlane serve` line, got {install!r}, {serve!r}")
    install = install.replace("path/to/fastlane", REPO)

    work = tempfile.mkdtemp(prefix="fastlane-readme-")
    server = None
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(app)
        subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=work, check=True)
        port = free_port()
        env = dict(os.environ)
        for leaked in ("VIRTUAL_ENV", "FASTLANE_TEST_PYTHON", "PYTHONHOME"):
            env.pop(leaked, None)
        # The dev profile and the workspace's target directory: CI has just
        # built the same crates for the tests. A user's `pip install` builds release.
        env["MATURIN_PEP517_ARGS"] = "--profile dev"
        env["CARGO_TARGET_DIR"] = os.path.join(REPO, "target")
        env["FASTLANE_PORT"] = str(port)

        done = run_line(install, work, env, timeout=1800)
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:])
            sys.exit(f"fastapi: `{install}` failed with exit code {done.returncode}")
        which = run_line("command -v fastlane", work, env, timeout=30).stdout.strip()
        if which != os.path.join(work, ".venv", "bin", "fastlane"):
            sys.exit(f"fastapi: after pip install, `fastlane` is {which!r}, not the virtualenv's")

        print(f"$ {serve}   (FASTLANE_PORT={port}, in the background)", flush=True)
        log = open(os.path.join(work, "serve.log"), "w+")
        server = subprocess.Popen(
            ["bash", "-c", f". .venv/bin/activate && exec {serve}"],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if not wait_for_port(port, server, timeout=60):
            log.seek(0)
            print(log.read()[-4000:])
            sys.exit(f"fastapi: `{serve}` did not start listening within 60 s")

        for line in tries:
            expected = re.search(r"#\s*(\{.*)$", line)
            line = line.replace("localhost:8000", f"localhost:{port}")
            started = time.monotonic()
            done = run_line(line, work, env, timeout=60)
            took = time.monotonic() - started
            if done.returncode != 0:
                sys.exit(f"fastapi: `{line}` failed with exit code {done.returncode}: {done.stderr}")
            # The README says: {"ok":true} at once, then {"slept":2}. The
            # order of the two answers on the shared stdout is the claim.
            if done.stdout != '{"ok":true}{"slept":2}':
                sys.exit(f"fastapi: `{line}` printed {done.stdout!r}; the README says "
                         f"{expected.group(1) if expected else '?'}")
            print(f"  -> {done.stdout}  ({took:.1f} s)")

        os.killpg(server.pid, signal.SIGTERM)
        code = server.wait(timeout=60)
        log.seek(0)
        output = log.read()
        if code != 0:
            print(output[-4000:])
            sys.exit(f"fastapi: `{serve}` exited with {code} after SIGTERM, expected 0")
        if "blocked the event loop" not in output:
            print(output[-4000:])
            sys.exit("fastapi: the server's log does not report the blocked event loop of /blocks")
        print("fastapi: ok (served, /fast answered while /blocks blocked, the stall was logged, clean exit)")
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


CHECKS = {"fastapi": check_fastapi}


def main():
    with open(os.path.join(REPO, "README.md")) as f:
        found = blocks(f.read())
    wanted = sys.argv[1:] or list(CHECKS)
    for name in wanted:
        if name not in CHECKS:
            sys.exit(f"unknown section `{name}`; known: {', '.join(CHECKS)}")
        CHECKS[name](found)


if __name__ == "__main__":
    main()
