"""Where the status socket lives by default: a directory only we can enter.

Theory of operation: a status socket in a world-writable place is a target:
another user's file at the predictable path would stop the primary from
starting, and another user's socket could answer `fastcluster status` with
anything. So the default is `$XDG_RUNTIME_DIR` when it is ours and 0700,
else `<tmp>/fastcluster-<uid>`, made 0700 and its owner checked (lstat: a
symlink is not a directory); if another user holds that name, a fresh
directory of our own (mkdtemp, `fastcluster-<uid>-XXXX`). `fastcluster
status` looks in the same places (search_dirs) and still checks each
socket's owner.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile


def private(path: str, uid: int) -> bool:
    """A real directory (no symlink) of uid's that nobody else may enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077


def tmp_dirs(uid: int) -> list[str]:
    """Our directories under the temp dir: fastcluster-<uid>, and those
    mkdtemp made when another user held that name (see private_dir)."""
    base = tempfile.gettempdir()
    names: list[str] = []
    with contextlib.suppress(OSError):
        names = sorted(n for n in os.listdir(base) if n == f"fastcluster-{uid}"
                       or n.startswith(f"fastcluster-{uid}-"))
    return [p for p in (os.path.join(base, n) for n in names) if private(p, uid)]


def private_dir() -> str:
    """The status socket's directory (see above); made if need be."""
    uid = os.geteuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and private(xdg, uid):
        return xdg
    path = os.path.join(tempfile.gettempdir(), f"fastcluster-{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if private(path, uid):
        return path
    return tempfile.mkdtemp(prefix=f"fastcluster-{uid}-")


def search_dirs() -> list[list[str]]:
    """Where `fastcluster status` looks, in order of preference."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return [[xdg] if xdg else [], tmp_dirs(os.geteuid())]


def default_socket_path(pid: int | None = None) -> str:
    return os.path.join(private_dir(), f"fastcluster-{os.getpid() if pid is None else pid}.sock")
