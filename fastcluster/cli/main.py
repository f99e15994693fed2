"""The `fastcluster` command (and `python -m fastcluster`).

    fastcluster run myapp:app --workers 4 --bind 127.0.0.1:8000 --policy least
    fastcluster status [--socket PATH] [--json] [--watch]

`run` serves an ASGI app (uvicorn's HTTP protocols) or a WSGI app (wsgiref
on a thread pool) in each worker; see `fastcluster run --help` for every
setting, each also an environment variable and a config file key.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from . import foreign as _cli_foreign
from . import options as _cli_options
from . import status as _cli_status

__all__ = ["main"]


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("fastcluster-server")
    except importlib.metadata.PackageNotFoundError:  # a source checkout
        return "(not installed)"


def parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `fastcluster` parser and its `run` subparser."""
    # allow_abbrev=False: argparse would take an unknown flag for an
    # abbreviation of a longer one (--reload as --reload-on)
    top = argparse.ArgumentParser(
        prog="fastcluster", allow_abbrev=False, description="Serve an ASGI or WSGI app "
        "with a cluster of worker processes fed by a C dispatcher; show a running "
        "cluster's state.")
    top.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="serve MODULE:APP with N workers", allow_abbrev=False,
        description="Serve an ASGI or WSGI app with N worker processes. Signals to the "
        "primary: INT/TERM graceful stop, QUIT fast stop, HUP rolling restart, "
        "TTIN/TTOU one worker more/fewer.")
    _cli_options.add_arguments(run)
    status = sub.add_parser(
        "status", help="show a running primary's workers and counters",
        allow_abbrev=False,
        description="Per worker: id, pid, state, uptime, connections dispatched, "
        "connections open now, requests served, restarts, RSS.")
    status.add_argument("--socket", metavar="PATH", default=None,
                        help=f"the primary's status socket (${_cli_status.SOCKET_ENV}; "
                        "default: the one running primary found)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", action="store_true", help="refresh like top")
    status.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                        help="seconds between refreshes with --watch [1]")
    status.add_argument("-n", "--iterations", type=_count, default=None, metavar="N",
                        help="with --watch: stop after N refreshes")
    return top, run


def main(argv: Sequence[str] | None = None) -> int:
    top, run_parser = parsers()
    given = list(sys.argv[1:] if argv is None else argv)
    refusal = _cli_foreign.refusal(given[1:]) if given[:1] == ["run"] else None
    if refusal is not None:  # a gunicorn/uvicorn flag from habit: why, and what instead
        print(f"fastcluster run: error: {refusal}", file=sys.stderr)
        return 2
    args = top.parse_args(argv)
    if args.command == "status":
        return _cli_status.main(args.socket, args.json, args.watch, args.interval,
                                args.iterations)
    try:
        settings = _cli_options.resolve(vars(args))
    except _cli_options.OptionError as e:  # a bad value: status 1, as a bad app is
        print(f"fastcluster run: error: {e}", file=sys.stderr)
        return 1
    if settings["app"] is None:
        run_parser.error("the app is missing: give MODULE:APP (or "
                         f"${_cli_options.BY_NAME['app'].env}, or app = \"...\" in the "
                         "config file)")
    from . import run as _cli_run  # imports the cluster: only for `run`

    try:
        return _cli_run.run(settings)
    except KeyboardInterrupt:
        print("fastcluster run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
