#!/usr/bin/env python3
"""Runs README.md's shell lines as a new user would, and fails if one fails or
prints something other than what the README says it shows.

The README marks each checked code block with an HTML comment on the line
before it: `<!-- readme-check: NAME -->`. Each line of a checked `sh` block
must match exactly one rule of its section below (a regular expression over
the line, and what its output must be); a line with no rule, or a rule whose
line is gone, fails the check, so a README edit cannot leave a line untried.

Sections (run in this order; `python3 .ci/readme_check.py quickstart jobs`
runs some):
  quickstart  the demo server and the curl/probe lines tried against it;
              `cargo test --workspace` is the line .ci/run has just run.
  app         the Cargo.toml lines and main.rs of "An app", built as a new
              project of its own in a scratch directory; the example that
              holds the same code, run, and the curl lines against it.
  jobs        the signup example and its curl lines; the demo's job routes;
              the `fastlane jobs` CLI lines in a scratch directory.
  fastapi     "For FastAPI apps": `pip install fastapi <this clone>` in a
              fresh virtualenv, `fastlane serve main:app` with the README's
              main.py, and the curl line.

What differs from a user's terminal, and why:
  * `cargo run --release` runs as `cargo run`, `target/release/` as
    `target/debug/`, and pip builds with `--profile dev`: the same code, and
    CI has just built the dev profile for the tests (a release build would
    add minutes to every CI run and check nothing more).
  * The demo and `fastlane serve` listen on a free port (FASTLANE_PORT) in
    place of 8000, and the lines' `:8000` is rewritten to match; the two
    examples listen on 8000 as written, so that port must be free.
  * Files the lines write (`/tmp/probe.svg`, job stores) go to a scratch
    directory, and FASTLANE_JOBS_URL gives the demo and the signup example a
    fresh store each (the README says their stores outlive a run).
  * `fastlane` means this clone's target/debug/fastlane, on PATH, as after
    `cargo install --path crates/fastlane-cli`.
"""

import json
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
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
MARKER = re.compile(r"^<!-- readme-check: ([a-z0-9-]+) -->\s*$")


def fail(msg):
    sys.exit(f"readme-check: {msg}")


def blocks(readme):
    """Each marked block's lines, by name."""
    found = {}
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            fail(f"README.md:{i + 1}: `{line}` is not followed by a code block")
        body = []
        for inner in lines[i + 2:]:
            if inner.startswith("```"):
                break
            body.append(inner)
        found[m.group(1)] = body
    return found


def need(found, name):
    if name not in found:
        fail(f"README.md has no block marked `<!-- readme-check: {name} -->`")
    return found[name]


def shell_lines(found, name):
    return [l for l in need(found, name) if l.strip() and not l.lstrip().startswith("#")]


def claim(line):
    """What the README's comment says a line prints, for error messages."""
    m = re.search(r"\s#\s+(.*)$", line)
    return m.group(1) if m else "(no comment)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def base_env():
    env = dict(os.environ)
    for leaked in ("VIRTUAL_ENV", "FASTLANE_TEST_PYTHON", "PYTHONHOME", "FASTLANE_PORT", "FASTLANE_JOBS_URL"):
        env.pop(leaked, None)
    env["CARGO_TARGET_DIR"] = TARGET
    env["PATH"] = os.path.join(TARGET, "debug") + os.pathsep + env.get("PATH", "")
    return env


def run_line(line, cwd, env, timeout=120, prefix=""):
    """One README line, in bash, as typed (after the documented rewrites)."""
    print(f"$ {line}", flush=True)
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", prefix + line], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    done.took = time.monotonic() - started
    if done.returncode != 0:
        fail(f"`{line}` failed with exit code {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


class Background:
    """A README line that serves until stopped (a server, a job worker)."""

    def __init__(self, line, cwd, env, log_dir, prefix=""):
        print(f"$ {line}   (in the background)", flush=True)
        self.line = line
        self.log = open(os.path.join(log_dir, f"bg-{abs(hash(line))}.log"), "w+")
        self.proc = subprocess.Popen(["bash", "-c", f"{prefix}exec {line}"], cwd=cwd, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_for_port(self, port, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        fail(f"`{self.line}` did not listen on port {port} within {timeout} s:\n{self.output()[-4000:]}")

    def wait_for_output(self, text, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            time.sleep(0.2)
        fail(f"`{self.line}` did not log {text!r} within {timeout} s:\n{self.output()[-4000:]}")

    def stop(self):
        """SIGTERM, as a service manager or Ctrl-C would; a clean exit is 0."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fail(f"`{self.line}` did not exit within 60 s of SIGTERM:\n{self.output()[-4000:]}")
        if code != 0:
            fail(f"`{self.line}` exited with {code} after SIGTERM, expected 0:\n{self.output()[-4000:]}")
        return self.output()

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Scratch:
    """A scratch directory and the background lines started in it, all ended on exit."""

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="fastlane-readme-")
        self.background = []
        return self

    def start(self, line, cwd, env, prefix=""):
        bg = Background(line, cwd, env, self.dir, prefix)
        self.background.append(bg)
        return bg

    def __exit__(self, *exc):
        for bg in self.background:
            bg.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def by_rules(lines, rules, section):
    """Pairs each line with the one rule that matches it; fails on a line with
    none (or several), and on a rule whose line has gone from the README."""
    paired = []
    used = set()
    for line in lines:
        hits = [i for i, (pattern, _) in enumerate(rules) if re.search(pattern, line)]
        if len(hits) != 1:
            fail(f"{section}: README line `{line}` matches {len(hits)} rules of .ci/readme_check.py, "
                 f"not one: give it a rule (what it must print)")
        used.add(hits[0])
        paired.append((line, rules[hits[0]][1]))
    for i, (pattern, _) in enumerate(rules):
        if i not in used:
            fail(f"{section}: no README line matches the rule /{pattern}/: update .ci/readme_check.py")
    return paired


def expect(ok, line, output):
    if not ok:
        fail(f"`{line}` printed {output!r}; the README says: {claim(line)}")


def json_of(line, text):
    try:
        return json.loads(text)
    except ValueError:
        fail(f"`{line}` printed {text!r}, not JSON; the README says: {claim(line)}")


def on_port(line, port):
    return line.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("localhost:8000", f"localhost:{port}")


def dev_profile(line):
    return line.replace("cargo run --release", "cargo run").replace("target/release/", os.path.join(TARGET, "debug") + "/")


def start_demo(scratch, found_line, name):
    """The quickstart's demo line, on a free port and a fresh job store."""
    port = free_port()
    env = base_env()
    env["FASTLANE_PORT"] = str(port)
    env["FASTLANE_JOBS_URL"] = f"sqlite://{os.path.join(scratch.dir, name + '.db')}"
    line = dev_profile(found_line.split("#")[0].strip())
    demo = scratch.start(line + f"   # FASTLANE_PORT={port}", REPO, env)
    demo.wait_for_port(port, timeout=1800)  # the first `cargo run` may build
    return demo, port


def demo_line(found):
    demo = [l for l in shell_lines(found, "quickstart-setup") if re.search(r"-- demo\b", l)]
    if len(demo) != 1:
        fail("quickstart-setup: expected one `cargo run ... -- demo` line")
    return demo[0]


def check_quickstart(found):
    setup = shell_lines(found, "quickstart-setup")
    tests = [l for l in setup if l.split("#")[0].strip() == "cargo test --workspace"]
    if len(setup) != 2 or len(tests) != 1:
        fail(f"quickstart-setup: expected the demo line and `cargo test --workspace`, got {setup}")
    with open(os.path.join(REPO, ".ci", "run")) as f:
        if "cargo test --workspace 2>&1" not in f.read():
            fail("quickstart-setup: .ci/run no longer runs the README's test command `cargo test --workspace`")
    print("$ cargo test --workspace   (not run again here: .ci/run runs it before this script)")

    with Scratch() as scratch:
        demo, port = start_demo(scratch, demo_line(found), "quickstart")
        svg = os.path.join(scratch.dir, "probe.svg")

        def overlap(line, out):
            # Both answers on one stdout: test1's first means it did not wait
            # for the 2 s one.
            expect(out.startswith("test1") and "slept 2" in out, line, out)

        def profile(line, out):
            expect(out == "{}", line, out)
            demo.wait_for_output("profile computed", timeout=30)

        def bad_query(line, out):
            body = json_of(line, out)
            expect(body.get("status") == 422 and body.get("field") == "secs", line, out)

        def metrics(line, out):
            expect("# TYPE fastlane_http_requests counter" in out
                   and 'route="/test1",status="200"' in out, line, out[:300])

        def probe(line, out):
            expect("overlapped (ran in parallel)" in out, line, out)
            with open(svg) as f:
                drawn = f.read()
            if "<svg" not in drawn or "/slow/sync?secs=2" not in drawn:
                fail(f"`{line}`: {svg} is not the timeline with the URL on its bars")

        rules = [
            (r"/slow/sync\?secs=2' & curl '.*/test1'", overlap),
            (r"-X POST .*/profile", profile),
            (r"/test2\?secs=abc", bad_query),
            (r"^curl .*/metrics", metrics),
            (r"fastlane probe -n 2 -c 2 --svg /tmp/probe.svg", probe),
        ]
        for line, check in by_rules(shell_lines(found, "quickstart-try"), rules, "quickstart-try"):
            typed = dev_profile(on_port(line, port)).replace("/tmp/probe.svg", svg)
            check(line, run_line(typed, REPO, base_env()).stdout)
        demo.stop()
    print("quickstart: ok")


def check_app(found):
    cargo = "\n".join(need(found, "app-cargo"))
    main = "\n".join(need(found, "app-main")) + "\n"
    # The example `cargo run -p fastlane --example quickstart` runs is the
    # README's code, line for line (after its own doc comment).
    with open(os.path.join(REPO, "crates", "fastlane", "examples", "quickstart.rs")) as f:
        example = "".join(l for l in f if not l.startswith("//!"))
    if example != main:
        fail("app-main: crates/fastlane/examples/quickstart.rs differs from the README's main.rs")
    if 'path = "../fastlane/crates/fastlane"' not in cargo:
        fail("app-cargo: expected the fastlane dependency as `path = \"../fastlane/crates/fastlane\"`")

    with Scratch() as scratch:
        # A new project beside a clone called `fastlane`, as the README's
        # path assumes; the clone's Cargo.lock keeps the same versions as the
        # tests (cargo drops what this project does not use).
        project = os.path.join(scratch.dir, "myapp")
        os.makedirs(os.path.join(project, "src"))
        os.symlink(REPO, os.path.join(scratch.dir, "fastlane"))
        with open(os.path.join(project, "Cargo.toml"), "w") as f:
            f.write('[package]\nname = "myapp"\nversion = "0.1.0"\nedition = "2021"\n\n' + cargo + "\n")
        with open(os.path.join(project, "src", "main.rs"), "w") as f:
            f.write(main)
        shutil.copy(os.path.join(REPO, "Cargo.lock"), project)
        run_line("cargo build   # a new project with the README's Cargo.toml and main.rs", project, base_env(),
                 timeout=1800)

        if not port_is_free(8000):
            fail("app: port 8000 is in use, and the README's example listens there: stop what holds it")
        lines = shell_lines(found, "app-try")
        if not lines or not lines[0].startswith("cargo run -p fastlane --example quickstart"):
            fail("app-try: expected `cargo run -p fastlane --example quickstart` first")
        app = scratch.start(lines[0], REPO, base_env())
        app.wait_for_port(8000, timeout=1800)

        def report(line, out):
            expect(out == "report 7", line, out)

        def signup(line, out):
            expect(out == "welcome", line, out)

        rules = [(r"/reports/7", report), (r"/signup", signup)]
        for line, check in by_rules(lines[1:], rules, "app-try"):
            check(line, run_line(line, REPO, base_env()).stdout)
        app.stop()
    print("app: ok")


def check_jobs(found):
    with Scratch() as scratch:
        # The signup example, on a fresh store.
        lines = shell_lines(found, "jobs-example")
        if not lines or lines[0] != "cargo run -p fastlane-jobs --example signup":
            fail("jobs-example: expected `cargo run -p fastlane-jobs --example signup` first")
        if not port_is_free(8000):
            fail("jobs: port 8000 is in use, and the README's example listens there: stop what holds it")
        env = base_env()
        env["FASTLANE_JOBS_URL"] = f"sqlite://{os.path.join(scratch.dir, 'signup.db')}"
        example = scratch.start(lines[0], REPO, env)
        example.wait_for_port(8000, timeout=1800)

        def enqueued(line, out):
            expect(out == "job 1\n", line, out)

        def shown(line, out):
            job = json_of(line, out)
            expect(job.get("id") == 1 and job.get("name") == "send_welcome"
                   and {"state", "attempts", "progress"} <= job.keys(), line, out)

        rules = [(r"/signup", enqueued), (r"/jobs/1\b", shown)]
        for line, check in by_rules(lines[1:], rules, "jobs-example"):
            check(line, run_line(line, REPO, base_env()).stdout)
        example.stop()

        # The demo's job routes, against the quickstart's demo line.
        demo, port = start_demo(scratch, demo_line(found), "jobs-demo")

        def demo_enqueued(line, out):
            job = json_of(line, out)
            expect(job.get("id") == 1, line, out)

        def demo_shown(line, out):
            job = json_of(line, out)
            expect(job.get("id") == 1 and {"state", "attempts", "progress"} <= job.keys(), line, out)

        rules = [(r"-d .*/jobs/sleep", demo_enqueued), (r"^curl localhost:8000/jobs/1\b", demo_shown)]
        for line, check in by_rules(shell_lines(found, "jobs-demo"), rules, "jobs-demo"):
            check(line, run_line(on_port(line, port), REPO, base_env()).stdout)
        demo.stop()

        # The CLI, in a directory of its own (its store is ./jobs.db).
        cli = os.path.join(scratch.dir, "cli")
        os.makedirs(cli)
        bench_db = os.path.join(scratch.dir, "b.db")

        def stats():
            out = subprocess.run(["fastlane", "jobs", "stats", "--url", "sqlite://jobs.db", "--json"], cwd=cli,
                                 env=base_env(), capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout) if out.returncode == 0 else {}

        def enqueue(line, out):
            expect(out == "enqueued 10 jobs (last id 10)\n", line, out)

        def work(line, _out):
            deadline = time.monotonic() + 120
            while stats().get("succeeded") != 10:
                if time.monotonic() > deadline:
                    fail(f"`{line}` did not run the 10 jobs within 120 s: {stats()}")
                time.sleep(0.2)
            log = worker.stop()  # "until SIGTERM; unfinished jobs are released"
            if "panicked" in log:
                fail(f"`{line}` panicked:\n{log[-3000:]}")

        def show_stats(line, out):
            counts = json_of(line, out)
            expect(counts.get("succeeded") == 10 and counts.get("available") == 0, line, out)

        def show(line, out):
            job = json_of(line, out)
            expect(job.get("id") == 1 and job.get("state") == "succeeded" and job.get("attempts"), line, out)

        def retry_dead(line, out):
            # The README's jobs all succeeded: none is dead.
            expect(out == "0 dead job(s) of type fail made available again\n", line, out)

        def schedules(line, out):
            # The demo job types declare no schedule: the listing says so.
            expect(out.startswith("no schedules"), line, out)

        def bench(line, out):
            expect(out.startswith("50000 jobs") and "end to end" in out and "jobs/s" in out, line, out)

        def limit(line, out):
            # The queue's limits, listed back after they are set.
            expect(re.match(r"mail\s+rate 50/s\s+concurrency 4\n$", out) is not None, line, out)

        rules = [
            (r"jobs enqueue .*--count 10", enqueue),
            (r"jobs work ", work),
            (r"jobs stats .*--json", show_stats),
            (r"jobs show .* 1\b", show),
            (r"jobs schedules ", schedules),
            (r"jobs retry-dead ", retry_dead),
            (r"jobs limit ", limit),
            (r"jobs bench .*--jobs 50000", bench),
        ]
        for line, check in by_rules(shell_lines(found, "jobs-cli"), rules, "jobs-cli"):
            typed = line.replace("/tmp/b.db", bench_db)
            if check is work:
                worker = scratch.start(typed, cli, base_env())
                check(line, None)
            else:
                check(line, run_line(typed, cli, base_env()).stdout)

        # A workflow through the CLI, in a directory of its own (./flow.db).
        flow = os.path.join(scratch.dir, "flow")
        os.makedirs(flow)

        def flow_state(job):
            out = subprocess.run(["fastlane", "jobs", "show", "--url", "sqlite://flow.db", str(job)], cwd=flow,
                                 env=base_env(), capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout).get("state") if out.returncode == 0 else None

        def printed_id(expected):
            def check(line, out):
                expect(out == f"{expected}\n", line, out)
            return check

        def gathered_waits(line, out):
            expect(out == "3\n" and flow_state(3) == "waiting", line, f"{out} (job 3 is {flow_state(3)})")

        def flow_work(line, _out):
            deadline = time.monotonic() + 120
            while flow_state(3) != "succeeded":
                if time.monotonic() > deadline:
                    fail(f"`{line}` did not run the workflow within 120 s: job 3 is {flow_state(3)}")
                time.sleep(0.2)
            log = flow_worker.stop()
            if "panicked" in log:
                fail(f"`{line}` panicked:\n{log[-3000:]}")

        def flow_result(line, out):
            job = json_of(line, out)
            expect(job.get("result") == ["a", "b"] and job.get("depends_on") == [1, 2], line, out)

        rules = [
            (r"jobs enqueue .*\"value\": \"a\"", printed_id(1)),
            (r"jobs enqueue .*\"value\": \"b\"", printed_id(2)),
            (r"jobs enqueue .* gather --after 1 --after 2", gathered_waits),
            (r"jobs work ", flow_work),
            (r"jobs show .* 3\b", flow_result),
        ]
        for line, check in by_rules(shell_lines(found, "jobs-workflow"), rules, "jobs-workflow"):
            if check is flow_work:
                flow_worker = scratch.start(line, flow, base_env())
                check(line, None)
            else:
                check(line, run_line(line, flow, base_env()).stdout)
    print("jobs: ok")


def check_fastapi(found):
    app = "\n".join(need(found, "fastapi-app")) + "\n"
    serve_block = shell_lines(found, "fastapi-serve")
    if len(serve_block) != 2:
        fail(f"fastapi-serve: expected a `pip install` line and a `fastlane serve` line, got {serve_block}")
    install, serve = serve_block
    if not install.startswith("pip install") or not serve.startswith("fastlane serve"):
        fail(f"fastapi-serve: expected a `pip install` line and a `fastlane serve` line, got {serve_block}")
    install = install.replace("path/to/fastlane", REPO)
    activate = ". .venv/bin/activate && "

    with Scratch() as scratch:
        work = scratch.dir
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(app)
        subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=work, check=True)
        port = free_port()
        env = base_env()
        # Not this clone's target/debug: the virtualenv's own `fastlane`.
        env["PATH"] = os.environ.get("PATH", "")
        # The dev profile and the workspace's target directory: CI has just
        # built the same crates for the tests. A user's `pip install` builds release.
        env["MATURIN_PEP517_ARGS"] = "--profile dev"
        env["FASTLANE_PORT"] = str(port)

        run_line(install, work, env, timeout=1800, prefix=activate)
        which = run_line("command -v fastlane", work, env, prefix=activate).stdout.strip()
        if which != os.path.join(work, ".venv", "bin", "fastlane"):
            fail(f"fastapi: after pip install, `fastlane` is {which!r}, not the virtualenv's")

        server = scratch.start(serve + f"   # FASTLANE_PORT={port}", work, env, prefix=activate)
        server.wait_for_port(port, timeout=60)

        def blocked_and_fast(line, out):
            # The README says: {"ok":true} at once, then {"slept":2}. The
            # order of the two answers on the shared stdout is the claim.
            expect(out == '{"ok":true}{"slept":2}', line, out)

        rules = [(r"/blocks & .*/fast", blocked_and_fast)]
        for line, check in by_rules(shell_lines(found, "fastapi-try"), rules, "fastapi-try"):
            check(line, run_line(on_port(line, port), work, env, prefix=activate).stdout)

        output = server.stop()
        if "blocked the event loop" not in output:
            fail(f"fastapi: the server's log does not report the blocked event loop of /blocks:\n{output[-4000:]}")
    print("fastapi: ok (served, /fast answered while /blocks blocked, the stall was logged, clean exit)")


CHECKS = {"quickstart": check_quickstart, "app": check_app, "jobs": check_jobs, "fastapi": check_fastapi}


def main():
    with open(os.path.join(REPO, "README.md")) as f:
        found = blocks(f.read())
    wanted = sys.argv[1:] or list(CHECKS)
    for name in wanted:
        if name not in CHECKS:
            fail(f"unknown section `{name}`; known: {', '.join(CHECKS)}")
        print(f"== README: {name}", flush=True)
        CHECKS[name](found)


if __name__ == "__main__":
    main()
