"""The goals the issues set, each with the figure this run reached: issue D
(the dispatcher), I (steer), J (the CLI, ASGI and WSGI) and K (respawn)."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench._report import Results


class Goals:
    """Rows of (goal, measured, met/missed, note)."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def row(self, goal: str, value: float | None, target: float, fmt: str, le: bool,
            note: str = "") -> None:
        if value is None or math.isnan(value):
            self.rows.append([goal, "not measured", "-", note])
            return
        ok = value <= target if le else value >= target
        self.rows.append([goal, fmt.format(value), "met" if ok else "missed", note])

    def info(self, goal: str, value: str, note: str = "") -> None:
        self.rows.append([goal, value, "-", note])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goals(res: Results) -> list[str]:
    from bench import _report as r
    from bench import _servers

    node, rp = r.baseline(res, _servers.NODE_RR), r.baseline(res, _servers.REUSEPORT)
    rr = r.fc_rr(res)
    g = Goals()
    w = res["settings"]["workers"]

    def rps(name: str | None, mode: str) -> float | None:
        return r.med(res, name, mode, "rps") if name else None

    if rr:
        lbl = r.label(res, rr)
        g.row(f"close, {w} workers: {lbl} ÷ Node SCHED_RR >= 1.8 (D)",
              ratio(rps(rr, "close"), rps(node, "close")), 1.8, "{:.2f}x", False)
        g.row(f"close: {lbl} ÷ SO_REUSEPORT >= 1.0 (D)",
              ratio(rps(rr, "close"), rps(rp, "close")), 1.0, "{:.2f}x", False)
        sc = r.med(res, rr, "close", "primary", "sched_us")
        g.info(f"{lbl} dispatcher capacity (1 / primary on-CPU per connection)",
               f"{1e6 / sc:,.0f} connections/s per core" if sc else "not measured",
               "what decides how many workers one primary can feed")
        g.row(f"keep-alive: {lbl} ÷ SO_REUSEPORT >= 0.98 (D)",
              ratio(rps(rr, "keepalive"), rps(rp, "keepalive")), 0.98, "{:.2f}x", False)
        g.row(f"{lbl} primary user CPU per connection <= 0.5 µs (D)",
              r.med(res, rr, "close", "primary", "user_us"), 0.5, "{:.2f} µs", True,
              f"± {r.f_num(r.med(res, rr, 'close', 'primary', 'tick_us_per_conn'), 2)} µs "
              "(1 tick)")
        g.row(f"{lbl} primary user+system per connection ÷ Node RR's <= 0.4 (D)",
              ratio(r.med(res, rr, "close", "primary", "stat_us"),
                    r.med(res, node, "close", "primary", "stat_us") if node else None),
              0.4, "{:.2f}x", True)
        g.row(f"{lbl} per-worker share max/min <= 1.05 (close, counted) (D)",
              r.med(res, rr, "close", "shares", "connections", "max_min"), 1.05, "{:.3f}", True)

    ok = r.measured(res)
    for st, prog, cpu_max in (("fc-steer", "eBPF", 0.2), ("fc-steer-cbpf", "cBPF", 2.0)):
        if st not in ok:
            continue
        lbl = r.label(res, st)
        for mode in ("close", "keepalive"):
            g.row(f"{mode}: {lbl} ÷ SO_REUSEPORT >= 0.98 (I)",
                  ratio(rps(st, mode), rps(rp, mode)), 0.98, "{:.2f}x", False)
        # the primary does not accept under steer: its CPU over the run, per connection
        g.row(f"{lbl} primary CPU (user+system, on-CPU) per connection <= {cpu_max:g} µs "
              f"({prog}) (I)", r.med(res, st, "close", "primary", "sched_us"), cpu_max,
              "{:.3f} µs", True)
    slow = res.get("slow") or {}
    sr = next((n for n in ("fc-reuseport", "reuseport") if r.dig(slow, n, "p99")), None)
    p99_ref = r.dig(slow, sr, "p99") if sr else None
    for sl, target, tag in (("fc-least", 0.5, "D"), ("fc-steer", 0.35, "I"),
                            ("fc-steer-cbpf", 0.5, "I")):
        if r.dig(slow, sl, "p99"):
            g.row(f"slow worker p99: {r.label(res, sl)} ÷ "
                  f"{r.label(res, sr) if sr else 'reuseport'} <= {target:g} ({tag})",
                  ratio(r.dig(slow, sl, "p99"), p99_ref), target, "{:.2f}x", True,
                  f"{r.f_num(r.dig(slow, sl, 'p99'), 1)} ms vs {r.f_num(p99_ref, 1)} ms")
    for st in ("fc-steer", "fc-rr"):
        rs = (res.get("respawn") or {}).get(st) or {}
        if rs.get("available"):
            g.row(f"{r.label(res, st)} respawn under load: SIGKILL -> replacement accepting, "
                  "median < 15 ms (K)", statistics.median(rs["accepting_ms"]), 15.0,
                  "{:.1f} ms", True, f"{rs['kills']} kills, {rs['failed']} of "
                  f"{rs['requests']:,} requests failed")
    for st in ("fc-rr", "fc-steer", "fc-cli-steer"):
        ro = (res.get("rolling") or {}).get(st)
        if ro:
            g.row(f"{r.label(res, st)}: failed requests during rolling restarts (SIGHUP) = 0",
                  float(ro["failed"]) if ro.get("available") else None, 0.0, "{:.0f}", True)

    uv = "uvicorn" if "uvicorn" in ok else None
    for cli in ("fc-cli-steer", "fc-cli-rr"):
        if cli in ok:
            for mode in ("keepalive", "close"):
                g.row(f"{mode}: {r.label(res, cli)} ÷ uvicorn --workers {w} >= 1.0 (I, J)",
                      ratio(rps(cli, mode), rps(uv, mode)), 1.0, "{:.2f}x", False)
    gt = "gunicorn-gthread" if "gunicorn-gthread" in ok else None
    if "fc-cli-wsgi" in ok:
        for mode in ("keepalive", "close"):
            g.row(f"{mode}: {r.label(res, 'fc-cli-wsgi')} ÷ gunicorn gthread >= 1.0 (J)",
                  ratio(rps("fc-cli-wsgi", mode), rps(gt, mode)), 1.0, "{:.2f}x", False)
    out = ["## Goals (issues D, I, J, K), ratios from this run", ""]
    out += r.table(["goal", "measured", "", "note"], g.rows)
    return [*out, ""]
