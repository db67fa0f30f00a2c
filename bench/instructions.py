#!/usr/bin/env python3
"""Instructions per request on GET /fast under callgrind: fastlane against axum,
exact and repeatable where timings on this shared machine are not.

    python3 bench/instructions.py                   # fastlane (access log on, off) and axum
    python3 bench/instructions.py --write           # and into docs/BENCHMARKS.md
    python3 bench/instructions.py --seconds 10 \\
        --variant "old=/tmp/fastlane-old demo --stall-threshold-ms 1000"   # another build
    python3 bench/instructions.py --variant "actix-web=target/bench/release/actix-peer {port}"
    python3 bench/instructions.py --cache-sim       # and first-level cache misses

With `--cache-sim`, callgrind also simulates the caches (its model of this
machine's: 32 KiB 8-way first-level instruction and data caches, 64-byte
lines) and the table gets the misses a request costs in each. The model runs
the server's threads one at a time and leaves the kernel out, so it counts
what a request's own code and data need, not what the kernel evicts between
requests; the instruction-cache misses are the size of the code a request
runs, which is where servers differ more than in instructions.

Each server runs under `valgrind --tool=callgrind` with instrumentation off
while it starts and warms up (3 s of wrk), on for `--seconds` of
`wrk -t1 -c8`, then dumped. The count covers every thread of the server (its
log writer and monitor included) and is divided by the requests wrk
completed. fastlane runs as bench/run.py's throughput rows do (log level
`info`, its access log written to a file), with a stall threshold of a
second: under valgrind every thread runs about 50 times slower, one at a
time, and ordinary polls would cross the 10 ms default.

Builds nothing: run bench/run.py once first. Servers bind 127.0.0.1 only and
each is stopped by its own PID.
"""

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import datetime

from common import VARIANT_HELP, answers, variant_command, write_section

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench"
PORT = 18082
BEGIN, END = "<!-- instructions:begin -->", "<!-- instructions:end -->"


def wrk(seconds):
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", f"http://127.0.0.1:{PORT}/fast"],
                         capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))


# The callgrind events reported, by their names in its `events:` line.
EVENTS = {"Ir": "instructions", "I1mr": "instruction-cache misses", "D1mr": "data-cache read misses",
          "D1mw": "data-cache write misses"}


def measure(name, cmd, env, seconds, cache_sim=False):
    """Events per request (`Ir`, and with `cache_sim` the misses) and the
    requests wrk completed."""
    # A file name from the variant's name (which may hold `/` or spaces).
    stem = re.sub(r"[^A-Za-z0-9._()-]+", "-", name)
    dump = OUT / f"callgrind.{stem}.out"
    for old in OUT.glob(dump.name + "*"):
        old.unlink()
    log = open(OUT / f"callgrind.{stem}.log", "wb")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}"]
        + (["--cache-sim=yes"] if cache_sim else []) + cmd,
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    log.close()
    try:
        # Slow to start under valgrind: up to two minutes.
        if not answers(f"http://127.0.0.1:{PORT}/fast", 120):
            raise RuntimeError(f"{name} did not start under valgrind (see {log.name})")
        wrk(3)  # warm-up, not counted
        control = lambda *args: subprocess.run(["callgrind_control", *args, str(proc.pid)],
                                               capture_output=True, check=True, timeout=60)
        control("--zero")
        control("--instr=on")
        done = wrk(seconds)
        control("--instr=off")
        control("--dump=measured")
        time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)
    # The dump asked for (the one whose description says so); its `totals:`
    # line holds the events' counts in the order of its `events:` line.
    totals = None
    for path in OUT.glob(dump.name + "*"):
        text = path.read_text(errors="replace")
        if "desc: Trigger: dump measured" not in text:
            continue
        names = re.search(r"^events: (.+)$", text, re.M)
        found = re.search(r"^totals: ([\d ]+)$", text, re.M) or re.search(r"^summary: ([\d ]+)$", text, re.M)
        if names and found:
            counts = dict(zip(names.group(1).split(), map(int, found.group(1).split())))
            totals = {k: (totals or {}).get(k, 0) + v for k, v in counts.items()}
    if not totals or "Ir" not in totals:
        raise RuntimeError(f"no dump of the measured window for {name} in {OUT}")
    return {k: v / done for k, v in totals.items() if k in EVENTS}, done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=COMMAND",
                        help=VARIANT_HELP)
    parser.add_argument("--write", action="store_true",
                        help="write the table into docs/BENCHMARKS.md (its own section)")
    parser.add_argument("--cache-sim", action="store_true",
                        help="also count first-level cache misses (callgrind's cache model)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["which", "valgrind"], capture_output=True).returncode != 0:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    port = ["--port", str(PORT)]
    fastlane_args = ["demo", "--stall-threshold-ms", "1000"]
    servers = {
        "fastlane (access log on)": [str(ROOT / "target/release/fastlane")] + fastlane_args + port,
        "fastlane (access log off)":
            [str(ROOT / "target/release/fastlane")] + fastlane_args + ["--no-access-log"] + port,
        "axum": [str(ROOT / "target/bench/release/axum-peer"), str(PORT)],
    }
    for variant in args.variant:
        name, argv = variant_command(variant, PORT)
        servers[name] = argv
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    env["FASTLANE_JOBS_URL"] = "sqlite:///tmp/fastlane-bench-instructions.db"
    results = {}
    for name, cmd in servers.items():
        per_request, done = measure(name, cmd, env, args.seconds, args.cache_sim)
        results[name] = per_request
        counts = ", ".join(f"{EVENTS[k]} {v:,.0f}" for k, v in per_request.items())
        print(f"[instructions] {name}: {counts} per request over {done:,} requests", file=sys.stderr, flush=True)
    base = results["axum"]
    shown = [k for k in EVENTS if k in base]
    command = ("python3 bench/instructions.py --seconds " + str(args.seconds)
               + (" --cache-sim" if args.cache_sim else "")
               + "".join(f" --variant {shlex.quote(v)}" for v in args.variant))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        BEGIN,
        "## Instructions per request",
        "",
        f"Produced by `{command}` on {now}. Each server under `valgrind --tool=callgrind`, "
        f"counted over {args.seconds} s of `wrk -t1 -c8` on `GET /fast` after a 3 s warm-up, every "
        "thread of the server included, divided by the requests wrk completed. User-space "
        "instructions only: the kernel's share of a request (its `recv` and `send`, the "
        "wake-ups and switches: 70-75 % of a server's CPU samples under `perf` here) is not "
        "counted, and neither are context switches, so this ranks changes to fastlane's own code exactly but is "
        "not throughput (actix-web runs more instructions than axum and serves more requests a second)."
        + (" Cache misses are callgrind's model of this machine's first-level caches (32 KiB, 8-way, "
           "64-byte lines) with the threads run one at a time and the kernel left out. The model slows "
           "callgrind, so fewer requests share what a server's own threads do each second (fastlane's "
           "stall monitor ticks): its counts read a few hundred instructions higher than without it."
           if args.cache_sim else ""),
        "",
        "| server | " + " | ".join(f"{EVENTS[k]} per request | × axum" for k in shown) + " |",
        "| --- | " + " | ".join("---: | ---:" for _ in shown) + " |",
    ]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:,.0f} | {r[k] / base[k]:.2f}" for k in shown) + " |"
              for name, r in results.items()]
    lines.append(END)
    print("\n".join(lines))
    if args.write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", BEGIN, END, "\n".join(lines) + "\n")
        print("wrote the instructions section of docs/BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
