"""The habits CI holds us to: ruff and mypy --strict are clean on fastcluster/."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff_clean() -> None:
    proc = run_tool("ruff", "check", "fastcluster")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_clean() -> None:
    proc = run_tool("mypy", "--strict", "fastcluster")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the layout (issue 13) -------------------------------------------------------
#
# fastcluster/ is layered; an import goes down or sideways within a layer, never up:
#
#   wire/            shared by both sides: imports only wire/ (and the C core, _core)
#   primary/         runs only in the primary: wire/, primary/, _core
#   worker_side/     runs only in a worker: wire/, worker_side/, _core
#                    (not `worker/`: fastcluster.worker is the public cluster.worker)
#   the top level    __init__ (the public API), _role (the role state and the fork
#                    seam, the one module that joins primary/ and worker_side/), aio,
#                    asgi, wsgi, pytest_plugin: anything but cli/
#   cli/             the command: anything (only __main__ imports it)
#
# Every import counts: function-level ones and those under TYPE_CHECKING too.

PKG = ROOT / "fastcluster"
MAX_LINES = 400  # no exclusions: every .py module of fastcluster/ is held to it


def _modules(pkg: Path) -> dict[str, Path]:
    mods = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports (relative ones resolved;
    `from P import m` is an import of P.m when that is a module, else of P)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m == "fastcluster" or m.startswith("fastcluster.")}


def _graph(pkg: Path) -> dict[str, set[str]]:
    mods = _modules(pkg)
    known = set(mods) | {"fastcluster._core"}
    return {name: _imports(name, path, known) - {name} for name, path in mods.items()}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) > 1 and parts[1] in ("wire", "primary", "worker_side", "cli"):
        return parts[1]
    return "core" if mod == "fastcluster._core" else "top"


ALLOWED = {  # layer -> the layers it may import
    "wire": {"wire", "core"},
    "primary": {"primary", "wire", "core"},
    "worker_side": {"worker_side", "wire", "core"},
    "top": {"top", "primary", "worker_side", "wire", "core"},
    "cli": {"cli", "top", "primary", "worker_side", "wire", "core"},
}


def _layout_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if _layer(dep) not in ALLOWED[_layer(mod)] and not (
                    mod == "fastcluster.__main__" and dep == "fastcluster.cli.main"):
                bad.append(f"{mod} ({_layer(mod)}/) imports {dep} ({_layer(dep)}/)")
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layout_import_direction() -> None:
    assert _layout_violations(_graph(PKG)) == []


def test_no_import_cycle() -> None:
    assert _cycles(_graph(PKG)) == []


def test_no_module_above_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules(PKG).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_layout_checks_catch_a_planted_violation(tmp_path: Path) -> None:
    """The checks above would see a breach: a copy of the package with a worker
    module importing primary/ (under TYPE_CHECKING, relatively), and the primary
    importing it back, fails both."""
    copy = tmp_path / "fastcluster"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    heart = copy / "worker_side" / "heart.py"
    heart.write_text(heart.read_text() + "\nif TYPE_CHECKING:\n    from ..primary import loop\n")
    loop = copy / "primary" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _f() -> None:\n    from ..worker_side import heart\n")
    graph = _graph(copy)
    assert "fastcluster.worker_side.heart (worker_side/) imports fastcluster.primary.loop (primary/)" \
        in _layout_violations(graph)
    assert any("fastcluster.worker_side.heart" in c and "fastcluster.primary.loop" in c
               for c in _cycles(graph))


def test_no_subpackage_shadows_a_public_name() -> None:
    """A subpackage named like a public attribute (cluster.worker, cluster.workers)
    would be replaced by it, and `import fastcluster.<name>.x as m` would fail."""
    import fastcluster

    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert subpackages == {"primary", "worker_side", "wire", "cli"}
    assert not subpackages & set(fastcluster.__all__)
