"""Per-worker share: counted by the workers themselves, or CPU as a proxy."""

from __future__ import annotations

import contextlib
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _proc

RECORD = struct.Struct("<QQdqqq")  # as bench/servers/_hello.py writes it


@dataclass
class Count:
    pid: int
    index: int
    connections: int
    requests: int
    first: float  # CLOCK_MONOTONIC of the first connection, 0.0 if none
    uvloop: bool


def read_counts(count_dir: Path | None) -> dict[int, Count]:
    """Every worker's record under count_dir, by pid (dead workers included)."""
    out: dict[int, Count] = {}
    if count_dir is None:
        return out
    for p in count_dir.iterdir():
        if not p.name.startswith("w-") or p.name.endswith(".tmp"):
            continue
        with contextlib.suppress(OSError, struct.error):
            c, r, first, pid, index, uv = RECORD.unpack(p.read_bytes()[: RECORD.size])
            out[pid] = Count(pid, index, c, r, first, bool(uv))
    return out


def share_stats(values: list[float]) -> dict[str, Any]:
    """max/min and coefficient of variation (population stdev / mean)."""
    if not values:
        return {"n": 0}
    mean = statistics.fmean(values)
    lo, hi = min(values), max(values)
    return {
        "n": len(values),
        "values": values,
        "max_min": (hi / lo) if lo > 0 else float("inf"),
        "cv": (statistics.pstdev(values) / mean) if mean > 0 else None,
    }


class Snapshot:
    """What the workers had done at one moment: counts (if they count) and CPU."""

    def __init__(self, server: _proc.Server, counted: bool) -> None:
        self.counts = read_counts(server.count_dir) if counted else {}
        self.worker_pids = (sorted(self.counts) if counted
                            else _proc.workers_of(server.pid))
        self.cpu: dict[int, _proc.Cpu] = {}
        for pid in self.worker_pids:
            c = _proc.cpu(pid)
            if c is not None:
                self.cpu[pid] = c


def shares(before: Snapshot, after: Snapshot, counted: bool) -> dict[str, Any]:
    """Shares over the workers alive at `before` (and still there at `after`)."""
    pids = [p for p in before.worker_pids if p in after.cpu or p in after.counts]
    out: dict[str, Any] = {"workers": len(pids), "pids": pids}
    if counted:
        pids = [p for p in pids if p in after.counts and p in before.counts]
        out["pids"] = pids
        conns = [float(after.counts[p].connections - before.counts[p].connections)
                 for p in pids]
        reqs = [float(after.counts[p].requests - before.counts[p].requests) for p in pids]
        out["connections"] = share_stats(conns)
        out["requests"] = share_stats(reqs)
        out["source"] = "counted"
    cpu = [float((after.cpu[p] - before.cpu[p]).run_ns) for p in pids
           if p in after.cpu and p in before.cpu]
    out["cpu"] = share_stats(cpu)
    if not counted:
        out["source"] = "cpu"
    return out
