"""The status snapshot (primary/status.py) in Prometheus' text format, for
GET /metrics on the MetricsServer."""

from __future__ import annotations

from typing import Any


def _metric(lines: list[str], name: str, kind: str, help: str,
            samples: list[tuple[str, Any]]) -> None:
    lines.append(f"# HELP {name} {help}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        if value is not None:
            lines.append(f"{name}{labels} {value}")


def prometheus_text(doc: dict[str, Any]) -> str:
    """The snapshot in Prometheus' text exposition format (0.0.4)."""
    p = doc["primary"]
    ws = doc["workers"]
    lines: list[str] = []

    def per_worker(key: str) -> list[tuple[str, Any]]:
        return [(f'{{worker="{w["id"]}",pid="{w["pid"]}"}}', w[key]) for w in ws]

    _metric(lines, "fastcluster_workers", "gauge", "Live worker processes.",
            [("", len(ws))])
    health = p.get("health") or {}
    if "ready" in health:
        _metric(lines, "fastcluster_ready", "gauge", "1 while /readyz would answer 200 "
                "(a worker listens, no drain or shutdown), else 0.",
                [("", int(bool(health["ready"])))])
    _metric(lines, "fastcluster_restarts_total", "counter",
            "Workers forked to replace one that exited.", [("", p["restarts"])])
    _metric(lines, "fastcluster_primary_uptime_seconds", "gauge", "Seconds since start.",
            [("", p["uptime"])])
    _metric(lines, "fastcluster_primary_rss_bytes", "gauge", "Resident memory of the "
            "primary.", [("", p["rss"])])
    core = p.get("dispatcher") or {}
    for key, help in (("accepted", "Connections accepted by the primary's dispatcher."),
                      ("redispatched", "Connections given to another worker after theirs "
                       "died before taking them."),
                      ("shed", "Connections closed by the dispatcher under EMFILE."),
                      ("emfile", "Times the dispatcher ran out of file descriptors.")):
        if key in core:
            _metric(lines, f"fastcluster_dispatcher_{key}_total", "counter", help,
                    [("", core[key])])
    _metric(lines, "fastcluster_worker_connections_dispatched_total", "counter",
            "Connections the primary sent to the worker (rr/least).",
            per_worker("dispatched"))
    _metric(lines, "fastcluster_worker_connections_open", "gauge",
            "Connections the worker holds open now (rr/least).", per_worker("open"))
    _metric(lines, "fastcluster_worker_requests_total", "counter",
            "Requests the worker served.", per_worker("requests"))
    _metric(lines, "fastcluster_worker_restarts", "gauge",
            "Workers that held this worker's place before it.", per_worker("restarts"))
    _metric(lines, "fastcluster_worker_uptime_seconds", "gauge",
            "Seconds since the worker was forked.", per_worker("uptime"))
    _metric(lines, "fastcluster_worker_rss_bytes", "gauge", "Resident memory of the worker.",
            per_worker("rss"))
    return "\n".join(lines) + "\n"
