#!/usr/bin/env python3
"""Fails when two modules of one crate import each other, directly or through others.

Every pair of sibling modules (children of the same parent, e.g. `krun::agent` and
`krun::capture`, or `mesh::identity::csr` and `mesh::identity::signer`) is a node; an edge
a -> b is any path in a's files that names b (`crate::b`, `super::b`, `b::` after a `use`
of it). A child naming its own parent, or a parent its child, is how Rust modules work and
is not counted. Run by `make lint`; prints each cycle it finds.
"""
import pathlib
import re
import sys

CRATES = {"hbone": "hbone/src", "mesh": "mesh/src", "krun": "launcher/src", "hgate": "hgate/src"}
PATH = re.compile(r"\b((?:crate|super|self)(?:::[a-z_][a-z0-9_]*)*)(?:::\{([^}]*)\})?")


def paths(line: str):
    """Every module path a line names, with `use a::{b, c::d}` groups expanded."""
    for head, group in PATH.findall(line):
        if group:
            for item in group.split(","):
                yield head + "::" + item.strip().split(" ")[0]
        elif "::" in head:
            yield head


def module_of(root: pathlib.Path, file: pathlib.Path) -> tuple:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


def modules(root: pathlib.Path) -> set:
    found = {()}
    for file in root.rglob("*.rs"):
        found.add(module_of(root, file))
    return found


def resolve(here: tuple, path: str, known: set):
    """The longest known module that `path`, written in module `here`, names."""
    segs = path.split("::")
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    else:
        base = here
        while segs and segs[0] in ("super", "self"):
            if segs.pop(0) == "super":
                base = base[:-1]
        rest = segs
    target = base
    for seg in rest:
        if base + (seg,) in known or target + (seg,) in known:
            target = target + (seg,)
        else:
            break
    return target


def sibling_edge(a: tuple, b: tuple):
    """The pair of sibling modules under the deepest common parent of a and b, if any."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if i == len(a) or i == len(b):
        return None  # one contains the other: parent and child
    return a[: i + 1], b[: i + 1]


def cycles(edges: dict) -> list:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    repo = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
    failed = False
    for crate, src in CRATES.items():
        root = repo / src
        known = modules(root)
        edges: dict = {}
        for file in root.rglob("*.rs"):
            here = module_of(root, file)
            for line in file.read_text().splitlines():
                if line.lstrip().startswith("//"):
                    continue
                for path in paths(line):
                    pair = sibling_edge(here, resolve(here, path, known))
                    if pair:
                        edges.setdefault(pair[0], set()).add(pair[1])
        found = cycles(edges)
        for comp in found:
            print("import cycle: " + ", ".join(crate + "::" + "::".join(m) for m in comp))
        count = sum(len(v) for v in edges.values())
        print(f"{crate}: {len(known)} modules, {count} sibling imports, {len(found)} cycles")
        failed = failed or bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
