"""The floors of llmos, read from the source: who may import whom, and no import cycle anywhere.

    5  userland                       llmos, llmsh, the programs
    4  kernel                         the kernel process
    3  services | drivers             service processes; they meet only through messages
    2  syscalls.runtime | drivers.model   what every process runs on; the model library
    1  syscalls                       the ABI and the client library

Every module belongs to the unit whose name is the longest prefix of its own. A unit imports only
the units UNITS lets it, and each of those is on a lower floor (or is the unit itself). Every
import statement counts, a function's and one under ``if TYPE_CHECKING:`` too: a cycle of type
hints is still two modules that cannot be read apart. docs/architecture.md draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("syscalls", "kernel", "services", "drivers", "userland")

# unit: (its floor, the module prefixes it is, the units it may import besides itself)
UNITS = {
    "abi": (1, ("syscalls",), ()),
    "runtime": (2, ("syscalls.runtime",), ("abi",)),
    "model library": (2, ("drivers.model",), ()),
    "services": (3, ("services",), ("abi", "runtime", "model library")),
    "drivers": (3, ("drivers",), ("abi", "runtime", "model library")),
    "kernel": (4, ("kernel",), ("abi", "runtime")),
    "userland": (5, ("userland",), ("abi", "runtime")),
}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def unit_of(module: str) -> str:
    best = max(((unit, prefix) for unit, (_, prefixes, _) in UNITS.items() for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=lambda u: len(u[1]))
    return best[0]


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The llmos modules (or packages) that module's import statements name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:        # "from pkg import mod" imports the module pkg.mod
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {name for name in out if name.split(".")[0] in PACKAGES} - {module}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
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

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_table_only_goes_down():
    for unit, (floor, _, allowed) in UNITS.items():
        for other in allowed:
            assert UNITS[other][0] < floor, f"{unit} (floor {floor}) may not import {other}"


def test_imports_only_go_down():
    wrong = []
    for module, targets in graph().items():
        unit = unit_of(module)
        for target in sorted(targets):
            other = unit_of(target)
            if other != unit and other not in UNITS[unit][2]:
                wrong.append(f"{module} ({unit}) imports {target} ({other})")
    assert not wrong, "imports that do not go down a floor:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_no_import_cycle_between_top_level_packages():
    tops: dict[str, set[str]] = {}
    for module, targets in graph().items():
        tops.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    assert cycles({top: others - {top} for top, others in tops.items()}) == []
