"""The C dispatcher with real worker processes and loopback clients.

Each scenario runs tests/dispatch_harness.py in its own process (its own fd
table and limits) and checks the JSON it prints: the client's tallies of
which worker answered, and the dispatcher's counters.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HARNESS = Path(__file__).with_name("dispatch_harness.py")


def scenario(python_env: dict[str, str], *args: str, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(HARNESS), *args], env=python_env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["copies", "peer"])
def test_rr_spreads_10000_connections_exactly(python_env: dict[str, str], mode: str) -> None:
    out = scenario(python_env, "spread", "--workers", "4", "--connections", "10000",
                   "--concurrency", "8", *(["--peer"] if mode == "peer" else []))
    replies = out["client"]["replies"]
    assert out["client"]["failures"] == {}
    assert sorted(replies) == ["0", "1", "2", "3"]
    assert all(2499 <= n <= 2501 for n in replies.values()), replies
    assert out["stats"]["accepted"] == 10000


def test_one_loop_serves_ipv4_ipv6_and_unix_listeners(python_env: dict[str, str]) -> None:
    out = scenario(python_env, "spread", "--workers", "2", "--listeners", "v6,unix",
                   "--connections", "600", "--concurrency", "8")
    assert out["client"]["failures"] == {}
    assert out["client"]["replies"] == {"0": 300, "1": 300}
    assert out["stats"]["accepted"] == 600


def test_least_avoids_a_worker_holding_connections(python_env: dict[str, str]) -> None:
    # worker 0 keeps every connection it gets open; worker 1 closes at once
    least = scenario(python_env, "spread", "--workers", "2", "--policy", "least", "--hold", "0",
                     "--connections", "200", "--concurrency", "1")
    rr = scenario(python_env, "spread", "--workers", "2", "--policy", "rr", "--hold", "0",
                  "--connections", "200", "--concurrency", "1")
    assert least["client"]["failures"] == {} and rr["client"]["failures"] == {}
    assert least["client"]["replies"].get("0", 0) <= 3
    assert rr["client"]["replies"]["0"] == 100


def test_stopped_worker_fills_its_window_others_take_the_rest(python_env: dict[str, str]) -> None:
    out = scenario(python_env, "stop_one", "--workers", "2", "--window", "16",
                   "--connections", "300", "--concurrency", "64")
    assert out["client"]["failures"] == {}
    # only its window went to the stopped worker; it served those on resuming
    assert out["held_by_stopped"] == 16
    assert out["others_before_resume"] == 300 - 16
    assert out["client"]["replies"] == {"0": 16, "1": 284}


@pytest.mark.parametrize("mode", ["copies", "peer"])
def test_a_workers_own_window_bounds_what_it_holds(python_env: dict[str, str],
                                                    mode: str) -> None:
    # set_window(slot, 3): a worker that declared it starts 3 at once is
    # never given more than 3 it has not taken, whatever the dispatcher's window
    out = scenario(python_env, "stop_one", "--workers", "2", "--window", "16",
                   "--slot-window", "3", "--connections", "300", "--concurrency", "64",
                   *(["--peer"] if mode == "peer" else []))
    assert out["client"]["failures"] == {}
    assert out["held_by_stopped"] == 3
    assert out["client"]["replies"] == {"0": 3, "1": 297}


def test_set_window_checks_its_arguments() -> None:
    from fastcluster import _core
    table = _core.CounterTable(4)
    d = _core.Dispatcher(table, window=16)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with pytest.raises(OSError) as e:
            d.set_window(1, 4)  # no worker in slot 1
        assert e.value.errno == errno.ESRCH
        d.add_worker(1, mine.detach())
        with pytest.raises(OSError) as e:
            d.set_window(1, 0)
        assert e.value.errno == errno.EINVAL
        d.set_window(1, 1 << 20)  # above the dispatcher's window: capped, not refused
        d.set_window(1, 1)
    finally:
        d.close()
        theirs.close()
        table.close()


def test_all_stopped_connections_wait_in_backlog_without_spinning(python_env: dict[str, str]) -> None:
    out = scenario(python_env, "stop_all", "--workers", "2", "--window", "8",
                   "--connections", "60", "--concurrency", "60")
    assert out["held_full"] == [8, 8]
    assert out["stats_full"]["accepted"] == 16  # the rest stayed in the kernel's backlog
    assert out["cpu_while_full"] < 0.05  # the loop sleeps while every window is full
    assert out["client"]["failures"] == {}
    assert sum(out["client"]["replies"].values()) == 60


@pytest.mark.parametrize("mode", ["copies", "peer"])
def test_killed_worker_in_flight_fds_are_served_elsewhere(python_env: dict[str, str],
                                                          mode: str) -> None:
    """copies: the primary kept its copy of each fd; peer: it kept none and
    reads the dead worker's queue back from its hold on the worker's end."""
    out = scenario(python_env, "kill_inflight", "--workers", "2", "--window", "16",
                   "--connections", "100", "--concurrency", "32",
                   *(["--peer"] if mode == "peer" else []))
    assert out["held_at_kill"] == 16
    assert out["client"]["failures"] == {}  # no client saw a reset
    assert out["client"]["replies"] == {"1": 100}
    assert out["stats"]["redispatched"] == 16


def test_emfile_sheds_backs_off_and_recovers(python_env: dict[str, str]) -> None:
    out = scenario(python_env, "emfile", "--workers", "2", "--window", "64",
                   "--connections", "100", "--concurrency", "100")
    exhausted = out["stats_exhausted"]
    assert exhausted["emfile"] >= 1 and exhausted["shed"] >= 1
    assert out["cpu_while_exhausted"] < 0.05  # backs off, never spins
    client = out["client"]
    served = sum(client["replies"].values())
    # every connection was either served or shed (closed at once, no hang)
    assert served + client["failures"].get("empty", 0) == 100
    assert set(client["failures"]) <= {"empty"}
    assert served >= 50
    assert out["after"]["failures"] == {}
    assert sum(out["after"]["replies"].values()) == 50


def test_worker_flooding_its_data_channel_does_not_hurt_the_primary(
        python_env: dict[str, str]) -> None:
    out = scenario(python_env, "spread", "--workers", "2", "--bad", "garbage",
                   "--connections", "2000", "--concurrency", "16")
    assert out["client"]["failures"] == {}
    assert sum(out["client"]["replies"].values()) == 2000
    # the good worker kept about its half (rr skips a worker whose window is
    # full, so on a busy machine a few dozen may land either way)
    assert out["client"]["replies"].get("1", 0) >= 900


def test_worker_hanging_up_its_channel_hands_its_fds_on(python_env: dict[str, str]) -> None:
    out = scenario(python_env, "spread", "--workers", "2", "--bad", "hangup", "--window", "16",
                   "--connections", "100", "--concurrency", "32")
    assert out["client"]["failures"] == {}
    assert out["client"]["replies"] == {"1": 100}
    assert out["stats"]["redispatched"] == 16


def test_soak_200k_connections_leave_no_fd_memory_or_close_wait(python_env: dict[str, str]) -> None:
    out = scenario(python_env, "soak", "--workers", "4", "--connections", "200000",
                   "--concurrency", "32", timeout=400)
    assert out["client"]["failures"] == {}
    assert sum(out["client"]["replies"].values()) == 200000
    assert out["after"]["fds"] == out["before"]["fds"]
    assert out["after"]["rss_kib"] - out["before"]["rss_kib"] < 1024  # within 1 MiB
    assert out["after"]["close_wait"] == 0
