"""Shared fixtures: every test fails if it leaks a file descriptor."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Fails the test if it leaves more fds open in this process than it found."""
    before = open_fds()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        gc.collect()
        leaked = open_fds() - before
        # the listing itself opens one fd, gone by now; anything else is ours
        leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if leaked:
        targets = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked
                   if os.path.exists(f"/proc/self/fd/{fd}")}
        pytest.fail(f"test leaked fds: {targets}")


@pytest.fixture
def python_env() -> dict[str, str]:
    """Environment for subprocesses that import fastcluster from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["FASTCLUSTER_TEST_PYTHON"] = sys.executable
    return env
