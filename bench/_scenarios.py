"""The measurements: throughput, slow worker, respawn, rolling restart."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from typing import Any

from bench import _loadgen, _proc, _workers, _wrk
from bench._servers import Ctx, Spec
from bench.servers._hello import RESPONSE

FLUSH_WAIT = 0.05  # the workers copy their counts every 10 ms


def start(spec: Spec, ctx: Ctx, workers: int, extra_env: dict[str, str] | None = None
          ) -> _proc.Server:
    port = _proc.free_port()
    srv = _proc.Server(spec.name, spec.argv(ctx, port, workers),
                       spec.environ(workers, extra_env), port)
    srv.start()
    try:
        srv.wait_ready(workers, spec.counted)
    except BaseException:
        srv.stop()
        srv.cleanup()
        raise
    return srv


def _stop(srv: _proc.Server) -> None:
    srv.stop()
    srv.cleanup()


def _per_conn_us(d: _proc.Cpu, conns: int) -> dict[str, float | int | None]:
    tick_us = 1e6 / _proc.CLK_TCK
    if conns <= 0:
        return {}
    return {
        "user_us": d.utime * tick_us / conns,
        "sys_us": d.stime * tick_us / conns,
        "stat_us": (d.utime + d.stime) * tick_us / conns,
        "sched_us": d.run_ns / 1000 / conns,
        "user_ticks": d.utime,
        "sys_ticks": d.stime,
        "tick_us_per_conn": tick_us / conns,  # the resolution of user_us / sys_us
    }


def measure(srv: _proc.Server, spec: Spec, ctx: Ctx, close: bool, connections: int | None = None,
            duration: float | None = None) -> dict[str, Any]:
    """One wrk run against a started server: throughput, latency, primary CPU, shares."""
    before = _workers.Snapshot(srv, spec.counted)
    p0 = _proc.cpu(srv.pid) if spec.primary != "none" else None
    res = _wrk.run(ctx.wrk, srv.port, connections or ctx.connections,
                   duration or ctx.duration, close)
    time.sleep(FLUSH_WAIT)
    p1 = _proc.cpu(srv.pid) if spec.primary != "none" else None
    after = _workers.Snapshot(srv, spec.counted)
    # With Connection: close, wrk reuses a connection whose response had no
    # "Connection: close" header (the raw responder's) once, and counts a read
    # error per request: read errors are not failures in close mode.
    failed = sum(v for k, v in res.errors.items() if not (close and k == "read"))
    out: dict[str, Any] = {"rps": res.rps, "requests": res.requests, "failed": failed,
                           "errors": res.errors}
    for k in ("50", "90", "99"):
        out[f"p{k}"] = res.latency_ms.get(k)
    sh = _workers.shares(before, after, spec.counted)
    out["shares"] = sh
    if spec.counted and "connections" in sh:
        out["conns"] = int(sum(sh["connections"].get("values", [])))
        out["conns_source"] = "counted by the workers"
    else:
        out["conns"] = res.requests if close else connections or ctx.connections
        out["conns_source"] = "wrk requests" if close else "wrk connections"
    ws = [after.cpu[p] - before.cpu[p] for p in before.cpu if p in after.cpu]
    if ws and out["conns"] > 0:
        out["workers_cpu"] = {
            "sched_us_per_conn": sum(w.run_ns for w in ws) / 1000 / out["conns"],
            "slices_per_conn": sum(w.slices for w in ws) / out["conns"],
        }
    if p0 is not None and p1 is not None:
        d = p1 - p0
        out["primary"] = {"utime_ticks": d.utime, "stime_ticks": d.stime, "run_ns": d.run_ns,
                          "slices": d.slices, **_per_conn_us(d, out["conns"])}
        if out["conns"] > 0:
            out["primary"]["slices_per_conn"] = d.slices / out["conns"]
        if res.requests:
            out["primary"]["sched_us_per_request"] = d.run_ns / 1000 / res.requests
    if "wrk_failed" in res.errors:
        out["wrk_output"] = res.raw[-1500:]
    return out


def throughput(spec: Spec, ctx: Ctx) -> dict[str, Any]:
    """Start, warm up, keep-alive run, close run, stop."""
    srv = start(spec, ctx, ctx.workers)
    try:
        out: dict[str, Any] = {"pid": srv.pid, "workers": ctx.workers}
        if spec.counted:
            body = srv.first_response
            out["response_identical_to_anchor"] = body == RESPONSE
            uv = {c.uvloop for c in _workers.read_counts(srv.count_dir).values()}
            out["worker_loop"] = "uvloop" if uv == {True} else ("asyncio" if uv == {False}
                                                               else "mixed")
        if ctx.warmup > 0:
            _wrk.run(ctx.wrk, srv.port, ctx.connections, ctx.warmup, False)
        out["keepalive"] = measure(srv, spec, ctx, close=False)
        out["close"] = measure(srv, spec, ctx, close=True)
        out["alive_after"] = srv.running()
        return out
    finally:
        _stop(srv)


def slow_worker(spec: Spec, ctx: Ctx, workers: int = 4) -> dict[str, Any]:
    """Worker index 0 of `workers` blocks 50 ms on 5% of its requests;
    Connection: close, so every request is a fresh balancing decision."""
    srv = start(spec, ctx, workers, {"BENCH_SLOW_INDEX": "0"})
    try:
        if ctx.warmup > 0:
            _wrk.run(ctx.wrk, srv.port, ctx.connections, ctx.warmup, True)
        out = measure(srv, spec, ctx, close=True)
        counts = _workers.read_counts(srv.count_dir)
        slow_pids = [c.pid for c in counts.values() if c.index == 0]
        vals = out["shares"].get("connections", {}).get("values", [])
        pids = out["shares"].get("pids", [])
        total = sum(vals)
        if slow_pids and total and slow_pids[0] in pids and len(vals) == len(pids):
            out["slow_worker_share"] = vals[pids.index(slow_pids[0])] / total
        return out
    finally:
        _stop(srv)


def _live_workers(srv: _proc.Server, spec: Spec) -> dict[int, float]:
    """pid -> first-connection time (0.0: none yet; uncounted servers: 0.0)."""
    if spec.counted:
        return {p: c.first for p, c in _workers.read_counts(srv.count_dir).items()
                if _proc.alive(p)}
    return {p: 0.0 for p in _proc.workers_of(srv.pid) if _proc.alive(p)}


def respawn(spec: Spec, ctx: Ctx, kills: int, min_age: float = 1.0, gap: float = 0.3,
            workers: int = 4) -> dict[str, Any]:
    """SIGKILL a worker `kills` times under load, `gap` s after the previous
    replacement accepted; time until a new worker has accepted a connection,
    and failed requests. Only workers older than `min_age` are killed: a
    worker that dies before it is ready (listening) is taken for a crash loop
    and its replacement delayed on purpose (fastcluster/primary/respawn.py),
    which is not what this measures."""
    srv = start(spec, ctx, workers)
    limit = kills * 12 + min_age + 20
    load = _loadgen.Load(srv.port, limit, procs=1, threads=4)  # moderate load
    times_ms: list[float] = []
    started_ms: list[float] = []
    note = None
    deadline_all = time.monotonic() + limit - 5
    try:
        for _ in range(kills):
            victim = None
            while time.monotonic() < deadline_all and srv.running():
                live = _live_workers(srv, spec)
                ages = {p: _proc.age(p) for p in live}
                old = [p for p, a in ages.items() if a >= min_age]
                if old:
                    victim = max(old, key=lambda p: ages[p])
                    break
                time.sleep(0.1)
            if victim is None:
                note = "no worker lived long enough to be killed within the time bound"
                break
            known = set(_workers.read_counts(srv.count_dir))
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            seen_at = None
            deadline = t0 + 5.0
            got = None
            while time.monotonic() < deadline:
                new = {p: c for p, c in _workers.read_counts(srv.count_dir).items()
                       if p not in known}
                if new and seen_at is None:
                    seen_at = time.monotonic()
                firsts = [c.first for c in new.values() if c.first > 0]
                if firsts:
                    got = min(firsts)
                    break
                if not srv.running():
                    break
                time.sleep(0.0005)
            if not srv.running():
                note = "the primary exited after a worker was SIGKILLed"
                break
            if got is None:
                note = ("no replacement worker accepted within 5 s of a SIGKILL "
                        "(no respawn in this build?)")
                break
            times_ms.append((got - t0) * 1000)
            if seen_at is not None:
                started_ms.append((seen_at - t0) * 1000)
            time.sleep(gap)
        res = load.stop()
    finally:
        with contextlib.suppress(Exception):
            load.stop()
        _stop(srv)
    out: dict[str, Any] = {"kills": len(times_ms), "asked": kills, "workers": workers,
                           "min_age_s": min_age, "accepting_ms": times_ms,
                           "started_ms": started_ms, **res}
    if times_ms:
        out["median_ms"] = statistics.median(times_ms)
        out["max_ms"] = max(times_ms)
    if note:
        out["note"] = note
    out["available"] = bool(times_ms) and len(times_ms) == kills
    return out


def rolling(spec: Spec, ctx: Ctx, hups: int, per_hup: float = 15.0) -> dict[str, Any]:
    """SIGHUP the primary `hups` times under Connection: close load; each time
    wait until every old worker is gone and `workers` new ones serve."""
    srv = start(spec, ctx, ctx.workers)
    limit = hups * (per_hup + 2) + 10
    load = _loadgen.Load(srv.port, limit)
    took: list[float] = []
    note = None
    try:
        time.sleep(1.0)
        for _ in range(hups):
            old = set(_live_workers(srv, spec))
            t0 = time.monotonic()
            os.kill(srv.pid, signal.SIGHUP)
            done = False
            while time.monotonic() < t0 + per_hup:
                if not srv.running():
                    break
                live = _live_workers(srv, spec)
                fresh = [p for p, first in live.items() if p not in old
                         and (first > 0 or not spec.counted)]
                if not (old & set(live)) and len(fresh) >= ctx.workers:
                    done = True
                    break
                time.sleep(0.005)
            if not srv.running():
                note = "the primary exited on SIGHUP (no rolling restart in this build)"
                break
            if not done:
                live = _live_workers(srv, spec)
                note = (f"SIGHUP did not replace every worker within {per_hup:.0f} s "
                        f"({len(old & set(live))} of {len(old)} old workers still alive)")
                said = [ln.strip() for ln in srv.log_tail(20000).splitlines() if "HUP" in ln]
                if said:
                    note += f"; the server logged: {said[-1][:200]}"
                break
            took.append((time.monotonic() - t0) * 1000)
            time.sleep(1.0)
        res = load.stop()
    finally:
        with contextlib.suppress(Exception):
            load.stop()
        _stop(srv)
    out: dict[str, Any] = {"hups": len(took), "asked": hups, "restart_ms": took, **res}
    if note:
        out["note"] = note
    out["available"] = len(took) == hups
    return out
