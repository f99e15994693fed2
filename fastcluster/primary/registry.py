"""The primary's listening sockets: one per address, shared by its workers.

Theory of operation: a worker's listen request names an address (a numeric
one: the worker resolved any name); the registry resolves it without DNS,
asks the BindGuard whether the primary may bind it for that worker
(primary/bindguard.py: allowed_addresses, privileged ports, Unix paths as the
worker), binds it once (the first request's backlog wins) and
answers every later request for the same address, or for the real address a
port-0 bind got, with the same socket, as Node does. How a worker then gets
connections depends on the policy in force when the address was first bound:

  rr, least   the socket goes to the C dispatcher once (add_listener -> lid);
              each worker is subscribed to the lid and gets accepted fds.
  shared      the listening fd itself goes to the worker with the reply.
  reuseport   the primary binds (and does not listen on) a SO_REUSEPORT
              socket to hold the port; each worker binds its own.
  steer       the primary holds the port the same way and makes one
              listening socket per worker slot (primary/steering.py); the
              reply passes the slot's socket and the counter pages' fd.
              A Unix address, or a socket systemd passed us, falls back to
              the C dispatcher under `least`, said in the log.

Sockets stay open until close_all() (the primary's shutdown), so a worker
started to replace another (rolling restart) finds its address still bound
and no connection is refused in between. A failed bind is not remembered: a
retry binds again. Unix socket paths we created are unlinked at close_all(),
or earlier by release_idle(): once no worker listens on the path and the
primary keeps it for no respawn or rolling restart.

A relative Unix socket path is the worker's: the worker sends it made
absolute against its own cwd. We bind the shorter of that and its form
relative to our cwd (Node's way around sun_path's 108 bytes) and name it by
the absolute path everywhere else (the key, the reply, the unlink).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._core import Dispatcher
from ..wire import address as _address
from . import systemd as _systemd
from .bindguard import BindGuard
from .steering import Steering

log = logging.getLogger("fastcluster")


@dataclass
class Bound:
    sock: socket.socket
    family: int
    mode: str  # "rr" (C dispatcher, rr or least), "shared", "reuseport" or "steer"
    wire: _address.WireAddress  # the real address, JSON form
    lid: int = -1  # the dispatcher's listener id (mode "rr")
    aid: int = -1  # the steering's address id (mode "steer")
    slots: set[int] = field(default_factory=set)  # slots listening on it (rr: subscribed)
    unix_inode: tuple[int, int] | None = None  # (st_dev, st_ino) of a path we created
    guard: BindGuard | None = None  # whose filesystem identity created (and unlinks) it


def _shown(wire: Any) -> str:
    """An address for an error message: host:port, [v6]:port or the path."""
    if isinstance(wire, list) and len(wire) >= 2:
        host = f"[{wire[0]}]" if ":" in str(wire[0]) else str(wire[0])
        return f"{host}:{wire[1]}"
    return repr(wire)


class Registry:
    def __init__(self, dispatcher: Callable[[], Dispatcher], nslots: int = 256,
                 steer_mode: str = "auto") -> None:
        self._dispatcher = dispatcher
        self.steering = Steering(nslots, dispatcher)
        self._steer_mode = steer_mode
        self._by_key: dict[tuple[Any, ...], Bound] = {}
        self._all: list[Bound] = []
        self.inherited: list[socket.socket] = []  # systemd's sockets, adopted by address

    def listen(self, slot: int, wire: Any, backlog: int, policy: str,
               guard: BindGuard | None = None) -> tuple[dict[str, Any], list[int]]:
        """Handles one listen request; returns (reply fields, fds to pass)."""
        guard = guard or BindGuard(None, None, None)
        try:
            family, sockaddr = _address.resolve(wire, numeric=True)
        except socket.gaierror as e:
            return {"t": "listen_err", "errno": e.errno, "gai": True,
                    "strerror": f"{e.strerror}: {_shown(wire)}"}, []
        except (ValueError, TypeError, IndexError) as e:
            return {"t": "listen_err", "errno": errno.EINVAL, "strerror": str(e)}, []
        if family == socket.AF_UNIX and isinstance(sockaddr, str) and \
                not sockaddr.startswith("\0"):
            sockaddr = os.path.abspath(sockaddr)  # a worker sends it absolute already
        key = _address.key_of(family, sockaddr)
        bound = self._by_key.get(key)
        if bound is None:
            refusal = guard.refusal(family, sockaddr)
            if refusal is not None:
                return {"t": "listen_err", "errno": errno.EACCES,
                        "strerror": f"{os.strerror(errno.EACCES)}: {_shown(wire)}: "
                        f"{refusal}"}, []
            try:
                bound = self._bind(family, sockaddr, backlog, policy, guard)
            except OSError as e:
                why = ""
                if e.errno == errno.EACCES and family == socket.AF_UNIX and \
                        guard.other_credentials:
                    why = (f" (bound as the workers' uid {guard.uid} / gid {guard.gid}: they "
                           "need write and search permission on the directory)")
                return {"t": "listen_err", "errno": e.errno or errno.EINVAL,
                        "strerror": f"{e.strerror or e}: {_shown(wire)}{why}"}, []
            self._by_key[key] = bound
            real = bound.wire if family == socket.AF_UNIX else bound.sock.getsockname()
            self._by_key[_address.key_of(family, real)] = bound
            self._all.append(bound)
        reply: dict[str, Any] = {"t": "listen_ok", "mode": bound.mode, "address": bound.wire,
                                 "family": bound.family}
        if bound.mode == "rr":
            if slot in bound.slots:
                return {"t": "listen_err", "errno": errno.EADDRINUSE,
                        "strerror": "this worker already listens on that address"}, []
            try:
                self._dispatcher().subscribe(slot, bound.lid)
            except ProcessLookupError:  # its data channel is gone (fd limit)
                return {"t": "listen_err", "errno": errno.ESRCH,
                        "strerror": "this worker's connection channel is closed (it "
                        "handed it back at its fd limit)"}, []
            bound.slots.add(slot)
            reply["lid"] = bound.lid
            return reply, []
        if bound.mode == "shared":
            bound.slots.add(slot)
            reply["nfds"] = 1
            return reply, [bound.sock.fileno()]
        if bound.mode == "steer":
            try:
                sock = self.steering.socket_for(bound.aid, slot, backlog)
            except OSError as e:
                return {"t": "listen_err", "errno": e.errno or errno.EINVAL,
                        "strerror": f"{e.strerror or e}: {_shown(wire)}"}, []
            fds = [sock.fileno(), *self.steering.pages_fds(slot)]
            reply.update(nfds=len(fds), slot=slot, steer=self.steering.mode_name)
            return reply, fds
        reply["backlog"] = backlog  # reuseport: the worker binds and listens itself
        return reply, []

    def _bind(self, family: int, sockaddr: Any, backlog: int, policy: str,
              guard: BindGuard) -> Bound:
        mode = "rr" if policy in ("rr", "least") else policy
        if mode == "reuseport" and family == socket.AF_UNIX:
            mode = "shared"  # no SO_REUSEPORT for Unix sockets: share the one we bind
        if mode == "steer" and family == socket.AF_UNIX:
            log.info("steer: %s is a Unix socket (no SO_REUSEPORT): served under `least` "
                     "by the primary", _shown(_address.wire_of(family, sockaddr)))
            mode = "rr"  # the dispatcher's policy is `least` under steer
        inherited = _systemd.take(self.inherited, family, sockaddr)
        if inherited is not None:  # bound and listening already (socket activation)
            if mode == "steer":
                # It listens in a reuseport group of its own making (or without
                # SO_REUSEPORT): sockets of ours beside it would share the
                # address with a socket the program does not own.
                log.info("steer: %s came from systemd, listening already: served under "
                         "`least` by the primary (steer needs sockets of its own)",
                         _shown(_address.wire_of(family, inherited.getsockname())))
                mode = "rr"
            mode = "shared" if mode == "reuseport" else mode
            bound = Bound(inherited, family, mode,
                          _address.wire_of(family, inherited.getsockname()))
            if mode == "rr":
                bound.lid = self._dispatcher().add_listener(inherited.fileno())
            return bound
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if mode in ("reuseport", "steer"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            inode = None
            if family == socket.AF_UNIX and isinstance(sockaddr, str) and \
                    not sockaddr.startswith("\0"):
                with guard.as_worker(sockaddr):  # a Unix path: made as the worker would
                    sock.bind(_shorter(sockaddr))
                st = os.stat(sockaddr)
                inode = (st.st_dev, st.st_ino)
                wire: _address.WireAddress = sockaddr  # not getsockname(): maybe relative
            else:
                sock.bind(sockaddr)
                wire = _address.wire_of(family, sock.getsockname())
            if mode not in ("reuseport", "steer"):
                sock.listen(backlog)  # the others hold the port: bound, not listening
            bound = Bound(sock, family, mode, wire, unix_inode=inode, guard=guard)
            if mode == "rr":
                bound.lid = self._dispatcher().add_listener(sock.fileno())
            if mode == "steer":
                bound.aid = self.steering.add_address(family, sock.getsockname(),
                                                      self._steer_mode)
        except BaseException:
            sock.close()
            raise
        return bound

    def unlisten(self, slot: int, lid: int) -> None:
        for bound in self._all:
            if bound.mode == "rr" and bound.lid == lid and slot in bound.slots:
                bound.slots.discard(slot)
                with contextlib.suppress(ProcessLookupError):  # its channel is gone
                    self._dispatcher().unsubscribe(slot, lid)

    def drop_worker(self, slot: int, *, in_dispatcher: bool = True, retire: bool = False
                    ) -> None:
        """The worker in slot takes no more connections (it disconnected or
        died). retire: it exited and nobody refills its slot (steer: its
        sockets close, their queues move to live ones)."""
        if retire:
            self.steering.retire(slot)
        else:
            self.steering.bias_out(slot)
        for bound in self._all:
            if slot in bound.slots:
                bound.slots.discard(slot)
                if in_dispatcher and bound.mode == "rr":
                    with contextlib.suppress(OSError):
                        self._dispatcher().unsubscribe(slot, bound.lid)

    def release_idle(self) -> list[str]:
        """Closes and unlinks each Unix socket path we bound that no worker
        listens on any more (the caller knows none is kept for a respawn or a
        rolling restart). TCP ports stay bound until close_all(). Returns the
        paths released."""
        idle = [b for b in self._all if b.unix_inode is not None and not b.slots]
        for bound in idle:
            self._all.remove(bound)
            for key in [k for k, b in self._by_key.items() if b is bound]:
                del self._by_key[key]
            self._close(bound, unlink=True, dispatcher=True)
        return [str(b.wire) for b in idle]

    def _close(self, bound: Bound, *, unlink: bool, dispatcher: bool) -> None:
        if dispatcher and bound.mode == "rr":
            with contextlib.suppress(OSError, ValueError):
                self._dispatcher().remove_listener(bound.lid)
        if unlink and bound.unix_inode is not None and isinstance(bound.wire, str):
            try:
                with bound.guard.as_worker(bound.wire) if bound.guard else \
                        contextlib.nullcontext():
                    st = os.stat(bound.wire)
                    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == bound.unix_inode:
                        os.unlink(bound.wire)
            except OSError:
                pass
        bound.sock.close()

    def fds(self) -> list[int]:
        return [b.sock.fileno() for b in self._all] + self.steering.fds()

    def close_all(self, *, unlink: bool = True, dispatcher: bool = True) -> None:
        """Closes every socket; with unlink, removes the Unix socket files we
        created; with dispatcher, takes the rr sockets out of the dispatcher."""
        self.steering.close_all(in_child=not dispatcher)  # dispatcher=False: in a child
        for bound in self._all:
            self._close(bound, unlink=unlink, dispatcher=dispatcher)
        self._all.clear()
        for sock in self.inherited:
            sock.close()
        self.inherited.clear()
        self._by_key.clear()


def _shorter(path: str) -> str:
    """The shorter of an absolute path and its form relative to our cwd."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path
