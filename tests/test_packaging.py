"""The source distribution builds on its own: what PyPI users would install
from when no wheel fits their platform."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import ROOT


def _tracked(root: Path) -> list[str]:
    proc = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return proc.stdout.split()


def test_sdist_carries_the_c_core_and_its_headers(tmp_path: Path) -> None:
    pytest.importorskip("Cython", reason="setup.py cythonizes _core.pyx")
    tracked = _tracked(ROOT)
    src = tmp_path / "src"
    for name in tracked:  # a clean copy: no build products, no venv
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "out", filter="data")
    needed = {n for n in tracked if n.startswith("csrc/")
              or n.startswith("fastcluster/") and n.endswith((".py", ".pyx", ".pxi", ".pxd", ".pyi",
                                                               "py.typed"))}
    assert needed - names == set(), f"missing from the sdist: {sorted(needed - names)}"
    (top,) = (tmp_path / "out").iterdir()
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to check the unpacked C core")
    sources = sorted(str(p) for p in (top / "csrc").glob("*.c"))
    compiled = subprocess.run([cc, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *sources],
                              cwd=top, capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr
