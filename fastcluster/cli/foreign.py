"""Flags of gunicorn and uvicorn that `fastcluster run` does not take, each
with why and what to type instead.

Typed from habit, one stops `run` with that reason (exit status 2, as
argparse's own errors) instead of argparse's bare "unrecognized arguments";
none is accepted and ignored. Those with the same meaning here are aliases
instead (cli/options.py, cli/flags.py: -u, -g, -p, --keep-alive,
--certfile...).
"""

from __future__ import annotations

from collections.abc import Sequence

FOREIGN: dict[tuple[str, ...], str] = {
    ("-k", "--worker-class"):
        "gunicorn's worker class: an ASGI app is served on uvicorn's protocols and a "
        "WSGI app through a2wsgi on --threads threads, found by --interface auto; "
        "drop the flag",
    ("--worker-connections",):
        "gunicorn's limit for eventlet/gevent workers: --limit-concurrency N is the "
        "most connections and requests a worker takes at once",
    ("-D", "--daemon"):
        "the primary stays in the foreground: run it under systemd (deploy/) or "
        "another process manager",
    ("--capture-output",):
        "the workers write to the primary's standard output and error already: "
        "redirect those, or give --error-logfile FILE",
    ("--statsd-host", "--statsd-prefix", "--dogstatsd-tags"):
        "there is no statsd client: --metrics ADDR serves the counters as Prometheus text",
    ("--chdir",):
        "cd to the directory before `fastcluster run` (the workers keep the "
        "primary's working directory) and give --app-dir DIR to import the app from it",
    ("-e", "--env"):
        "gunicorn's -e KEY=VALUE: set the variable in the environment or in an "
        "--env-file FILE",
    ("--reload-engine",):
        "--reload always watches with watchfiles (uvicorn's watcher)",
    ("--reload-extra-file",):
        "give --reload-include GLOB (and --reload-dir DIR) for more files to watch",
    ("--reload-delay",):
        "--reload takes watchfiles' grouping of changes and replaces the workers "
        "through the rolling restart; there is no delay to set",
    ("--use-colors", "--no-use-colors"):
        "log lines are not coloured; --log-config FILE formats them",
    ("--worker-tmp-dir",):
        "there are no heartbeat files: a worker's loop beats to the primary over its "
        "channel (--timeout S)",
    ("--timeout-worker-healthcheck",):
        "the heartbeat's deadline is --timeout S",
    ("--proxy-protocol",):
        "the PROXY protocol is not read: let the proxy send X-Forwarded-For and "
        "X-Forwarded-Proto (--forwarded-allow-ips)",
    ("-n", "--name"):
        "process titles are not set; `fastcluster status` names each worker",
}

_BY_FLAG = {flag: why for flags, why in FOREIGN.items() for flag in flags}


def refusal(args: Sequence[str]) -> str | None:
    """Why the first foreign flag among `run`'s arguments is refused, or None."""
    for arg in args:
        if arg == "--":
            return None
        flag = arg.split("=", 1)[0]
        why = _BY_FLAG.get(flag) if arg.startswith("-") else None
        if why is not None:
            return f"{flag} is not a flag of fastcluster run: {why}"
    return None
