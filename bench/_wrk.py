"""Running wrk (bounded in time) and reading its report."""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Any

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50", "99", "avg", "max"
    errors: dict[str, int] = field(default_factory=dict)  # connect read write timeout non2xx
    raw: str = ""

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "seconds": self.seconds, "rps": self.rps,
                "latency_ms": self.latency_ms, "errors": self.errors}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"wrk latency {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse(text: str) -> WrkResult:
    r = WrkResult(raw=text)
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if m:
        r.requests = int(m.group(1))
        r.seconds = float(m.group(2)) * UNITS[m.group(3)] / 1000.0
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r.rps = float(m.group(1))
    m = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if m:
        r.latency_ms["avg"] = _ms(m.group(1))
        r.latency_ms["max"] = _ms(m.group(3))
    for pct, val in re.findall(r"^\s+(50|75|90|99)(?:\.0+)?%\s+(\S+)", text, re.M):
        r.latency_ms[pct] = _ms(val)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r.errors.update(zip(("connect", "read", "write", "timeout"),
                            (int(x) for x in m.groups()), strict=True))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r.errors["non2xx"] = int(m.group(1))
    return r


def command(wrk: str, port: int, connections: int, duration: float, close: bool,
            timeout: float = 2.0) -> list[str]:
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
           f"--timeout={timeout:g}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    return [*cmd, f"http://127.0.0.1:{port}/"]


def run(wrk: str, port: int, connections: int, duration: float, close: bool) -> WrkResult:
    """One wrk run of `duration` seconds, killed if it overstays by 15 s."""
    cmd = command(wrk, port, connections, duration, close)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 15)
    res = parse(p.stdout)
    if p.returncode != 0 or not res.requests:
        res.errors.setdefault("wrk_failed", 1)
        res.raw += p.stderr
    return res


class Background:
    """wrk in the background for at most `limit` seconds; stop() ends it early
    with SIGINT (wrk then prints its report) and returns the result."""

    def __init__(self, wrk: str, port: int, connections: int, limit: float, close: bool):
        self.limit = limit
        self.result: WrkResult | None = None
        self.proc = subprocess.Popen(command(wrk, port, connections, limit, close),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> WrkResult:
        if self.result is not None:
            return self.result
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=self.limit + 15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.result = parse(out or "")
        return self.result
