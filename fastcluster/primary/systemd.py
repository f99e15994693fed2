"""systemd integration: socket activation and readiness notification.

Theory of operation: with `ListenStream=` in a socket unit, systemd opens the
listening sockets and starts us with LISTEN_PID (our pid), LISTEN_FDS (how
many) and LISTEN_FDNAMES; the sockets are fds 3, 4, ... The primary adopts
them as its listeners (matched by address when a worker listens), and unsets
the variables so that workers and their children do not adopt them again.
With `Type=notify`, NOTIFY_SOCKET names a datagram socket to which we send
"READY=1" once workers listen, "RELOADING=1" during a rolling restart and
"STOPPING=1" on shutdown. Both are plain sockets: no libsystemd needed.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ..wire.address import key_of

SD_LISTEN_FDS_START = 3


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed to this process, in order (may be empty)."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    finally:
        if unset:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def notify(state: str) -> bool:
    """Sends state ("READY=1", "STOPPING=1"...) to systemd; False if not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def take(socks: list[socket.socket], family: int, sockaddr: Any) -> socket.socket | None:
    """Removes from socks and returns the one bound to sockaddr, if any."""
    want = key_of(family, sockaddr)
    for i, sock in enumerate(socks):
        try:
            if sock.family == family and key_of(family, sock.getsockname()) == want:
                return socks.pop(i)
        except OSError:
            continue
    return None
