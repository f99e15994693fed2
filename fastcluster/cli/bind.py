"""The addresses `fastcluster run` serves: --bind (repeatable), --host/--port,
--uds and --fd, checked (and Unix sockets bound) in the primary before any fork.

Theory of operation: every address is served by every worker (gunicorn's
repeated --bind). A TCP address is bound once here and let go, for a clear
error before forking; the primary's registry binds it for real when the
first worker listens (so each policy keeps its own kind of socket). A Unix
socket is bound here, given its mode (0666 as uvicorn's, or 0777 & ~umask
with --umask, as gunicorn's) and listened on, and handed to the primary as
an adopted socket, as is the --fd one: the registry gives it to the workers
that listen on its address instead of binding one. The Unix socket files
bound here are unlinked when the primary stops (if still ours).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import stat
from typing import Any

from .options import parse_bind

DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_UNIX_MODE = 0o666  # uvicorn's: a proxy running as another user can connect


class BindError(Exception):
    """An address cannot be served; the message names it and why."""


@dataclasses.dataclass
class Bindings:
    addresses: list[Any]  # what each worker listens on (parse_bind's forms)
    sockets: list[socket.socket]  # bound here, for the primary to adopt
    paths: list[tuple[str, tuple[int, int]]]  # Unix socket files made here: (path, inode)

    def close(self) -> None:
        """Unlinks the Unix socket files made here that are still ours."""
        for path, inode in self.paths:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == inode:
                    os.unlink(path)


def texts(settings: dict[str, Any]) -> list[str]:
    """The addresses asked for, as --bind texts (without --fd's)."""
    out = list(settings["bind"])
    if settings["host"] or settings["port"] is not None:
        host = settings["host"] or "127.0.0.1"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        out.append(f"{host}:{8000 if settings['port'] is None else settings['port']}")
    if settings["uds"]:
        out.append("unix:" + settings["uds"])
    if not out and settings["fd"] is None:
        out.append(DEFAULT_BIND)
    return out


def open_bindings(settings: dict[str, Any]) -> Bindings:
    """Checks every address (binding the Unix ones); raises BindError."""
    b = Bindings([], [], [])
    try:
        for text in texts(settings):
            address = parse_bind(text)
            if address in b.addresses:
                raise BindError(f"{text} is given twice (--bind, --host/--port, --uds)")
            if isinstance(address, str):
                _bind_unix(b, address, settings["umask"], settings["backlog"])
            else:
                _check_tcp(address)
            b.addresses.append(address)
        if settings["fd"] is not None:
            _adopt_fd(b, settings["fd"])
    except BaseException:
        for sock in b.sockets:
            sock.close()
        b.close()
        raise
    return b


def _check_tcp(address: tuple[str, int]) -> None:
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        return  # (socket activation: systemd bound it, the primary adopts it)
    try:
        infos = socket.getaddrinfo(address[0], address[1], socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, _t, _p, _c, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as e:
        raise BindError(f"cannot listen on {address[0]}:{address[1]} (--bind): "
                        f"{e.strerror or e}") from None


def _bind_unix(b: Bindings, path: str, umask: int | None, backlog: int) -> None:
    if path.startswith("\0"):
        return  # abstract: no file, no mode; the registry binds it
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BindError(f"cannot listen on unix:{path} (--bind): no directory {parent}")
    mode = DEFAULT_UNIX_MODE if umask is None else 0o777 & ~umask
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bound under a umask that leaves it no wider than `mode`, then given
        # exactly `mode` (the process umask may be narrower)
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        st = os.stat(path)
        b.paths.append((path, (st.st_dev, st.st_ino)))
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on unix:{path} (--bind): {e.strerror or e}") from None
    b.sockets.append(sock)


def _adopt_fd(b: Bindings, fd: int) -> None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise BindError(f"--fd {fd}: not an open socket ({e.strerror or e})") from None
    try:
        if sock.type != socket.SOCK_STREAM or \
                not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise BindError(f"--fd {fd}: not a listening stream socket (listen() it "
                            "before passing it)")
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            if not isinstance(name, str) or not name:
                raise BindError(f"--fd {fd}: a Unix socket without a path name")
            address: Any = name
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            address = (name[0], name[1])
        else:
            raise BindError(f"--fd {fd}: not a TCP or Unix socket (family {sock.family})")
        if address in b.addresses:
            raise BindError(f"--fd {fd}: its address {address!r} is also given by --bind")
        sock.set_inheritable(False)
    except BaseException:
        sock.detach()  # not ours to close on an error
        raise
    b.sockets.append(sock)
    b.addresses.append(address)
