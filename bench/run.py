#!/usr/bin/env python3
"""fastlane's benchmark runner: fastlane against axum, actix-web and
FastAPI+uvicorn on the demo's routes, in one run, one server after another.

    python3 bench/run.py                 # everything; writes docs/BENCHMARKS.md
    python3 bench/run.py --duration 3    # a quicker, noisier pass
    python3 bench/run.py --only throughput   # the throughput section alone

(The durable jobs benchmark is bench/jobs.py and the ASGI one bench/asgi.py;
each writes its own section of docs/BENCHMARKS.md, which this script keeps.)

It builds what it needs (fastlane and the Rust peers in release mode, a venv
with FastAPI for the Python peer, wrk from Debian's packages if missing), runs:

* mixed load: for each scenario, a fresh server; N slow requests kept in
  flight while `fastlane bench mixed` probes GET /fast at --rate per second
  (open loop, fresh connection each, latency from the scheduled send time);
* throughput: wrk on GET /fast, rounds alternating between servers, median:
  fastlane with its access log on (written to a file, as a service manager
  would) against axum, and with it off against actix-web; and, for
  comparison, against an axum with a production service's per-request
  layers (request id, access line, metrics);

and writes docs/BENCHMARKS.md and docs/bench-fast-p99.svg. Every server binds
127.0.0.1 only; every load is bounded in time; only processes this script
started are stopped, by their PID.
"""

import argparse
import datetime
import html
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import answers, tree_rss_kib

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV = BENCH / ".venv"
FASTLANE = ROOT / "target" / "release" / "fastlane"
PEER_TARGET = ROOT / "target" / "bench" / "release"
PORT = 18080

CAP_SCENARIO = "300 × /slow/async-blocking?secs=2 (past the thread cap)"
CAP_STORM_SCENARIO = "the same, refusals sent again at once"
BACKGROUND_SCENARIO = "8 × /?action=2&secs=1 (blocking background tasks)"
BACKGROUND_STORM_SCENARIO = "the same, refusals sent again at once "
# In these, a load client refused with 503 waits for its Retry-After before it
# sends again, as well-behaved clients and proxies do. In their "storm" twins
# it sends again at once: some 13,000 refusals a second, with the load
# generator, the probe and the server on the same 2 cores.
HONOR_RETRY_AFTER = {CAP_SCENARIO, BACKGROUND_SCENARIO}

SCENARIOS = [
    # (name, slow path, concurrency)
    ("idle", None, 0),
    ("control: 64 × /slow/async?secs=2", "/slow/async?secs=2", 64),
    ("1 × /slow/async-blocking?secs=2", "/slow/async-blocking?secs=2", 1),
    ("4 × /slow/async-blocking?secs=2", "/slow/async-blocking?secs=2", 4),
    ("64 × /slow/async-blocking?secs=2", "/slow/async-blocking?secs=2", 64),
    ("2 × /cpu/async-blocking?ms=1000", "/cpu/async-blocking?ms=1000", 2),
    ("4 × /cpu/async-blocking?ms=1000", "/cpu/async-blocking?ms=1000", 4),
    ("4 × /cpu/offload?ms=1000", "/cpu/offload?ms=1000", 4),
    # Past the thread cap (256 by default): 300 blocking requests kept in
    # flight.
    (CAP_SCENARIO, "/slow/async-blocking?secs=2", 300),
    (CAP_STORM_SCENARIO, "/slow/async-blocking?secs=2", 300),
    # Async background tasks that block for 1 s, scheduled by 8 clients in a
    # closed loop: far faster than they can finish.
    (BACKGROUND_SCENARIO, "/?action=2&secs=1", 8),
    (BACKGROUND_STORM_SCENARIO, "/?action=2&secs=1", 8),
]


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run(cmd, check=True, **kw)


def build():
    run(["cargo", "build", "--release", "-q", "-p", "fastlane-cli"], cwd=ROOT)
    peers = ["cargo", "build", "--release", "-q", "--target-dir", str(ROOT / "target" / "bench")]
    run(peers + ["-p", "axum-peer", "-p", "actix-peer"], cwd=BENCH)
    # Apart: its axum has the `matched-path` feature, which one build of the
    # workspace would give the plain axum peer too (a cost per request).
    run(peers + ["-p", "axum-production-peer"], cwd=BENCH)
    if not (VENV / "bin" / "gunicorn").exists():
        run([sys.executable, "-m", "venv", str(VENV)])
        run([str(VENV / "bin" / "pip"), "install", "-q", "-r", str(BENCH / "requirements.txt")])
    if shutil.which("wrk") is None:
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "wrk"])


def servers(variants=()):
    """The servers of the run; each `variants` entry (name, binary) is another fastlane build
    (an earlier commit built apart, say) serving the same demo, placed right after fastlane."""
    port = str(PORT)
    quiet = dict(os.environ, RUST_LOG="warn")
    return [
        ("fastlane", [str(FASTLANE), "demo", "--port", port], quiet, ROOT),
        *[(name, [binary, "demo", "--port", port], quiet, ROOT) for name, binary in variants],
        ("axum", [str(PEER_TARGET / "axum-peer"), port], os.environ.copy(), ROOT),
        ("actix-web", [str(PEER_TARGET / "actix-peer"), port], os.environ.copy(), ROOT),
        (
            "FastAPI+uvicorn",
            [str(VENV / "bin" / "uvicorn"), "fastapi_app:app", "--host", "127.0.0.1", "--port", port,
             "--log-level", "warning"],
            os.environ.copy(),
            BENCH / "peers",
        ),
    ]


class Server:
    """One server process, started fresh and stopped by its PID. `log`: a file
    its stderr goes to (truncated), else nowhere."""

    def __init__(self, name, cmd, env, cwd, log=None):
        self.name = name
        stderr = open(log, "wb") if log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr,
                                         start_new_session=True)
        finally:
            if log:
                stderr.close()
        if answers(f"http://127.0.0.1:{PORT}/fast", 30):
            return
        self.stop()
        raise RuntimeError(f"{name} did not start")

    def memory_kib(self):
        """Resident memory of the process and all its descendants."""
        return tree_rss_kib(self.proc.pid)[0]

    def stop(self):
        if self.proc.poll() is None:
            # The whole session: uvicorn's process pool children included.
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        time.sleep(0.3)


ACCESS_LOG = ROOT / "target" / "bench" / "access.log"
PEER_ACCESS_LOG = ROOT / "target" / "bench" / "axum-production-access.log"
LOG_ON = "fastlane (access log on)"
LOG_OFF = "fastlane (access log off)"
# axum with a production service's per-request layers (request id, access
# line, per-route metrics): bench/peers/axum-production-peer.
AXUM_PRODUCTION = "axum + request id, access log, metrics"


def throughput_servers(variants=()):
    """The throughput round's servers: fastlane as production runs it (`info`
    and the access log on, stderr to a file) and with the access log off,
    each variant as the first, then the peers (which log nothing per request)."""
    port = str(PORT)
    default_log = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    demo = [str(FASTLANE), "demo", "--port", port]
    peers = [s for s in servers() if s[0] != "fastlane"]
    return [
        (LOG_ON, demo, default_log, ROOT, ACCESS_LOG),
        (LOG_OFF, demo + ["--no-access-log"], default_log, ROOT, ACCESS_LOG),
        *[(f"{name} (access log on)", [binary, "demo", "--port", port], default_log, ROOT, ACCESS_LOG)
          for name, binary in variants],
        *[(name, cmd, env, cwd, None) for name, cmd, env, cwd in peers],
        (AXUM_PRODUCTION, [str(PEER_TARGET / "axum-production-peer"), port], os.environ.copy(), ROOT,
         PEER_ACCESS_LOG),
    ]


def run_throughput(args, variants):
    """`args.wrk_rounds` rounds of wrk on each server, the order alternating."""
    specs = throughput_servers(variants)
    names = [s[0] for s in specs]
    throughput = {name: [] for name in names}
    logged = {}
    for round_ in range(args.wrk_rounds):
        order = names if round_ % 2 == 0 else list(reversed(names))
        for name, cmd, env, cwd, log_file in [s for n in order for s in specs if s[0] == n]:
            server = Server(name, cmd, env, cwd, log_file)
            try:
                wrk(1)  # warm-up, not counted
                rps = wrk(args.wrk_seconds)
                throughput[name].append(rps)
                log(f"wrk {name}: {rps:,.0f} req/s")
            finally:
                server.stop()
            if log_file:
                with open(log_file, "rb") as f:
                    # fastlane's line, and tower-http's (the span names the
                    # request; the event says its status).
                    logged[name] = sum(1 for line in f if b"GET /fast 200" in line
                                       or (b"uri=/fast" in line and b"status=200" in line))
    return names, throughput, logged


def throughput_section(command, args, names, throughput, logged):
    """The "Hello-world throughput" section of docs/BENCHMARKS.md, between its markers."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    med = {n: statistics.median(v) for n, v in throughput.items()}
    lines = [
        "<!-- throughput:begin -->",
        "## Hello-world throughput",
        "",
        f"Produced by `{command}` on {now}. `wrk -t2 -c64 -d{args.wrk_seconds}s` on `GET /fast`, "
        f"{args.wrk_rounds} rounds alternating the order of the servers, a fresh server per round (after a 1 s "
        "warm-up); the median round counts. wrk runs on the same 2 cores as the server. fastlane runs as "
        "production would: log level `info`, isolation on, every feature compiled in (TLS, compression, "
        "OpenAPI) but not configured; with its access log on, its stderr goes to a file "
        f"(`target/bench/access.log`; the last round wrote {logged.get(LOG_ON, 0):,} `GET /fast` lines), and "
        "with `--no-access-log`. The plain peers log nothing per request. "
        f"`{AXUM_PRODUCTION}` is axum with what a production service adds to every request, done the usual "
        "way (bench/peers/axum-production-peer: tower-http's request id and `TraceLayer` access line through "
        "tracing-appender's non-blocking writer, buffered, to a file; per-route Prometheus metrics on the matched "
        f"path); the last round wrote {logged.get(AXUM_PRODUCTION, 0):,} lines for `GET /fast`.",
        "",
        "| server | requests/s (median) | rounds | fastlane (access log on) ÷ this | fastlane (access log off) ÷ this |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in names:
        rounds = ", ".join(f"{v:,.0f}" for v in throughput[n])
        lines.append(f"| {n} | {med[n]:,.0f} | {rounds} | {med[LOG_ON] / med[n]:.2f} | {med[LOG_OFF] / med[n]:.2f} |")
    on_axum, off_actix = med[LOG_ON] / med["axum"], med[LOG_OFF] / med["actix-web"]
    lines += [
        "",
        "| target (issue 16) | holds | ratio |",
        "| --- | --- | --- |",
        f"| access log on ≥ axum ({med[LOG_ON]:,.0f} vs {med['axum']:,.0f} req/s) | "
        f"{'yes' if on_axum >= 1 else '**no**'} | {on_axum:.2f} × axum |",
        f"| access log off ≥ actix-web ({med[LOG_OFF]:,.0f} vs {med['actix-web']:,.0f} req/s) | "
        f"{'yes' if off_actix >= 1 else '**no**'} | {off_actix:.2f} × actix-web |",
        "",
        f"Not a target, for comparison: fastlane with its access log on against axum doing the same per-request "
        f"work, {med[LOG_ON]:,.0f} vs {med[AXUM_PRODUCTION]:,.0f} req/s = "
        f"{med[LOG_ON] / med[AXUM_PRODUCTION]:.2f} × (fastlane's isolation on top).",
        "<!-- throughput:end -->",
    ]
    return lines


def worker_servers(n):
    """The same demo routes with N worker processes each: fastlane's
    supervisor, uvicorn --workers and gunicorn with uvicorn workers."""
    port = str(PORT)
    quiet = dict(os.environ, RUST_LOG="warn")
    py = os.environ.copy()
    return [
        ("fastlane --workers", [str(FASTLANE), "demo", "--port", port, "--workers", str(n)], quiet, ROOT),
        ("uvicorn --workers", [str(VENV / "bin" / "uvicorn"), "fastapi_app:app", "--host", "127.0.0.1", "--port", port,
                               "--workers", str(n), "--log-level", "warning"], py, BENCH / "peers"),
        ("gunicorn -k uvicorn", [str(VENV / "bin" / "gunicorn"), "-w", str(n), "-k", "uvicorn.workers.UvicornWorker",
                                 "-b", f"127.0.0.1:{port}", "--log-level", "warning", "fastapi_app:app"], py,
         BENCH / "peers"),
    ]


def mixed(scenario, path, concurrency, args):
    cmd = [str(FASTLANE), "bench", "mixed", "--json", "--fast", f"http://127.0.0.1:{PORT}/fast",
           "--rate", str(args.rate), "--duration", str(args.duration), "--timeout", "20"]
    if path:
        cmd += ["--load", f"http://127.0.0.1:{PORT}{path}", "--concurrency", str(concurrency)]
    if scenario in HONOR_RETRY_AFTER:
        cmd.append("--honor-retry-after")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=args.duration + 60)
    return json.loads(out.stdout)


def wrk(seconds):
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", f"http://127.0.0.1:{PORT}/fast"],
                         capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError("wrk printed no Requests/sec:\n" + out)


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def p99_of(fast):
    """The p99 to show: when more than 1 % of the probes failed, the 99th
    percentile is a failure, i.e. at least the probe's 20 s timeout."""
    if fast["sent"] and fast["errors"] / fast["sent"] > 0.01:
        return None
    return fast["p99_ms"]


def p99_cell(fast):
    p99 = p99_of(fast)
    return f"**{fmt(p99)}**" if p99 is not None else "**≥ 20,000 (timeouts)**"


def chart(results, names, path):
    """Grouped bars of /fast p99 per scenario, log scale."""
    colors = {"fastlane": "#2e8b57", "axum": "#4a6fa5", "actix-web": "#b5651d", "FastAPI+uvicorn": "#8e44ad"}
    left, top, row_h, bar_h, width = 390, 50, 18 * len(names) + 14, 16, 560
    height = top + row_h * len(SCENARIOS) + 60
    lo, hi = 1.0, 30000.0
    x = lambda ms: left + width * (math.log10(max(ms, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 200}" height="{height}" '
         f'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>',
         f'<text x="{left}" y="22" font-size="15">GET /fast p99 latency under each load (ms, log scale; lower is better)</text>']
    for tick in [1, 10, 100, 1000, 10000]:
        tx = x(tick)
        s.append(f'<line x1="{tx:.1f}" y1="{top - 8}" x2="{tx:.1f}" y2="{height - 45}" stroke="#ddd"/>'
                 f'<text x="{tx:.1f}" y="{height - 30}" text-anchor="middle">{tick:,}</text>')
    for i, (scenario, _, _) in enumerate(SCENARIOS):
        y0 = top + i * row_h
        s.append(f'<text x="{left - 8}" y="{y0 + row_h / 2:.1f}" text-anchor="end">{html.escape(scenario)}</text>')
        for j, name in enumerate(names):
            r = results[name][scenario]["fast"]
            p99 = p99_of(r)
            y = y0 + j * 18
            errs = r["errors"]
            if p99 is None or (isinstance(p99, float) and math.isnan(p99)):
                label = f"≥ 20,000: {errs} of {r['sent']} failed"
                p99 = hi
            else:
                label = f"{fmt(p99)}" + (f" ({errs} failed)" if errs else "")
            s.append(f'<rect x="{left}" y="{y}" width="{max(x(p99) - left, 1):.1f}" height="{bar_h}" '
                     f'fill="{colors.get(name, "#777")}"><title>{name}: {label} ms</title></rect>'
                     f'<text x="{x(p99) + 4:.1f}" y="{y + 12}" font-size="11">{label}</text>')
    for j, name in enumerate(names):
        lx = left + j * 140
        s.append(f'<rect x="{lx}" y="{height - 18}" width="12" height="12" fill="{colors.get(name, "#777")}"/>'
                 f'<text x="{lx + 16}" y="{height - 8}">{name}</text>')
    s.append("</svg>\n")
    path.write_text("\n".join(s))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per mixed scenario (default 10)")
    parser.add_argument("--rate", type=float, default=50.0, help="fast probes per second (default 50)")
    parser.add_argument("--wrk-seconds", type=int, default=5, help="seconds per wrk round (default 5)")
    parser.add_argument("--wrk-rounds", type=int, default=5, help="wrk rounds per server (default 5)")
    parser.add_argument("--only", choices=["throughput"],
                        help="run this part alone and replace its section of docs/BENCHMARKS.md")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=BINARY",
                        help="also run this fastlane binary's demo under NAME (repeatable): an earlier commit "
                             "built apart, to compare in the same run")
    parser.add_argument("--chart-only", action="store_true",
                        help="redraw docs/bench-fast-p99.svg from docs/bench-results.json, measuring nothing")
    args = parser.parse_args()
    if args.chart_only:
        out = Path(args.out)
        raw = json.loads((out.parent / "bench-results.json").read_text())
        chart(raw["mixed"], list(raw["mixed"]), out.parent / "bench-fast-p99.svg")
        return
    variants = []
    for spec in args.variant:
        name, sep, binary = spec.partition("=")
        if not sep or not name or not Path(binary).is_file():
            parser.error(f"--variant {spec!r}: expected NAME=BINARY with an existing binary")
        variants.append((name, binary))
    command = "python3 bench/run.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("out", "variant") and v != parser.get_default(k))
    command += "".join(f" --variant '{v}'" for v in args.variant)

    build()
    if args.only == "throughput":
        names, throughput, logged = run_throughput(args, variants)
        out = Path(args.out)
        old = out.read_text()
        begin, end = "<!-- throughput:begin -->", "<!-- throughput:end -->"
        if begin not in old or end not in old:
            sys.exit(f"{out} has no throughput section to replace: run bench/run.py in full")
        section = "\n".join(throughput_section(command, args, names, throughput, logged))
        out.write_text(old.split(begin, 1)[0] + section + old.split(end, 1)[1])
        log(f"wrote the throughput section of {out}")
        return
    specs = servers(variants)
    names = [s[0] for s in specs]
    results = {name: {} for name in names}
    memory = {}
    for name, cmd, env, cwd in specs:
        for scenario, path, conc in SCENARIOS:
            server = Server(name, cmd, env, cwd)
            try:
                if scenario == "idle":
                    memory[name] = server.memory_kib()
                log(f"{name}: {scenario}")
                results[name][scenario] = mixed(scenario, path, conc, args)
                log(f"  -> {results[name][scenario]['fast']}")
            finally:
                server.stop()

    worker_memory = {}
    for name, cmd, env, cwd in worker_servers(2):
        server = Server(name, cmd, env, cwd)
        try:
            time.sleep(2)  # every worker up, not only the first to answer
            worker_memory[name] = server.memory_kib()
        finally:
            server.stop()

    tp_names, throughput, logged = run_throughput(args, variants)
    throughput_lines = throughput_section(command, args, tp_names, throughput, logged)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chart(results, names, out.parent / "bench-fast-p99.svg")
    raw = {"command": command, "mixed": results, "throughput": throughput, "idle_rss_kib": memory,
           "idle_rss_kib_2_workers": worker_memory}
    (out.parent / "bench-results.json").write_text(json.dumps(raw, indent=1) + "\n")
    write_report(out, command, args, names, results, throughput_lines, memory, worker_memory)
    log(f"wrote {out}")


def write_report(out, command, args, names, results, throughput_lines, memory, worker_memory):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {now}, on this project's machine "
        f"({os.cpu_count()} cores, {platform.system()} {platform.release()}), every server in the same run, "
        "one after another. The machine is shared and noisy: compare within one run, as ratios.",
        "",
        "## A fast route while slow requests run",
        "",
        f"`fastlane bench mixed` probes `GET /fast` at {args.rate:g} requests/s for {args.duration:g} s "
        "(open loop, a fresh connection each, latency from the scheduled send time, no warm-up) while the "
        "slow requests of the scenario are kept in flight. Each scenario starts a fresh server. "
        "Latencies in ms (p50 and max of the probes that succeeded); `>100ms` counts probes slower than 100 ms "
        "or failed (a probe fails after 20 s). When over 1 % of the probes failed, the p99 is a failure. "
        "The slow requests are sent from a thread and runtime of their own, so that a load answered at once "
        "(the refusals past the thread cap, sent again at once) does not delay the probe inside its own client. "
        "In the two scenarios past the edges, a client refused with `503` waits for its `Retry-After` (1 s) "
        "before it sends again, as well-behaved clients and proxies do; in their twins it sends again at once "
        "(about 13,000 refusals a second, load generator, probe and server on the same 2 cores). The targets "
        "apply to the first; the twins are shown as they are, and count in the 100 ms check.",
        "",
    ]
    header = "| scenario | " + " | ".join(f"{n} p50 / p99 / max | {n} >100ms" for n in names) + " |"
    lines.append(header)
    lines.append("|" + " --- |" * (1 + 2 * len(names)))
    for scenario, _, _ in SCENARIOS:
        cells = []
        for n in names:
            f = results[n][scenario]["fast"]
            cells.append(f"{fmt(f['p50_ms'])} / {p99_cell(f)} / {fmt(f['max_ms'])}")
            cells.append(f"{f['over_100ms']}" + (f" ({f['errors']} errors)" if f["errors"] else ""))
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    lines += ["", "![GET /fast p99 per scenario](bench-fast-p99.svg)", ""]
    lines += [
        "The slow requests themselves in the same runs: answered with a 2xx / refused, failed or cut by the end "
        "of the run (a refused request is sent again after its `Retry-After`, or at once in the twins).",
        "",
        "| scenario | " + " | ".join(names) + " |",
        "|" + " --- |" * (1 + len(names)),
    ]
    for scenario, path, _ in SCENARIOS:
        if path is None:
            continue
        cells = [f"{results[n][scenario]['load_ok']:,} / {results[n][scenario]['load_errors']:,}" for n in names]
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    lines.append("")

    fl = results["fastlane"]
    control = fl["control: 64 × /slow/async?secs=2"]["fast"]["p99_ms"]
    offload = fl["4 × /cpu/offload?ms=1000"]["fast"]["p99_ms"]
    checks = []
    for n in (1, 4, 64):
        p99 = fl[f"{n} × /slow/async-blocking?secs=2"]["fast"]["p99_ms"]
        bound = 2 * control + 10
        checks.append((f"{n} × blocking: p99 {fmt(p99)} ≤ 2 × control {fmt(control)} + 10 = {fmt(bound)}",
                       p99 <= bound, f"{p99 / control:.2f} × control"))
    for scenario in (CAP_SCENARIO, BACKGROUND_SCENARIO):
        p99 = fl[scenario]["fast"]["p99_ms"]
        bound = 2 * control + 10
        checks.append((f"{scenario}: p99 {fmt(p99)} ≤ 2 × control {fmt(control)} + 10 = {fmt(bound)}",
                       p99 <= bound, f"{p99 / control:.2f} × control"))
    p99 = fl["4 × /cpu/async-blocking?ms=1000"]["fast"]["p99_ms"]
    checks.append((f"4 × CPU hogs: p99 {fmt(p99)} ≤ 2 × offload {fmt(offload)} + 10 = {fmt(2 * offload + 10)}",
                   p99 <= 2 * offload + 10, f"{p99 / offload:.2f} × offload"))
    worst = max(r["fast"]["max_ms"] for r in fl.values())
    failed = sum(r["fast"]["errors"] for r in fl.values())
    checks.append((f"no fastlane /fast probe failed ({failed}) or took over 100 ms (slowest {fmt(worst)} ms)",
                   failed == 0 and worst <= 100, ""))
    lines += ["### fastlane against its targets (this run)", "", "| target | holds | ratio |", "| --- | --- | --- |"]
    lines += [f"| {c} | {'yes' if ok else '**no**'} | {ratio} |" for c, ok, ratio in checks]
    lines += [""] + throughput_lines
    lines += [
        "",
        "## Idle memory",
        "",
        "Resident memory of a fresh server (and its child processes) before any load.",
        "",
        "| server | RSS (MiB) |",
        "| --- | --- |",
    ]
    lines += [f"| {n} | {memory[n] / 1024:.1f} |" for n in names]
    lines += [
        "",
        "With 2 worker processes (the whole process tree: supervisor or master and workers; the FastAPI app "
        "starts its CPU process pool on first use, so none here), idle:",
        "",
        "| server | RSS total (MiB) | per worker (MiB) |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {n} | {kib / 1024:.1f} | {kib / 2048:.1f} |" for n, kib in worker_memory.items()]
    lines.append("")
    # The durable jobs, ASGI and instructions sections are bench/jobs.py's, bench/asgi.py's and
    # bench/instructions.py's, the CPU one a bench/cpu.py run's: keep them.
    old = out.read_text() if out.exists() else ""
    for part in ("jobs", "asgi", "cpu", "instructions"):
        begin, end = f"<!-- {part}:begin -->", f"<!-- {part}:end -->"
        if begin in old and end in old:
            lines.append(begin + old.split(begin, 1)[1].split(end, 1)[0] + end)
            lines.append("")
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
