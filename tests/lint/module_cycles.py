#!/usr/bin/env python3
"""Fails when the gateway crate's top-level modules import each other in a cycle.

Each file's `crate::MODULE` references (imports and paths, not comments) count as an arrow from the
top-level module the file belongs to; test code (`#[cfg(test)]` modules and their
files) is left out, since tests may reach anywhere. Prints the graph's arrows and every
cycle found (exit 1), or the order the modules can be read in (exit 0).

    python3 tests/lint/module_cycles.py [gateway/src]
"""
import pathlib
import re
import sys

CRATE_REF = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def module_of(src: pathlib.Path, path: pathlib.Path) -> str | None:
    rel = path.relative_to(src)
    if rel.parts[0] in ("lib.rs", "main.rs"):
        return None  # the root only declares and re-exports
    return rel.parts[0].removesuffix(".rs")


def non_test_code(text: str) -> str:
    """The file up to its first `#[cfg(test)]` (test modules sit at the end), without
    comments (a doc link is not an import)."""
    code = text.split("#[cfg(test)]", 1)[0]
    return "\n".join(line.split("//", 1)[0] for line in code.splitlines())


def graph(src: pathlib.Path) -> dict[str, set[str]]:
    arrows: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.rs")):
        if path.name == "tests.rs":
            continue
        module = module_of(src, path)
        if module is None:
            continue
        targets = arrows.setdefault(module, set())
        for target in CRATE_REF.findall(non_test_code(path.read_text())):
            if target != module:
                targets.add(target)
    return arrows


def cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(arrows.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(arrows):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "gateway/src")
    arrows = graph(src)
    if not arrows:
        print(f"no modules found under {src}", file=sys.stderr)
        return 2
    found = cycles(arrows)
    for c in found:
        members = set(c)
        inner = [f"{a} -> {b}" for a in c for b in sorted(arrows[a] & members)]
        print(f"cycle between {', '.join(c)}: {'; '.join(inner)}")
    if found:
        return 1
    # Leaves first: an order in which every module's imports come before it.
    order, done = [], set()

    def place(v: str) -> None:
        if v in done:
            return
        done.add(v)
        for w in sorted(arrows.get(v, ())):
            place(w)
        order.append(v)

    for v in sorted(arrows):
        place(v)
    print(f"{len(arrows)} modules, no import cycle; leaves first: {' '.join(order)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
