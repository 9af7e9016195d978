#!/usr/bin/env python3
"""Finds import loops, between crates and between the modules of each crate.

Crates: from `cargo metadata` (normal and build dependencies between workspace members; a
dev-dependency of a lower crate on a higher one is reported too, since an example or test
reaching upward is the same design smell).

Modules: every `crate::a::b` path and every `super::` path in a crate's `src/` is resolved to the
module file it names; an edge from a module to a module that is not its own ancestor or
descendant is a dependency. Strongly connected components of more than one module are loops.
Test modules (`tests.rs`, `tests/`, `mod tests {...}` blocks are skipped by stripping
`#[cfg(test)]` items) do not count.

Exits 1 and prints each loop when there is one.
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crate_graph():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT))
    names = {p["name"] for p in meta["packages"]}
    graph, dev = {}, {}
    for p in meta["packages"]:
        graph[p["name"]] = {d["name"] for d in p["dependencies"]
                            if d["name"] in names and d.get("kind") != "dev"}
        dev[p["name"]] = {d["name"] for d in p["dependencies"]
                          if d["name"] in names and d.get("kind") == "dev"}
    return meta, graph, dev


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for m in graph.get(n, ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def strip_tests(text):
    """Removes `#[cfg(test)]` items (a `mod tests { ... }` block or a `mod tests;` line)."""
    out, i = [], 0
    while True:
        j = text.find("#[cfg(test)]", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        k = j + len("#[cfg(test)]")
        semi, brace = text.find(";", k), text.find("{", k)
        if semi >= 0 and (brace < 0 or semi < brace):
            i = semi + 1
            continue
        depth, p = 0, brace
        while p < len(text):
            if text[p] == "{":
                depth += 1
            elif text[p] == "}":
                depth -= 1
                if depth == 0:
                    break
            p += 1
        i = p + 1


def module_files(src):
    """Maps module path tuples to files, for `src/` of one crate."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].split(os.sep)
            if rel[0] in ("bin", "main") or "tests" in rel:
                continue
            if rel[-1] in ("lib", "mod"):
                rel = rel[:-1]
            mods[tuple(rel)] = os.path.join(dirpath, f)
    return mods


PATH = re.compile(r"\b(crate|super)((?:::(?:super|[A-Za-z_][A-Za-z0-9_]*))+)")
GROUP = re.compile(r"\b(crate|super)((?:::(?:super|[A-Za-z_][A-Za-z0-9_]*))*)::\{([^;]*?)\}", re.S)


def resolve(mods, here, head, tail):
    parts = [p for p in tail.split("::") if p]
    base = [] if head == "crate" else list(here[:-1])
    while parts and parts[0] == "super":
        base = base[:-1]
        parts = parts[1:]
    path = tuple(base + parts)
    while path and path not in mods:
        path = path[:-1]
    return path


def module_loops(src):
    mods = module_files(src)
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        # `super` inside a file named mod.rs/lib.rs refers to the parent of the module itself.
        here = mod + ("_",)
        text = strip_tests(open(path, encoding="utf-8").read())
        targets = set()
        for g in GROUP.finditer(text):
            for item in re.split(r",\s*", g.group(3)):
                first = item.strip().split("::")[0].split(" ")[0]
                if first and first != "self":
                    targets.add(resolve(mods, here, g.group(1), g.group(2) + "::" + first))
        for m in PATH.finditer(text):
            targets.add(resolve(mods, here, m.group(1), m.group(2)))
        for t in targets:
            related = t[:len(mod)] == mod or mod[:len(t)] == t
            if t in mods and not related:
                graph[mod].add(t)
    return [sorted("::".join(m) or "(root)" for m in c) for c in sccs(graph)]


def main():
    meta, graph, dev = crate_graph()
    failed = False
    for c in sccs(graph):
        print("crate loop:", " -> ".join(sorted(c)))
        failed = True
    for name, deps in dev.items():
        for d in deps:
            if name in reachable(graph, d):
                print(f"dev-dependency reaches upward: {name} -> {d} (which depends on {name})")
                failed = True
    for p in meta["packages"]:
        src = os.path.join(os.path.dirname(p["manifest_path"]), "src")
        if os.path.isdir(src):
            for loop in module_loops(src):
                print(f"module loop in {p['name']}:", " <-> ".join(loop))
                failed = True
    if not failed:
        print(f"no import loops ({len(meta['packages'])} crates)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
