"""What the benchmark runners (run.py, jobs.py, asgi.py) share: the memory of a server's process
tree, and writing one runner's section of docs/BENCHMARKS.md without touching the others'."""

import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def answers(url, seconds):
    """Whether `url` answers 200 within `seconds` (tried every 0.1 s)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def tree(pid):
    """`pid` and all its descendants."""
    pids, frontier = [], [pid]
    while frontier:
        pid = frontier.pop()
        pids.append(pid)
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
        frontier += [int(p) for p in out.stdout.split()]
    return pids


def tree_rss_kib(pid):
    """Resident memory of a process and all its descendants, in KiB, and how many processes."""
    pids = tree(pid)
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total, len(pids)


def write_section(out, begin, end, section):
    """Replaces the text between `begin` and `end` in `out` with `section` (which carries the
    markers), or appends it if the markers are not there yet."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.write_text(text)


VARIANT_HELP = ("another server to measure, as NAME=COMMAND: `{port}` in the command is the port, "
                "else it gets --port PORT appended")


def variant_command(variant, port):
    """A `--variant NAME=COMMAND` of bench/cpu.py or bench/instructions.py as (name, argv), with
    `{port}` in the command replaced by `port`, or `--port PORT` appended when it has none."""
    name, _, cmd = variant.partition("=")
    if not cmd:
        sys.exit(f"--variant wants NAME=COMMAND, got {variant!r}")
    parts = shlex.split(cmd)
    if "{port}" in cmd:
        return name, [p.replace("{port}", str(port)) for p in parts]
    return name, parts + ["--port", str(port)]
