#!/usr/bin/env python3
"""fastlane's job benchmark runner: fastlane-jobs on SQLite and on
PostgreSQL against Celery with a Redis broker, in one run.

    python3 bench/jobs.py                  # writes the jobs section of docs/BENCHMARKS.md
    python3 bench/jobs.py --jobs 10000     # a quicker, noisier pass

It builds what it needs (fastlane in release mode, a venv with Celery),
starts PostgreSQL and Redis if they are not running (and stops only what it
started), and measures:

* throughput: `fastlane jobs bench --jobs N --json` (N no-op jobs enqueued
  in batches while a worker drains them; end to end, first enqueue to last
  job done) on a fresh SQLite file and a fresh PostgreSQL database, and
  Celery doing the same (N no-op tasks published while a worker drains them),
  in rounds alternating the order; the median round counts; and the same
  jobs as chains of 10 (`--chain 10`; Celery's `chain`);
* recovery: K long `sleep` jobs run by a worker that is SIGKILLed; a second
  worker starts at once; the time until every job runs again under it. The
  same with Celery (default settings), watched for a fixed time.

Results go to docs/BENCHMARKS.md (between the `jobs` markers, the rest of the
file is kept) and docs/bench-jobs.json. Only processes this script started
are stopped, by their PID; Redis keys and PostgreSQL databases it uses are
its own.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_section

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV = BENCH / ".venv"
FASTLANE = ROOT / "target" / "release" / "fastlane"
PG_ADMIN = os.environ.get("FASTLANE_BENCH_PG_ADMIN", "postgres://postgres@127.0.0.1:5432/postgres")
PG_BASE = PG_ADMIN.rsplit("/", 1)[0]
PG_DB = "fastlane_bench_jobs"
REDIS_URL = "redis://127.0.0.1:6379/15"
BEGIN, END = "<!-- jobs:begin -->", "<!-- jobs:end -->"
# Steps per chain in the workflow rows.
CHAIN = 10
# The rate limit of the limited rows: far above what a queue reaches, so
# that the rows show what checking a limit costs.
RATE = "1000000/s"


def log(msg):
    print(f"[jobs-bench] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


def reachable(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def build():
    run(["cargo", "build", "--release", "-q", "-p", "fastlane-cli"], cwd=ROOT)
    if not (VENV / "bin" / "celery").exists():
        if not (VENV / "bin" / "pip").exists():
            run([sys.executable, "-m", "venv", str(VENV)])
        run([str(VENV / "bin" / "pip"), "install", "-q", "-r", str(BENCH / "requirements.txt")])


def services():
    """Starts PostgreSQL and Redis if they are not running; returns what to stop."""
    started = []
    if not reachable(5432):
        clusters = sorted(os.listdir("/etc/postgresql"))
        run(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[0], "main", "start"])
    if not reachable(6379):
        redis = subprocess.Popen(["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", ""],
                                 stdout=subprocess.DEVNULL)
        started.append(redis)
        deadline = time.time() + 10
        while not reachable(6379):
            if time.time() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.1)
    return started


def psql(sql):
    run(["psql", PG_ADMIN, "-q", "-c", sql], stdout=subprocess.DEVNULL)


def fresh_pg():
    psql(f"DROP DATABASE IF EXISTS {PG_DB}")
    psql(f"CREATE DATABASE {PG_DB}")
    return f"{PG_BASE}/{PG_DB}"


def fastlane_bench(url, jobs, chain=1, rate=None):
    cmd = [str(FASTLANE), "jobs", "bench", "--url", url, "--jobs", str(jobs), "--chain", str(chain), "--json"]
    if rate:
        cmd += ["--rate", rate]
    return json.loads(run(cmd, capture_output=True, text=True).stdout)


# --- Celery -----------------------------------------------------------------

CELERY_DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import celery
import celery_app as ca
n, steps = int(sys.argv[2]), int(sys.argv[3])
r = ca.counter
t0 = time.time()
with ca.app.producer_or_acquire() as producer:
    if steps == 1:
        for _ in range(n):
            ca.noop.apply_async(producer=producer)
    else:
        # Chains of `steps` immutable no-ops: the worker sends each next step
        # when the one before succeeds.
        for _ in range(n // steps):
            celery.chain(*(ca.noop.si() for _ in range(steps))).apply_async(producer=producer)
t1 = time.time()
deadline = t0 + 600
while int(r.get(ca.DONE_KEY) or 0) < n and time.time() < deadline:
    time.sleep(0.005)
t2 = time.time()
done = int(r.get(ca.DONE_KEY) or 0)
print(json.dumps({"jobs": done, "enqueue_per_s": n / (t1 - t0), "jobs_per_s": done / (t2 - t0),
                  "seconds": t2 - t0}))
"""


class Celery:
    """A Celery worker of bench/peers/celery_app.py, in its own session."""

    def __init__(self, concurrency, keys):
        self.env = dict(os.environ, CELERY_BROKER_URL=REDIS_URL, BENCH_DONE_KEY=keys[0],
                        BENCH_STARTED_KEY=keys[1])
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "celery"), "-A", "celery_app", "worker", "--concurrency", str(concurrency),
             "--loglevel", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=BENCH / "peers", env=self.env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(4)  # the pool is up (Celery has no ready signal without events)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            self.kill()


def redis_cmd(*args):
    out = subprocess.run(["redis-cli", "-u", REDIS_URL, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def celery_clean(keys):
    # Celery's own keys in our database (15) and our counters; nothing else.
    redis_cmd("DEL", "celery", "unacked", "unacked_index", "unacked_mutex", *keys)


def celery_bench(jobs, chain=1):
    keys = (f"fastlane-bench:done:{os.getpid()}", f"fastlane-bench:started:{os.getpid()}")
    celery_clean(keys)
    worker = Celery(os.cpu_count() or 2, keys)
    try:
        out = subprocess.run([str(VENV / "bin" / "python"), "-c", CELERY_DRIVER, str(BENCH / "peers"), str(jobs),
                              str(chain)],
                             env=worker.env, check=True, capture_output=True, text=True).stdout
        return json.loads(out)
    finally:
        worker.stop()
        celery_clean(keys)


# --- Recovery ---------------------------------------------------------------

def fastlane_recovery(url, k, elsewhere):
    """Seconds from SIGKILL of the worker running k jobs to all k running
    again under a second worker: on this host, or (`elsewhere`) in a PID
    namespace of its own, which cannot see the first worker's processes, as
    on another host."""
    run([str(FASTLANE), "jobs", "enqueue", "--url", url, "sleep", "--payload", '{"ms": 120000}',
         "--count", str(k), "--queue", "recovery"], stdout=subprocess.DEVNULL)
    listed = subprocess.run([str(FASTLANE), "jobs", "list", "--url", url, "--limit", str(k)],
                            check=True, capture_output=True, text=True).stdout
    ids = [line.split()[0] for line in listed.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(ids) == k, listed

    def worker(isolated=False):
        cmd = [str(FASTLANE), "jobs", "work", "--url", url, "--queue", "recovery", "--concurrency", str(k),
               "--grace-period", "0"]
        if isolated:
            cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *cmd]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def owners():
        seen = {}
        for id_ in ids:
            info = json.loads(subprocess.run([str(FASTLANE), "jobs", "show", "--url", url, id_], check=True,
                                             capture_output=True, text=True).stdout)
            running = [a for a in info["attempts"] if a["finished_at_ms"] is None]
            seen[id_] = running[-1]["consumer"] if info["state"] == "running" and running else None
        return seen

    first = worker()
    deadline = time.time() + 30
    while any(w != f"consumer-{first.pid}" for w in owners().values()):
        if time.time() > deadline:
            sys.exit("the first worker did not start every job")
        time.sleep(0.2)
    time.sleep(1)
    first.send_signal(signal.SIGKILL)
    killed = time.time()
    first.wait()
    second = worker(elsewhere)
    try:
        while True:
            now = owners().values()
            if all(w is not None and w != f"consumer-{first.pid}" for w in now):
                return time.time() - killed
            if time.time() - killed > 60:
                return None
            time.sleep(0.1)
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait()


def celery_recovery(k, watch):
    """How many of k running tasks run again within `watch` s after their worker is SIGKILLed."""
    keys = (f"fastlane-bench:done:{os.getpid()}", f"fastlane-bench:started:{os.getpid()}")
    celery_clean(keys)
    first = Celery(k, keys)
    driver = ("import sys; sys.path.insert(0, sys.argv[1]); import celery_app as ca\n"
              "for _ in range(int(sys.argv[2])): ca.sleep.delay(120000)")
    subprocess.run([str(VENV / "bin" / "python"), "-c", driver, str(BENCH / "peers"), str(k)],
                   env=first.env, check=True)
    deadline = time.time() + 30
    while int(redis_cmd("GET", keys[1]) or 0) < k:
        if time.time() > deadline:
            sys.exit("the Celery worker did not start every task")
        time.sleep(0.1)
    time.sleep(1)
    first.kill()
    second = Celery(k, keys)
    try:
        time.sleep(max(0, watch - 4))
        return int(redis_cmd("GET", keys[1]) or 0) - k
    finally:
        second.stop()
        celery_clean(keys)


# --- Report -----------------------------------------------------------------

def report(command, args, rounds, recovery):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    med = {name: statistics.median(r["jobs_per_s"] for r in runs) for name, runs in rounds.items()}
    enq = {name: statistics.median(r["enqueue_per_s"] for r in runs) for name, runs in rounds.items()}
    lines = [
        BEGIN,
        "## Durable jobs",
        "",
        f"Produced by `{command}` on {now} ({os.cpu_count()} cores, {platform.system()} {platform.release()}), "
        "every system in the same run, rounds alternating the order.",
        "",
        f"### Throughput: {args.jobs:,} no-op jobs, end to end",
        "",
        "fastlane: `fastlane jobs bench --url URL --jobs N --json` (enqueued in batches of 1,000, one transaction "
        "each, while a worker of concurrency 256 drains them; jobs/s from the first enqueue to the last job "
        "recorded as succeeded), on a fresh SQLite file and a fresh PostgreSQL database (local server). Celery "
        f"{celery_version()}: the same count of no-op tasks published one by one (Celery has no batch publish) "
        "on a Redis broker while a worker (prefork, concurrency = cores, prefetch 64, no result backend) "
        "drains them; each task counts itself in Redis so the runner sees the end. Rows *chains of "
        f"{CHAIN}*: the same jobs as chains of {CHAIN} steps, each step waiting for the one before "
        f"(fastlane: `--chain {CHAIN}`, whole chains enqueued about 1,000 jobs per transaction; each step is "
        "released by the success of the one before, in its transaction, and handed its result; Celery: "
        f"`chain(noop.si(), ...)` of {CHAIN}, the worker sending each next step). Rows *limit {RATE}*: the "
        f"plain jobs on a queue with a rate limit of {RATE} (`--rate`), which they never reach: what checking a "
        "limit costs (each claim of a limited queue locks the queue's row, counts, claims and spends tokens "
        "in one transaction).",
        "",
        "| system | end to end (jobs/s, median) | enqueue (jobs/s, median) | rounds (end to end) | ÷ Celery |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, runs in rounds.items():
        each = ", ".join(f"{r['jobs_per_s']:,.0f}" for r in runs)
        peer = f"Celery + Redis, chains of {CHAIN}" if "chains" in name else "Celery + Redis"
        lines.append(f"| {name} | {med[name]:,.0f} | {enq[name]:,.0f} | {each} | "
                     f"{med[name] / med[peer]:.1f} × |")
    lines += ["", "| a limit not reached | limited ÷ unlimited (medians, same run) |", "| --- | --- |"]
    for store in ("SQLite", "PostgreSQL"):
        plain, limited = med[f"fastlane-jobs {store}"], med[f"fastlane-jobs {store}, limit {RATE}"]
        lines.append(f"| fastlane-jobs {store} | {limited / plain:.2f} × ({limited:,.0f} against {plain:,.0f} jobs/s) |")
    # The targets of issue 15, for independent no-op jobs.
    lines += ["", "| target | holds |", "| --- | --- |"]
    for name, target in (("fastlane-jobs SQLite", 30_000), ("fastlane-jobs PostgreSQL", 25_000)):
        lines.append(f"| {name} ≥ {target:,} jobs/s end to end ({med[name]:,.0f}) | "
                     f"{'yes' if med[name] >= target else '**no**'} |")
    k = args.recovery_jobs
    lines += [
        "",
        "### Recovery after a worker is killed",
        "",
        f"{k} `sleep` jobs of 120 s run on a worker (default lease 15 s, renewed every 5 s); the worker is "
        "SIGKILLed 1 s after it started them; a second worker starts at once. Measured: seconds from the kill "
        "until every job runs again under the second worker (its attempt recorded; the dead worker's attempt "
        "closed as `lease expired`). A worker sees every second whether the processes of its host that hold "
        "jobs still run (boot id, PID namespace, PID and start time) and takes over a dead one's jobs at once; "
        "a worker that cannot see the dead process (another host; here, another PID namespace) waits for the "
        "lease.",
        "",
        "| system | recovered | after (s) |",
        "| --- | --- | --- |",
    ]
    for name, secs in recovery["fastlane"].items():
        if secs is None:
            lines.append(f"| {name} | not within 60 s | — |")
        else:
            lines.append(f"| {name} | all {k} | {secs:.1f} |")
    c = recovery["celery"]
    lines.append(f"| Celery + Redis (defaults: acks on receipt) | {c['recovered']} of {k} within {c['watched']} s "
                 "| — |")
    lines += [
        "",
        "A lease of 15 s renewed every 5 s expires 10 to 15 s after the kill. Celery by default acknowledges a "
        "task when a worker receives it, so a task whose worker dies is lost; with `acks_late` it comes back "
        "when the broker's visibility timeout (1 h by default on Redis) ends.",
        END,
    ]
    return "\n".join(lines) + "\n"


def celery_version():
    out = subprocess.run([str(VENV / "bin" / "celery"), "--version"], capture_output=True, text=True).stdout
    return out.split()[0] if out else "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50_000, help="no-op jobs per throughput round (default 50000)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per system (default 3)")
    parser.add_argument("--recovery-jobs", type=int, default=10, help="jobs in the recovery test (default 10)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    command = "python3 bench/jobs.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "out" and v != parser.get_default(k))

    build()
    started = services()
    try:
        tmp = Path(tempfile.mkdtemp(prefix="fastlane-jobs-bench-"))
        systems = ["fastlane-jobs SQLite", "fastlane-jobs PostgreSQL", "Celery + Redis",
                   f"fastlane-jobs SQLite, chains of {CHAIN}", f"fastlane-jobs PostgreSQL, chains of {CHAIN}",
                   f"Celery + Redis, chains of {CHAIN}",
                   f"fastlane-jobs SQLite, limit {RATE}", f"fastlane-jobs PostgreSQL, limit {RATE}"]
        rounds = {name: [] for name in systems}
        for round_ in range(args.rounds):
            order = systems if round_ % 2 == 0 else list(reversed(systems))
            for name in order:
                chain = CHAIN if "chains" in name else 1
                rate = RATE if "limit" in name else None
                if name.startswith("fastlane-jobs SQLite"):
                    db = f"sqlite://{tmp}/bench-{round_}-{chain}-{bool(rate)}.db"
                    result = fastlane_bench(db, args.jobs, chain, rate)
                elif name.startswith("fastlane-jobs PostgreSQL"):
                    result = fastlane_bench(fresh_pg(), args.jobs, chain, rate)
                else:
                    result = celery_bench(args.jobs, chain)
                rounds[name].append(result)
                log(f"{name}: {result['jobs_per_s']:,.0f} jobs/s end to end, enqueue {result['enqueue_per_s']:,.0f}/s")

        k = args.recovery_jobs
        recovery = {"fastlane": {
            "fastlane-jobs SQLite, second worker on the same host":
                fastlane_recovery(f"sqlite://{tmp}/recovery-1.db", k, False),
            "fastlane-jobs PostgreSQL, second worker on the same host":
                fastlane_recovery(fresh_pg(), k, False),
            "fastlane-jobs SQLite, second worker in another PID namespace (as on another host)":
                fastlane_recovery(f"sqlite://{tmp}/recovery-2.db", k, True),
            "fastlane-jobs PostgreSQL, second worker in another PID namespace (as on another host)":
                fastlane_recovery(fresh_pg(), k, True),
        }}
        log(f"fastlane recovery: {recovery['fastlane']}")
        watched = 30
        recovery["celery"] = {"recovered": celery_recovery(k, watched), "watched": watched}
        log(f"celery recovery: {recovery['celery']}")
        psql(f"DROP DATABASE IF EXISTS {PG_DB}")
    finally:
        for proc in started:
            proc.terminate()
            proc.wait()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "bench-jobs.json").write_text(
        json.dumps({"command": command, "rounds": rounds, "recovery": recovery}, indent=1) + "\n")
    write_section(out, BEGIN, END, report(command, args, rounds, recovery))
    log(f"wrote the jobs section of {out}")


if __name__ == "__main__":
    main()
