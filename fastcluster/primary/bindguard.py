"""What the primary may bind for a worker that asks (a `listen` frame).
The setting's check (allowed_keys) is in wire/address.py.

Theory of operation: the primary may run with more privileges than its
workers (root, workers dropped to `uid`/`gid`). A listen frame is a
worker's request, so the primary binds for it only what its own settings
allow, and never what the worker could not have bound itself:

  allowed_addresses set   only those addresses (the CLI passes its --bind);
                          a request for anything else is EACCES.
  unset, same credentials anything, as before (the worker could bind it).
  unset, other credentials what the worker could bind itself: no TCP port
                          below net.ipv4.ip_unprivileged_port_start.

A Unix socket path, when the workers have other credentials, is bound with
the primary's filesystem identity switched to the worker's (setfsuid,
setfsgid and the worker's groups, for the bind() call only): the kernel
then checks the worker's own write and search permissions along the path
(ACLs included, no check-then-bind race), and the socket file belongs to the
worker's uid and gid, as if the worker had made it (so it can also remove
or chmod it). An explicit allowed_addresses entry does not lift that rule:
give the workers' user a directory (systemd's RuntimeDirectory=).

Hosts travel numeric (the worker resolves names): the primary resolves a
request with AI_NUMERICHOST only, never a DNS lookup in its loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import socket
from collections.abc import Iterator
from typing import Any

from ..wire import address as _address

PORT_START_FILE = "/proc/sys/net/ipv4/ip_unprivileged_port_start"

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def unprivileged_port_start() -> int:
    try:
        with open(PORT_START_FILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024


class BindGuard:
    """The rules above for one set of settings (see Registry.listen)."""

    def __init__(self, allowed: tuple[Any, ...] | None, uid: int | None,
                 gid: int | None) -> None:
        self.allowed = None if allowed is None else frozenset(allowed)
        self.uid = uid if uid is not None and uid != os.geteuid() else None
        self.gid = gid if gid is not None and gid != os.getegid() else None
        if self.uid is not None and self.gid is None:  # drop_privileges' default group
            with contextlib.suppress(KeyError):
                self.gid = pwd.getpwuid(self.uid).pw_gid
        self.other_credentials = self.uid is not None or self.gid is not None

    def refusal(self, family: int, sockaddr: Any) -> str | None:
        """Why the primary must not bind this for a worker, or None."""
        if self.allowed is not None and _address.key_of(family, sockaddr) not in self.allowed:
            return "not in the primary's allowed_addresses (the CLI: --bind)"
        if self.allowed is None and self.other_credentials and family != socket.AF_UNIX:
            start = unprivileged_port_start()
            if 0 < sockaddr[1] < start:
                return (f"port {sockaddr[1]} is privileged (below {start}) and the workers "
                        "run with other credentials; list it in allowed_addresses")
        return None

    @contextlib.contextmanager
    def as_worker(self, path: Any) -> Iterator[None]:
        """Around the bind() of a Unix socket path: the worker's filesystem
        identity, if the workers have other credentials."""
        if not self.other_credentials or not isinstance(path, str) or path.startswith("\0"):
            yield
            return
        groups = os.getgroups()
        uid = os.geteuid() if self.uid is None else self.uid
        gid = os.getegid() if self.gid is None else self.gid
        wgroups = [gid]
        with contextlib.suppress(KeyError, OSError):
            wgroups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
        try:
            if os.geteuid() == 0:
                os.setgroups(wgroups)
            _setfs("setfsgid", gid)
            _setfs("setfsuid", uid)
            yield
        finally:
            _setfs("setfsuid", os.geteuid())
            _setfs("setfsgid", os.getegid())
            if os.geteuid() == 0:
                os.setgroups(groups)


def _setfs(call: str, ident: int) -> None:
    """setfsuid/setfsgid; they return the previous id and cannot fail
    loudly, so the result is checked by asking again (-1 reads it)."""
    if _libc is None:  # pragma: no cover
        raise PermissionError(errno.EPERM, f"{call}: no libc")
    fn = getattr(_libc, call)
    fn(ident)
    if fn(-1) != ident:
        raise PermissionError(errno.EPERM, f"{call}({ident}): {os.strerror(errno.EPERM)}")
