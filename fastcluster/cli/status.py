"""`fastcluster status`: ask a primary's status socket, print a table or JSON."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import tempfile
import time
import unicodedata
from typing import Any

from ..primary.rundir import search_dirs

SOCKET_ENV = "FASTCLUSTER_STATUS_SOCKET"
COLUMNS = (("ID", "id", 4), ("PID", "pid", 8), ("STATE", "state", 10), ("UPTIME", "uptime", 8),
           ("DISPATCHED", "dispatched", 11), ("OPEN", "open", 6), ("QUEUED", "queued", 6),
           ("REQUESTS", "requests", 10),
           ("RESTARTS", "restarts", 9), ("RSS", "rss", 8))


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "uptime":
        return _duration(float(value))
    if key == "rss":
        return _size(int(value))
    return str(value)


def render(doc: dict[str, Any]) -> str:
    p = doc["primary"]
    addrs = " ".join(f"unix:{a}" if isinstance(a, str) else f"{a[0]}:{a[1]}"
                     for a in p.get("addresses", [])) or p.get("bind", "-")
    core = p.get("dispatcher") or {}
    head = [
        f"primary {p['pid']}  up {_duration(p['uptime'])}  {p.get('app', '?')} "
        f"({str(p.get('interface', '?')).upper()})  on {addrs}  policy {p['policy']}"
        + ("  STOPPING" if p.get("stopping") else "")
        + ("  NOT READY: " + str(p["health"].get("reason"))
           if p.get("health") and not p["health"].get("ready") else ""),
        f"workers {p['workers']}/{p.get('workers_wanted', '?')}  restarts {p['restarts']}  "
        f"accepted {core.get('accepted', '-')}  rss {_size(p.get('rss'))}",
        "",
        "  ".join(f"{title:>{width}}" if i != 2 else f"{title:<{width}}"
                  for i, (title, _k, width) in enumerate(COLUMNS)),
    ]
    for w in doc["workers"]:
        head.append("  ".join(f"{_cell(key, w.get(key)):>{width}}" if i != 2
                              else f"{_cell(key, w.get(key)):<{width}}"
                              for i, (_t, key, width) in enumerate(COLUMNS)))
    return "\n".join(head)


def _printable(text: str) -> str:
    """text without control or format characters (terminal escapes, bidi
    overrides): a primary's answer is data, not commands for the terminal."""
    return "".join(c if unicodedata.category(c)[0] != "C" else "?" for c in text)


def clean(doc: Any) -> Any:
    """doc with every string (keys too) made printable."""
    if isinstance(doc, str):
        return _printable(doc)
    if isinstance(doc, dict):
        return {clean(k): clean(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [clean(v) for v in doc]
    return doc


def pick_socket(given: str | None) -> str:
    """--socket, else $FASTCLUSTER_STATUS_SOCKET, else the one live primary
    found whose socket belongs to the caller or root (another user's socket
    in our place could answer anything)."""
    path = given or os.environ.get(SOCKET_ENV)
    if path:
        return path
    me = os.geteuid()
    candidates = find_sockets()
    found = [p for p in candidates if socket_owner(p) in (me, 0)]
    if len(found) == 1:
        return found[0]
    if not found and candidates:
        raise LookupError("not trusting " + ", ".join(
            f"{p} (owned by uid {socket_owner(p)})" for p in candidates)
            + f": only sockets of uid {me} or root are read without --socket")
    if not found:
        raise LookupError("no running fastcluster primary found (looked for "
                          "fastcluster-<pid>.sock in $XDG_RUNTIME_DIR and "
                          f"{tempfile.gettempdir()}/fastcluster-{me}); give --socket PATH")
    raise LookupError("several fastcluster primaries are running; give --socket with one of: "
                      + ", ".join(found))


def main(socket_path: str | None, as_json: bool, watch: bool, interval: float,
         iterations: int | None) -> int:
    try:
        path = pick_socket(socket_path)
    except LookupError as e:
        print(f"fastcluster status: {e}", file=sys.stderr)
        return 1
    n = 0
    while True:
        try:
            doc = query(path)
        except (OSError, ValueError) as e:
            print(f"fastcluster status: cannot read {path}: {e}", file=sys.stderr)
            return 1
        out = json.dumps(doc, indent=None if watch else 2) if as_json else render(clean(doc))
        if watch and not as_json and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: like top
        print(out, flush=True)
        n += 1
        if not watch or (iterations is not None and n >= iterations):
            return 0
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0


# -- the client side of the primary's status socket (primary/status.py) --------

def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """The snapshot a primary serves at path. Raises OSError or ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    doc = json.loads(b"".join(chunks))
    if not isinstance(doc, dict) or "workers" not in doc:
        raise ValueError(f"{path}: not a fastcluster status answer")
    return doc


def find_sockets() -> list[str]:
    """Status sockets of live primaries in the default places (primary/rundir.py):
    $XDG_RUNTIME_DIR, else (or if none is there) our directories under the
    temp dir. pick_socket checks who owns each (socket_owner)."""
    for bases in search_dirs():
        found: list[str] = []
        for base in bases:
            with contextlib.suppress(OSError):
                for name in sorted(os.listdir(base)):
                    pid = name[len("fastcluster-"):-len(".sock")]
                    if (name.startswith("fastcluster-") and name.endswith(".sock")
                            and pid.isdigit() and os.path.exists(f"/proc/{pid}")):
                        found.append(os.path.join(base, name))
        if found:
            return found
    return []


def socket_owner(path: str) -> int | None:
    """The uid owning the socket at path (lstat: a symlink is not one)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_uid if stat.S_ISSOCK(st.st_mode) else None
