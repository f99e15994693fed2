"""Load harness (issue D): fastcluster beside Node cluster, uvicorn, gunicorn and
SO_REUSEPORT, in one run, on loopback.

    python -m bench                       # everything, under 10 minutes on 2 cores
    python -m bench --servers fc-rr,node-rr,reuseport --duration 3 --skip slow,rolling

Each server is a command line started in its own session on a free 127.0.0.1
port and stopped (SIGTERM, then SIGKILL to the group) after its runs; every
load run is bounded in time. Writes bench/results/<date>.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _env, _report, _scenarios, _servers
from bench._env import say

SCENARIOS = ("throughput", "slow", "respawn", "rolling")
RESPAWN_SERVERS = ("fc-rr", "fc-steer")  # supervised servers whose workers count themselves
ROLLING_SERVERS = ("fc-rr", "fc-steer", "fc-cli-steer", "gunicorn-uvicorn", "uvicorn")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [s.name for s in _servers.SPECS]
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="workers per server (default: the core count)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of keep-alive load before measuring a started server (1)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="start and measure every server this many times, interleaved; the "
                         "tables show medians (2)")
    ap.add_argument("--servers", default="all",
                    help="comma-separated subset of: " + ", ".join(names)
                         + " (default all; the fc-* need the public API)")
    ap.add_argument("--skip", default="", help="comma-separated scenarios to skip: "
                    + ", ".join(SCENARIOS))
    ap.add_argument("--slow-servers", default="auto",
                    help="servers for the slow-worker scenario (default: the fastcluster "
                         "policies and the counting SO_REUSEPORT server among --servers)")
    ap.add_argument("--respawn-kills", type=int, default=5,
                    help="SIGKILLs in the respawn scenario, 4 workers, the oldest each time (5)")
    ap.add_argument("--respawn-gap", type=float, default=0.3,
                    help="seconds between a replacement accepting and the next SIGKILL (0.3)")
    ap.add_argument("--respawn-min-age", type=float, default=1.0,
                    help="only kill a worker at least this old, in s (1.0: it has listened; "
                         "a worker that dies before it is ready is backed off on purpose)")
    ap.add_argument("--hups", type=int, default=3, help="SIGHUPs in the rolling scenario (3)")
    ap.add_argument("--out", default=str(_env.REPO / "bench" / "results"),
                    help="directory for <name>.md/.json/.png (bench/results)")
    ap.add_argument("--name", default=None, help="file name stem (default: today's date)")
    ap.add_argument("--anchors", default=None,
                    help="the anchors directory (default ../shared/anchors beside the repo)")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install wrk nor pip install missing anchors")
    a = ap.parse_args(argv)
    a.server_list = names if a.servers == "all" else [x for x in a.servers.split(",") if x]
    bad = [x for x in a.server_list if x not in _servers.BY_NAME]
    if bad:
        ap.error(f"unknown server(s) {', '.join(bad)}; known: {', '.join(names)}")
    a.skip_set = {x for x in a.skip.split(",") if x}
    if a.skip_set - set(SCENARIOS):
        ap.error(f"unknown scenario(s) in --skip: {', '.join(a.skip_set - set(SCENARIOS))}")
    if a.workers < 1 or a.duration < 1 or a.connections < 1 or a.repeat < 1:
        ap.error("--workers, --duration, --connections and --repeat must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    wrk = _env.ensure_wrk(not a.no_install)
    if not wrk:
        say("cannot run without wrk: `apt-get install wrk` (Debian/Ubuntu package `wrk`)")
        return 2
    have = _env.ensure_python_packages(not a.no_install)
    node = shutil.which("node")
    anchors = _env.anchors_dir(a.anchors)
    api_ok, api_reason = _env.public_api_status()
    say(f"wrk: {wrk}; node: {node or 'not found'}; anchors: {anchors or 'not found'}")
    say(f"fastcluster: {api_reason}" + ("" if api_ok else
        " -> fc-* servers are skipped; core-rr/core-least (fastcluster._core alone) stand in"))
    ctx = _servers.Ctx(wrk=wrk, node=node, anchors=anchors, api_ok=api_ok,
                       api_reason=api_reason, workers=a.workers, duration=a.duration,
                       connections=a.connections, warmup=a.warmup)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "started": started,
        "command": "`python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
                   + "`",
        "machine": _env.machine(wrk, node, have),
        "settings": {"workers": a.workers, "duration": a.duration,
                     "connections": a.connections, "warmup": a.warmup, "repeat": a.repeat},
        "fastcluster_mode": ("public API (bench/servers/fastcluster_hello.py: "
                             "cluster.fork / cluster.run / fastcluster.aio.create_server); "
                             "core-* = primary on fastcluster._core alone"
                             if api_ok else
                             f"core only: {api_reason}, so the fc-* servers were not run and "
                             "core-rr/core-least (bench/servers/core_hello.py, a primary on "
                             "fastcluster._core alone) stand in for rr/least"),
        "servers": {},
        "slow": {},
        "respawn": {},
        "rolling": {},
        "notes": [],
    }
    runnable: list[_servers.Spec] = []
    for name in a.server_list:
        spec = _servers.BY_NAME[name]
        why = spec.missing(ctx, have)
        entry: dict[str, Any] = {"label": spec.label, "what": spec.what, "runs": []}
        res["servers"][name] = entry
        if why:
            entry["skipped"] = why
            say(f"{name}: skipped ({why})")
        else:
            runnable.append(spec)

    if "throughput" not in a.skip_set:
        for rep in range(a.repeat):
            for spec in runnable:
                tag = f"{spec.name}" + (f" (repeat {rep + 1}/{a.repeat})" if a.repeat > 1 else "")
                say(f"throughput: {tag}")
                try:
                    r = _scenarios.throughput(spec, ctx)
                except Exception as e:
                    res["servers"][spec.name].setdefault("errors", []).append(str(e)[-1500:])
                    say(f"  {spec.name} failed: {str(e)[-600:]}")
                    continue
                res["servers"][spec.name]["runs"].append(r)
                ka, cl = r["keepalive"], r["close"]
                pr = cl.get("primary") or {}
                say(f"  keep-alive {ka['rps']:,.0f} req/s p99 {ka['p99'] or 0:.2f} ms | close "
                    f"{cl['rps']:,.0f} req/s p99 {cl['p99'] or 0:.2f} ms"
                    + (f" | primary {pr.get('user_us', 0):.2f} user + "
                       f"{pr.get('sys_us', 0):.2f} sys µs/conn"
                       if spec.primary == "accepts" and pr else ""))
        for entry in res["servers"].values():
            if not entry.get("runs") and entry.get("errors") and not entry.get("skipped"):
                entry["skipped"] = "failed to run: " + entry["errors"][-1].splitlines()[0]

    if "slow" not in a.skip_set:
        if a.slow_servers == "auto":
            slow = [s for s in runnable if s.slow_capable]
            if any(s.name.startswith("fc-") for s in slow):  # the core-* only stand in
                slow = [s for s in slow if not s.name.startswith("core-")]
        else:
            slow = [_servers.BY_NAME[x] for x in a.slow_servers.split(",") if x]
        for spec in slow:
            if spec.missing(ctx, have):
                res["slow"][spec.name] = {"skipped": spec.missing(ctx, have)}
                continue
            if not spec.slow_capable:
                res["slow"][spec.name] = {"skipped": "its workers are not ours (no slow mode)"}
                continue
            say(f"slow worker: {spec.name} (4 workers, one slow)")
            try:
                r = _scenarios.slow_worker(spec, ctx)
                res["slow"][spec.name] = r
                say(f"  {r['rps']:,.0f} req/s p50 {r['p50'] or 0:.2f} ms p99 "
                    f"{r['p99'] or 0:.1f} ms, slow worker's share "
                    f"{r.get('slow_worker_share', 0):.1%}")
            except Exception as e:
                res["slow"][spec.name] = {"error": str(e)[-600:]}
                say(f"  failed: {e}")

    if "respawn" not in a.skip_set:
        for name in RESPAWN_SERVERS:
            if name not in a.server_list:
                continue
            spec = _servers.BY_NAME[name]
            why = spec.missing(ctx, have)
            if why:
                res["respawn"][name] = {"skipped": why}
                continue
            say(f"respawn: {name}, {a.respawn_kills} SIGKILLs under load, "
                f"{a.respawn_gap:g} s apart")
            try:
                r = _scenarios.respawn(spec, ctx, a.respawn_kills, min_age=a.respawn_min_age,
                                       gap=a.respawn_gap)
                res["respawn"][name] = r
                say("  " + (f"median {r['median_ms']:.1f} ms, failed {r['failed']}"
                            if r.get("available") else f"not available: {r.get('note')}"))
            except Exception as e:
                res["respawn"][name] = {"error": str(e)[-600:]}
                say(f"  failed: {e}")

    if "rolling" not in a.skip_set:
        for name in ROLLING_SERVERS:
            spec = _servers.BY_NAME[name]
            if name not in a.server_list:
                continue
            why = spec.missing(ctx, have)
            if why:
                res["rolling"][name] = {"skipped": why}
                continue
            say(f"rolling restart: {name}, {a.hups} SIGHUPs under load")
            try:
                r = _scenarios.rolling(spec, ctx, a.hups)
                res["rolling"][name] = r
                say(f"  failed {r['failed']} of {r['requests']}"
                    + ("" if r.get("available") else f"; not available: {r.get('note')}"))
            except Exception as e:
                res["rolling"][name] = {"error": str(e)[-600:]}
                say(f"  failed: {e}")

    if not have.get("uvloop"):
        res["notes"].append("uvloop is not installed: the asyncio workers ran on the default "
                            "asyncio loop")
    res["elapsed_s"] = time.monotonic() - t_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or res["date"]
    md_path, png_path, json_path = out / f"{stem}.md", out / f"{stem}.png", out / f"{stem}.json"
    err = _report.plot(res, png_path)
    if err:
        res["notes"].append(err)
    md = _report.markdown(res)
    if not err:
        md += f"\n![throughput and primary CPU per connection]({png_path.name})\n"
    md_path.write_text(md)
    json_path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(md)
    say(f"wrote {md_path}, {json_path}" + ("" if err else f", {png_path}")
        + f" in {res['elapsed_s'] / 60:.1f} min")
    return 0


def run() -> None:
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    run()
