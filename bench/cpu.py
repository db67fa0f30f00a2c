#!/usr/bin/env python3
"""Server CPU time per request on GET /fast, fastlane against axum, in one run.

    python3 bench/cpu.py                      # 6 rounds of 4 s each
    python3 bench/cpu.py --rounds 8 --seconds 4 \\
        --variant "no isolation=target/release/fastlane demo --no-isolation" \\
        --variant "actix-web=target/bench/release/actix-peer {port}"
    python3 bench/cpu.py --access-log         # fastlane as run in production

By default fastlane runs with RUST_LOG=warn (no access log). With
--access-log it logs at `info`, a line per request, to a file
(target/bench/cpu-access.log), as bench/run.py's throughput rows do.

Requests per second on this shared 2-core machine swing by ±20 % from one
round to the next, because wrk runs on the same cores; the CPU time the
server spends per request (utime + stime from /proc, divided by the requests
wrk completed) is much steadier, and it is what limits throughput. Each
round starts every server fresh, warms it up for 1 s, then runs
`wrk -t2 -c64`; the order alternates between rounds. Reports the medians and
their ratio to axum.

Builds nothing: run bench/run.py once first (it builds fastlane and the
peers). Servers bind 127.0.0.1 only; each is stopped by its own PID.
"""

import argparse
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import VARIANT_HELP, variant_command

ROOT = Path(__file__).resolve().parent.parent
PORT = 18081


def ticks(pid):
    """utime + stime of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wrk(seconds):
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", f"http://127.0.0.1:{PORT}/fast"],
                         capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, done


def measure(cmd, env, seconds, log):
    stderr = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                            start_new_session=True)
    if log:
        stderr.close()
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/fast", timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start")
                time.sleep(0.1)
        wrk(1)  # warm-up, not counted
        before = ticks(proc.pid)
        rps, done = wrk(seconds)
        used = ticks(proc.pid) - before
        return rps, used / os.sysconf("SC_CLK_TCK") * 1e6 / done
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=COMMAND",
                        help=VARIANT_HELP)
    parser.add_argument("--access-log", action="store_true",
                        help="log at info (a line per request) to target/bench/cpu-access.log")
    args = parser.parse_args()
    log = ROOT / "target" / "bench" / "cpu-access.log" if args.access_log else None
    port = ["--port", str(PORT)]
    servers = {
        "fastlane": [str(ROOT / "target/release/fastlane"), "demo"] + port,
        "axum": [str(ROOT / "target/bench/release/axum-peer"), str(PORT)],
    }
    for variant in args.variant:
        name, argv = variant_command(variant, PORT)
        servers[name] = argv
    env = dict(os.environ, RUST_LOG="info" if log else "warn",
               FASTLANE_JOBS_URL="sqlite:///tmp/fastlane-bench-cpu.db")
    rps = {name: [] for name in servers}
    cpu = {name: [] for name in servers}
    for round_ in range(args.rounds):
        order = list(servers.items()) if round_ % 2 == 0 else list(reversed(servers.items()))
        for name, cmd in order:
            r, c = measure(cmd, env, args.seconds, log)
            rps[name].append(r)
            cpu[name].append(c)
            print(f"[cpu] round {round_ + 1} {name}: {r:,.0f} req/s, {c:.1f} us CPU per request",
                  file=sys.stderr, flush=True)
    base_rps, base_cpu = statistics.median(rps["axum"]), statistics.median(cpu["axum"])
    print(f"command: python3 bench/cpu.py --rounds {args.rounds} --seconds {args.seconds}"
          + (" --access-log" if log else "")
          + "".join(f" --variant {shlex.quote(v)}" for v in args.variant))
    print("| server | req/s (median) | × axum | CPU µs per request (median) | × axum |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in servers:
        r, c = statistics.median(rps[name]), statistics.median(cpu[name])
        print(f"| {name} | {r:,.0f} | {r / base_rps:.2f} | {c:.1f} | {c / base_cpu:.2f} |")


if __name__ == "__main__":
    main()
