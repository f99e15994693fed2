"""The habits CI holds us to: ruff and mypy --strict are clean on fastcluster/."""

from __future__ import annotations

import subprocess
import sys

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
