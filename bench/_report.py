"""The run's results as Markdown tables, a JSON file and a PNG plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import _goals, _servers

Results = dict[str, Any]


def dig(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def med(res: Results, name: str, *path: str) -> float | None:
    """Median over the repeats of one server's figure at `path`."""
    runs = dig(res, "servers", name, "runs") or []
    vals = [v for r in runs if isinstance(v := dig(r, *path), int | float)
            and not isinstance(v, bool) and math.isfinite(v)]
    inf = [v for r in runs if isinstance(v := dig(r, *path), float) and math.isinf(v)]
    if not vals:
        return math.inf if inf else None
    return float(statistics.median(vals + inf))


def spread(res: Results, name: str, *path: str) -> str:
    """min-max over the repeats, in thousands, or '' with one run."""
    runs = dig(res, "servers", name, "runs") or []
    vals = [v for r in runs if isinstance(v := dig(r, *path), int | float)]
    if len(vals) < 2:
        return ""
    return f" ({min(vals) / 1000:.0f}k-{max(vals) / 1000:.0f}k)"


def measured(res: Results) -> list[str]:
    return [n for n, s in res["servers"].items() if s.get("runs")]


def baseline(res: Results, names: Sequence[str]) -> str | None:
    ok = measured(res)
    return next((n for n in names if n in ok), None)


def fc_rr(res: Results) -> str | None:
    """The fastcluster rr server measured: the public API's, else the core's."""
    return baseline(res, ("fc-rr", "core-rr"))


def fc_least(res: Results) -> str | None:
    return baseline(res, ("fc-least", "core-least"))


def f_num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def f_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or math.isinf(a) or math.isinf(b):
        return "-"
    return f"{a / b:.2f}x"


def f_lat(p50: float | None, p99: float | None) -> str:
    def one(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"

    return f"{one(p50)} / {one(p99)}"


def label(res: Results, name: str) -> str:
    return str(res["servers"].get(name, {}).get("label") or _servers.BY_NAME[name].label)


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def primary_accepts(res: Results, name: str) -> bool:
    return _servers.BY_NAME[name].primary == "accepts"


def markdown(res: Results) -> str:
    s = res["settings"]
    m = res["machine"]
    node, rp = baseline(res, _servers.NODE_RR), baseline(res, _servers.REUSEPORT)
    lines = [f"# fastcluster benchmark, {res['date']}", ""]
    lines += ["Produced by `python -m bench` (bench/run.py); " + res["command"], ""]
    lines += table(["machine", ""], [[k, str(v)] for k, v in m.items()])
    lines += ["", f"Settings: {s['workers']} workers, wrk -t1 -c{s['connections']} "
              f"-d{s['duration']:g}s --latency, {s['warmup']:g} s keep-alive warm-up per server "
              f"start, {s['repeat']} repeat(s) (figures are medians over repeats), load on "
              f"127.0.0.1 from the same machine. Started {res['started']}, took "
              f"{res['elapsed_s'] / 60:.1f} min.", ""]
    lines += [f"fastcluster servers measured: {res['fastcluster_mode']}", ""]
    if node or rp:
        lines += [f"Ratios are against **{label(res, node) if node else '-'}** (÷ Node RR) and "
                  f"**{label(res, rp) if rp else '-'}** (÷ SO_REUSEPORT; same worker code as "
                  "fastcluster: the anchor's raw asyncio responder plus per-worker counting).",
                  ""]
    names = measured(res)

    # throughput
    rows = []
    for n in names:
        ka, cl = med(res, n, "keepalive", "rps"), med(res, n, "close", "rps")
        failed = (med(res, n, "keepalive", "failed") or 0) + (med(res, n, "close", "failed") or 0)
        rows.append([
            label(res, n), f_num(ka) + spread(res, n, "keepalive", "rps"),
            f_ratio(ka, med(res, node, "keepalive", "rps") if node else None),
            f_ratio(ka, med(res, rp, "keepalive", "rps") if rp else None),
            f_num(cl) + spread(res, n, "close", "rps"),
            f_ratio(cl, med(res, node, "close", "rps") if node else None),
            f_ratio(cl, med(res, rp, "close", "rps") if rp else None),
            f_lat(med(res, n, "keepalive", "p50"), med(res, n, "keepalive", "p99")),
            f_lat(med(res, n, "close", "p50"), med(res, n, "close", "p99")),
            f_num(failed),
        ])
    lines += ["## Requests per second and latency", ""]
    lines += table(["server", "keep-alive req/s", "÷ Node RR", "÷ SO_REUSEPORT",
                    "close req/s", "÷ Node RR", "÷ SO_REUSEPORT", "keep-alive p50 / p99 ms",
                    "close p50 / p99 ms", "failed"], rows)
    lines += ["", "close = every request on a new connection (`-H \"Connection: close\"`). "
              "With repeats, (min-max) over them follows the median. "
              "failed = wrk's connect/write/timeout errors and non-2xx, plus read errors in "
              "keep-alive (in close mode wrk counts one spurious read error per request when "
              "the response lacks a \"Connection: close\" header, as the anchor's raw responder's "
              "does, so read errors are left out there; that extra reconnect work lands on wrk "
              "for the raw-responder servers only, not for Node, uvicorn or gunicorn).", ""]

    # primary CPU
    rows = []
    node_tot = med(res, node, "close", "primary", "stat_us") if node else None
    for n in names:
        if not primary_accepts(res, n):
            continue
        u = med(res, n, "close", "primary", "user_us")
        sy = med(res, n, "close", "primary", "sys_us")
        st, sc = med(res, n, "close", "primary", "stat_us"), med(res, n, "close", "primary",
                                                                  "sched_us")
        tick = med(res, n, "close", "primary", "tick_us_per_conn")
        rows.append([label(res, n), f_num(u, 2), f_num(sy, 2), f_num(st, 2), f_num(sc, 2),
                     f_num(1e6 / sc if sc else None), f_ratio(st, node_tot), f_num(tick, 2)])
    lines += ["## Primary CPU per connection (Connection: close)", ""]
    lines += table(["server", "user µs", "system µs", "user+system µs", "on-CPU µs (schedstat)",
                    "connections/s per primary core", "user+system ÷ Node RR",
                    "resolution µs (1 tick)"], rows)
    idle = [label(res, n) for n in names if not primary_accepts(res, n)]
    lines += ["", "utime/stime of the primary's pid from /proc/<pid>/stat before and after the "
              "run (clock ticks, so each figure is good to ± one tick: the last column), divided "
              "by the connections accepted (counted by the workers where they count, else wrk's "
              "requests). on-CPU is /proc/<pid>/schedstat's nanoseconds (user+system, fine "
              "grained); connections/s per primary core = 1 / on-CPU per connection: how many "
              "connections one core of primary could dispatch. No primary accepts in: "
              + (", ".join(idle) or "-") + " (reported '-').", ""]

    # where the CPU goes
    rows = []
    for n in names:
        pr = med(res, n, "close", "primary", "sched_us") if primary_accepts(res, n) else None
        wk = med(res, n, "close", "workers_cpu", "sched_us_per_conn")
        rows.append([label(res, n), f_num(pr, 1), f_num(wk, 1),
                     f_num((pr or 0) + wk if wk is not None else None, 1),
                     f_num(med(res, n, "close", "primary", "slices_per_conn"), 2)
                     if primary_accepts(res, n) else "-",
                     f_num(med(res, n, "close", "workers_cpu", "slices_per_conn"), 2)])
    lines += ["## Where the server's CPU goes (Connection: close, per connection)", ""]
    lines += table(["server", "primary on-CPU µs", "all workers on-CPU µs", "server total µs",
                    "primary wake-ups", "worker wake-ups (all)"], rows)
    lines += ["", "From /proc/<pid>/schedstat of the primary and of each worker (on-CPU ns and "
              "timeslices, i.e. times the process was put on a CPU), over the connections "
              "served. The load generator's own CPU is not in these columns; on this machine "
              "it shares the cores with the server, so every µs the server spends per "
              "connection is taken from wrk too. A wake-up count near or above 1 per "
              "connection means the process sleeps and wakes for every connection instead of "
              "taking them in batches.", ""]

    # shares
    rows = []
    for n in names:
        last = res["servers"][n]["runs"][-1]
        sh = dig(last, "close", "shares") or {}
        if sh.get("source") == "counted":
            vals, what = dig(sh, "connections", "values") or [], "worker (connections)"
            mm = med(res, n, "close", "shares", "connections", "max_min")
            cv = med(res, n, "close", "shares", "connections", "cv")
            per = " / ".join(f_num(v) for v in vals)
        else:
            vals, what = dig(sh, "cpu", "values") or [], "CPU proxy (schedstat)"
            mm = med(res, n, "close", "shares", "cpu", "max_min")
            cv = med(res, n, "close", "shares", "cpu", "cv")
            tot = sum(vals) or 1
            per = " / ".join(f"{v / tot:.0%}" for v in vals)
        ka_mm = (med(res, n, "keepalive", "shares", "requests", "max_min")
                 if sh.get("source") == "counted"
                 else med(res, n, "keepalive", "shares", "cpu", "max_min"))
        rows.append([label(res, n), what, per, f_num(mm, 3), f_num(cv, 3), f_num(ka_mm, 3)])
    lines += ["## Per-worker share", ""]
    lines += table(["server", "counted by", "per worker (close, last repeat)", "max/min (close)",
                    "CV (close)", "max/min of requests (keep-alive)"], rows)
    lines += ["", "Servers running bench/servers/_hello.py count their own connections and "
              "requests (a mmap'd file per worker, flushed every 10 ms). For servers whose "
              "worker code is not ours (Node, uvicorn, gunicorn, the unmodified anchor), each "
              "worker's on-CPU time over the run stands in for its share. In keep-alive mode "
              "wrk's connections are spread once, so the request share there mostly reflects "
              "how the 64 connections landed.", ""]

    # slow worker
    slow = res.get("slow") or {}
    if slow:
        ref = next((n for n in ("fc-reuseport", "reuseport") if dig(slow, n, "p99")), None)
        rows = []
        for n, r in slow.items():
            if "skipped" in r or "error" in r:
                rows.append([label(res, n), r.get("skipped") or r.get("error", ""), "", "", "",
                             "", ""])
                continue
            rows.append([label(res, n), f_num(r.get("rps")), f_num(r.get("p50"), 2),
                         f_num(r.get("p90"), 1), f_num(r.get("p99"), 1),
                         f_ratio(r.get("p99"), dig(slow, ref, "p99") if ref else None),
                         f"{r['slow_worker_share']:.1%}" if "slow_worker_share" in r else "-"])
        lines += ["## Slow worker (4 workers, one blocks 50 ms on 5% of its requests)", ""]
        lines += table(["server", "req/s", "p50 ms", "p90 ms", "p99 ms",
                        f"p99 ÷ {label(res, ref) if ref else 'reuseport'}",
                        "slow worker's share of connections"], rows)
        lines += ["", "Connection: close (a fresh balancing decision per request; with "
                  "keep-alive a connection stays on the worker it landed on whatever the "
                  f"policy), wrk -c{s['connections']}. The slow worker's sleep is a blocking "
                  "time.sleep in data_received: its whole event loop stops, as with CPU-bound "
                  "work.", ""]

    # respawn / rolling
    lines += ["## Respawn and rolling restart", ""]
    rows = []
    for n, r in (res.get("respawn") or {}).items():
        if "skipped" in r or "error" in r:
            rows.append([label(res, n), "respawn", "not available: " +
                         (r.get("skipped") or r.get("error", "")), "", ""])
            continue
        if not r.get("available"):
            rows.append([label(res, n), "respawn", "not available: " + r.get("note", ""),
                         "", f"{r.get('failed', 0)} of {r.get('requests', 0)}"])
            continue
        acc = r["accepting_ms"]
        rows.append([label(res, n), f"respawn, {r['kills']} SIGKILLs",
                     f"replacement accepting: median {statistics.median(acc):.1f} ms, "
                     f"max {max(acc):.1f} ms (worker code running: median "
                     f"{statistics.median(r['started_ms']) if r['started_ms'] else math.nan:.1f}"
                     " ms)", f"{r['rps']:,.0f}", f"{r['failed']} of {r['requests']:,}"])
    for n, r in (res.get("rolling") or {}).items():
        if "skipped" in r or "error" in r:
            rows.append([label(res, n), "rolling restart", "not available: " +
                         (r.get("skipped") or r.get("error", "")), "", ""])
            continue
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r.get("errors", {}).items()))
        fail = f"{r.get('failed', 0)} of {r.get('requests', 0):,}" + (f" ({errs})" if errs else "")
        if not r.get("available"):
            rows.append([label(res, n), "rolling restart (SIGHUP)",
                         "not available: " + r.get("note", ""), f"{r.get('rps', 0):,.0f}", fail])
            continue
        took = r["restart_ms"]
        rows.append([label(res, n), f"rolling restart, {r['hups']} SIGHUPs",
                     f"all workers replaced in median {statistics.median(took):,.0f} ms",
                     f"{r['rps']:,.0f}", fail])
    lines += table(["server", "event", "time", "load req/s", "failed requests"], rows)
    lines += ["", "Load: bench/_loadgen.py, Python clients doing connect / GET with "
              "Connection: close / read the body, in forked processes (respawn: 1 x 4 "
              "clients; rolling: 2 x 8); a request failed when the connection was refused or "
              "reset, timed out (5 s) or ended before the body. Respawn: 4 workers, the oldest is "
              "SIGKILLed, each kill a gap after the previous replacement accepted, only once "
              "it is old enough to have listened (the supervisor delays the replacement of a "
              "worker that dies before it is ready, on purpose: crash-loop backoff); time "
              "from the SIGKILL to the new worker's first connection "
              "(CLOCK_MONOTONIC, written by the worker at once; 'worker code running' = "
              "when the new worker's count file appeared). Rolling: SIGHUP to the primary, "
              "then wait until every old worker is gone and as many new ones have served.", ""]

    lines += _goals.goals(res)
    notes = res.get("notes") or []
    skipped = [(n, v["skipped"]) for n, v in res["servers"].items() if v.get("skipped")]
    if notes or skipped:
        lines += ["## Not measured, and notes", ""]
        lines += [f"- {label(res, n)} (`{n}`): not measured: {why}" for n, why in skipped]
        lines += [f"- {x}" for x in notes]
        lines += [""]
    lines += ["## Servers", ""]
    lines += table(["name", "server", "what runs"],
                   [[f"`{n}`", label(res, n), _servers.BY_NAME[n].what] for n in res["servers"]])
    lines += [""]
    return "\n".join(lines)


def plot(res: Results, path: Path) -> str | None:
    """Throughput (both modes) and primary CPU per connection, by server."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib not importable ({e})"
    names = measured(res)
    if not names:
        return "no plot: nothing measured"
    labels = [label(res, n) for n in names]
    ka = [med(res, n, "keepalive", "rps") or 0 for n in names]
    cl = [med(res, n, "close", "rps") or 0 for n in names]
    acc = [n for n in names if primary_accepts(res, n)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, max(4.5, 0.45 * len(names) + 1.5)),
                                 gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(names)))
    h = 0.4
    a1.barh([i - h / 2 for i in y], [v / 1000 for v in ka], h, label="keep-alive",
            color="#4c72b0")
    a1.barh([i + h / 2 for i in y], [v / 1000 for v in cl], h, label="Connection: close",
            color="#dd8452")
    for i in y:
        a1.text(ka[i] / 1000, i - h / 2, f" {ka[i] / 1000:.0f}k", va="center", fontsize=8)
        a1.text(cl[i] / 1000, i + h / 2, f" {cl[i] / 1000:.1f}k", va="center", fontsize=8)
    a1.set_yticks(y, labels)
    a1.invert_yaxis()
    a1.set_xlabel("requests/s (thousands)")
    a1.set_title("Throughput")
    a1.set_xlim(0, max([*ka, *cl, 1]) / 1000 * 1.15)
    a1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    if acc:
        yl = list(range(len(acc)))
        u = [med(res, n, "close", "primary", "user_us") or 0 for n in acc]
        sy = [med(res, n, "close", "primary", "sys_us") or 0 for n in acc]
        a2.barh(yl, u, color="#55a868", label="user")
        a2.barh(yl, sy, left=u, color="#c44e52", label="system")
        for i in yl:
            a2.text(u[i] + sy[i], i, f" {u[i] + sy[i]:.1f} µs", va="center", fontsize=8)
        a2.set_yticks(yl, [label(res, n) for n in acc])
        a2.invert_yaxis()
        a2.set_xlim(0, max(a + b for a, b in zip(u, sy, strict=True)) * 1.25 or 1)
        a2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    a2.set_xlabel("primary CPU µs per connection, Connection: close (lower is better)")
    a2.set_title("Primary CPU per connection")
    s = res["settings"]
    fig.suptitle(f"fastcluster vs anchors, {res['date']}: {s['workers']} workers, "
                 f"wrk -t1 -c{s['connections']} -d{s['duration']:g}s, "
                 f"{res['machine'].get('nproc')} CPUs ({res['machine'].get('cpu')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
