"""Respawn time of a minimal fastcluster worker: SIGKILL -> the replacement's
main starts -> it accepts its first connection.

    python bench/respawn_probe.py                 # 20 kills, fork
    python bench/respawn_probe.py --method spawn --kills 10

What it measures, and how: this script starts itself as a cluster (a primary
and --workers workers; each worker serves a one-line HTTP answer through
fastcluster.aio.create_server on plain asyncio, importing nothing after the
fork). --clients threads here send requests (Connection: close) the whole
time. Every --gap seconds the oldest worker is SIGKILLed; each worker writes
the CLOCK_MONOTONIC time its main started and the time of its first
connection to the pipe we read, so the figures are (time - kill time) for
the replacement: "main" is what the supervisor costs (reap, fork, boot),
"accepting" adds the app's own start (event loop, listen round trip) and the
first connection the dispatcher hands it. The cluster runs with
respawn_stable=0.3, so a worker older than 0.3 s is replaced at once (the
default is 10 s: a younger death is a crash and backs off, which is not what
this measures). Unlike `python -m bench`'s respawn scenario (the bench
server on uvloop, under 4 load-generating client processes), this isolates
fastcluster's own part. Bounded: --kills, and 120 s in all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastcluster as cluster  # noqa: E402

# Where the time goes, in the order it goes: the primary reaps the killed
# worker ("exit", stamped with the dead pid) and is about to fork (pre_fork,
# the primary's pid); in the child: the post_fork hook, the worker's main,
# its event loop running, create_server returned, its first connection
KINDS = ("reaped", "pre_fork", "post_fork", "main", "loop", "listening", "accepting")


def stamp(what: str, pid: int | None = None) -> None:
    os.write(1, f"{what} {pid or os.getpid()} {time.monotonic():.6f}\n".encode())


async def serve(port: int) -> None:
    from fastcluster import aio

    first = [True]

    class Answer(asyncio.Protocol):
        t: asyncio.Transport

        def connection_made(self, t: asyncio.BaseTransport) -> None:
            if first[0]:
                first[0] = False
                stamp("accepting")
            self.t = t  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.t.close()

    stamp("loop")
    server = await aio.create_server(Answer, ("127.0.0.1", port))
    stamp("listening")
    async with server:
        await server.serve_forever()


def server_main() -> None:
    port = int(os.environ["PROBE_PORT"])
    if cluster.is_primary:
        cluster.setup_primary(respawn_stable=0.3, start_method=os.environ["PROBE_METHOD"],
                              pre_fork=lambda _w: stamp("pre_fork"),  # in the primary
                              post_fork=lambda _w: stamp("post_fork"))  # in the child
        cluster.on("exit", lambda w, _code, _sig: stamp("reaped", w.pid))
        for _ in range(int(os.environ["PROBE_WORKERS"])):
            cluster.fork()
        cluster.run()
    else:
        stamp("main")
        asyncio.run(serve(port))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kernel_baseline(mib: int = 30, runs: int = 7) -> tuple[float, float]:
    """What the kernel alone costs here, for a process of `mib` MiB touched
    (about a worker's size): (SIGKILL -> waitpid returns, fork() in the
    parent), medians in ms, no fastcluster involved."""
    ballast = bytearray(mib << 20)
    for i in range(0, len(ballast), 4096):  # resident, as a worker's heap is
        ballast[i] = 1
    kills, forks = [], []
    for _ in range(runs):
        r, w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            for i in range(0, len(ballast), 4096):  # its own copy, as a worker's
                ballast[i] = 2
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
        forks.append((time.monotonic() - t0) * 1000)
        os.read(r, 1)
        os.close(r)
        os.close(w)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills.append((time.monotonic() - t0) * 1000)
    return statistics.median(kills), statistics.median(forks)


def drive(args: argparse.Namespace) -> None:
    port = free_port()
    env = dict(os.environ, PROBE_PORT=str(port), PROBE_METHOD=args.method,
               PROBE_WORKERS=str(args.workers), PROBE_SERVE="1")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    events: list[tuple[str, int, float]] = []
    lock = threading.Lock()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] in KINDS:
                with lock:
                    events.append((parts[0], int(parts[1]), float(parts[2])))

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + 120
    stop = threading.Event()
    failed = [0]

    def client() -> None:
        while not stop.is_set() and time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    s.recv(256)
            except OSError:
                failed[0] += 1
                time.sleep(0.001)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    mains: list[float] = []
    steps: list[tuple[float, ...]] = []  # the KINDS' times after the kill, ms
    accepting: list[float] = []
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with lock:
                up = {pid for kind, pid, _ in events if kind == "accepting"}
            if len(up) >= args.workers or proc.poll() is not None:
                break
            with socket.socket() as s:  # the first workers need a connection each
                s.settimeout(1)
                try:
                    s.connect(("127.0.0.1", port))
                    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                    s.recv(256)
                except OSError:
                    time.sleep(0.05)
        for t in clients:
            t.start()
        time.sleep(0.5)
        for _ in range(args.kills):
            if time.monotonic() > end - 5 or proc.poll() is not None:
                break
            with lock:
                started = {pid: t for kind, pid, t in events if kind == "main"}
            primary = {pid for kind, pid, _t in events if kind == "pre_fork"}
            victim = min((p for p in started if p not in killed), key=started.__getitem__)
            killed.add(victim)
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            got: dict[str, float] = {}
            while time.monotonic() < t0 + 5 and "accepting" not in got:
                time.sleep(0.001)
                with lock:
                    new = [(k, p, t) for k, p, t in events if t > t0 and
                           (p == victim if k == "reaped" else
                            p in primary if k == "pre_fork" else p not in started)]
                for kind, _pid, t in new:
                    got.setdefault(kind, (t - t0) * 1000)
            if "main" not in got or "accepting" not in got:
                print("no replacement accepted within 5 s", file=sys.stderr)
                break
            mains.append(got["main"])
            accepting.append(got["accepting"])
            if all(k in got for k in KINDS):
                steps.append(tuple(got[k] for k in KINDS))
            time.sleep(args.gap)
    finally:
        stop.set()
        for t in clients:
            t.join(5)
        stop_server(proc)
    if not accepting:
        raise SystemExit("nothing measured")
    load = os.getloadavg()[0]
    lines = [f"respawn probe: {len(accepting)} SIGKILLs, start_method={args.method}, "
             f"{args.workers} workers, {args.clients} client thread(s), "
             f"load average {load:.2f}"]
    for name, vals in (("replacement main starts", mains),
                       ("replacement accepting", accepting)):
        lines.append(f"  {name:24s} median {statistics.median(vals):7.2f} ms   "
                     f"min {min(vals):7.2f}   max {max(vals):7.2f}")
    lines.append(f"  failed client connections: {failed[0]} (those the killed worker held)")
    if steps:  # the medians of each step's own time, kill to accepting
        names = ("kill -> reaped (SIGCHLD, waitpid)", "reaped -> pre_fork (respawn)",
                 "pre_fork -> post_fork (fork)", "post_fork -> main (worker boot)",
                 "main -> event loop (asyncio.run)", "loop -> create_server returned",
                 "create_server -> 1st connection")
        lines.append(f"  where the time goes ({len(steps)} kills, median of each step):")
        prev = [0.0] * len(steps)
        for i, name in enumerate(names):
            step = statistics.median(s[i] - p for s, p in zip(steps, prev, strict=True))
            lines.append(f"    {name:34s} {step:7.2f} ms")
            prev = [s[i] for s in steps]
    print("\n".join(lines))
    kill_ms, fork_ms = kernel_baseline()
    lines.append(f"  this machine's kernel, a 30 MiB process, no fastcluster: SIGKILL -> "
                 f"reaped {kill_ms:.2f} ms, fork() {fork_ms:.2f} ms (medians of 7)")
    if args.out:
        write_report(args.out, lines)


def write_report(path: str, lines: list[str]) -> None:
    """The printed figures, with the command, date and commit they belong to."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    head = [f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"`python bench/respawn_probe.py {' '.join(sys.argv[1:])}`", "",
            f"fastcluster commit {commit}, {os.cpu_count()} CPUs, "
            f"Python {sys.version.split()[0]}", "", "```"]
    with open(path, "w") as f:
        f.write("\n".join([*head, *lines, "```", ""]))
    print(f"wrote {path}")


def stop_server(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def main() -> None:
    if os.environ.get("PROBE_SERVE") or not cluster.is_primary:
        server_main()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--method", choices=("fork", "spawn"), default="fork")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--gap", type=float, default=0.6, help="seconds between kills")
    ap.add_argument("--out", help="also write the figures to this Markdown file "
                    "(bench/results/<date>-respawn-probe-<method>.md, say)")
    drive(ap.parse_args())


if __name__ == "__main__":
    main()
