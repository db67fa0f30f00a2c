#!/usr/bin/env python3
"""Fails if the top-level modules of a crate depend on each other in a cycle.

A top-level module is a file or directory under `src/` (`server/`,
`routes/`, `metrics/`...). It depends on another when its code names it
(`crate::routes::...`, or `super::routes` in its own `mod.rs`). Each room of
a crate should be readable with only the rooms below it in mind: a cycle
means a change to either side may break the other (issue 14).

Usage: python3 .ci/module_cycles.py [CRATE_SRC_DIR...]   (default: crates/*/src)
"""

import glob
import os
import re
import sys


def modules(src):
    found = {}
    for path in glob.glob(os.path.join(src, "**", "*.rs"), recursive=True):
        top = os.path.relpath(path, src).split(os.sep)[0]
        top = top[:-3] if top.endswith(".rs") else top
        if top not in ("lib", "main"):
            found.setdefault(top, []).append(path)
    return found


def edges(src, mods):
    out = {m: {} for m in mods}
    for m, paths in mods.items():
        for path in paths:
            with open(path) as f:
                code = re.sub(r"//.*", "", f.read())
            names = re.findall(r"\bcrate::(\w+)", code)
            rel = os.path.relpath(path, src)
            if rel in (f"{m}.rs", os.path.join(m, "mod.rs")):
                names += re.findall(r"\bsuper::(\w+)", code)
            for name in names:
                if name in mods and name != m:
                    out[m].setdefault(name, os.path.relpath(path))
    return out


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def main():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    srcs = sys.argv[1:] or sorted(glob.glob(os.path.join(root, "crates", "*", "src")))
    failed = False
    for src in srcs:
        graph = edges(src, modules(src))
        for comp in cycles(graph):
            failed = True
            print(f"{os.path.relpath(src, root)}: modules in a cycle: {', '.join(comp)}")
            for a in comp:
                for b, where in sorted(graph[a].items()):
                    if b in comp:
                        print(f"  {a} -> {b}  (e.g. {where})")
    if failed:
        sys.exit(1)
    print(f"no cycle between the top-level modules of {len(srcs)} crates")


if __name__ == "__main__":
    main()
