"""One end of a control channel (AF_UNIX SOCK_STREAM), non-blocking.

Theory of operation: the socket is always non-blocking. Reads feed a
FrameDecoder; with `accept_fds` they use recvmsg and queue the fds received
(only the worker accepts fds: the primary reads with plain recv, so the
kernel discards any fd a worker tries to pass it). Writes go through a queue
of (bytes, fds) items; flush() sends what the socket takes and says whether
anything is left, so the primary can watch for EPOLLOUT. A worker, which has
no loop of its own, uses send_blocking() (a lock, then flush with select()).
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import select
import socket
import threading
from collections.abc import Iterator

from .frames import MAX_FRAME, Frame, FrameDecoder

READ_SIZE = 256 * 1024
MAX_FDS_PER_READ = 16


class ControlSocket:
    """Framed, buffered, non-blocking control channel end."""

    def __init__(self, sock: socket.socket, *, accept_fds: bool = False,
                 max_frame: int = MAX_FRAME) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.accept_fds = accept_fds
        self.decoder = FrameDecoder(max_frame)
        self.fds: collections.deque[int] = collections.deque()  # received, not yet claimed
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self.out_bytes = 0  # bytes queued and not yet sent
        self.closed = False
        self.eof = False
        self.lock = threading.Lock()  # serialises senders (worker side)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- reading -----------------------------------------------------------

    def read(self, max_reads: int = 16) -> bool:
        """Reads what is available (at most max_reads chunks) into the
        decoder. Returns False once the peer has hung up (EOF or reset)."""
        for _ in range(max_reads):
            try:
                if self.accept_fds:
                    data, fds, flags, _addr = socket.recv_fds(
                        self.sock, READ_SIZE, MAX_FDS_PER_READ, socket.MSG_CMSG_CLOEXEC)
                    self.fds.extend(fds)
                    if flags & socket.MSG_CTRUNC:
                        # more fds than we allow in one read: the rest were
                        # closed by the kernel; the frame claiming them fails.
                        pass
                else:
                    data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self.eof = True
                return False
            if not data:
                self.eof = True
                return False
            self.decoder.feed(data)
            if len(data) < READ_SIZE:
                return True
        return True

    def frames(self) -> Iterator[Frame]:
        return self.decoder.frames()

    def take_fds(self, n: int) -> list[int]:
        """The next n fds received (fewer if they did not arrive)."""
        out: list[int] = []
        while self.fds and len(out) < n:
            out.append(self.fds.popleft())
        return out

    # -- writing -----------------------------------------------------------

    def queue(self, data: bytes, fds: list[int] | None = None) -> None:
        if self.closed:
            raise BrokenPipeError("control channel is closed")
        self._out.append((memoryview(data), list(fds or ())))
        self.out_bytes += len(data)

    def flush(self) -> bool:
        """Sends queued data until the socket would block. True when all of
        it is sent. Raises OSError (EPIPE, ECONNRESET) if the peer is gone."""
        while self._out:
            view, fds = self._out[0]
            try:
                if fds:
                    n = self.sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                return False
            self.out_bytes -= n
            if n == len(view):
                self._out.popleft()
            else:
                self._out[0] = (view[n:], [])  # fds went with the first byte
        return True

    @property
    def pending_output(self) -> bool:
        return bool(self._out)

    def send_blocking(self, data: bytes, fds: list[int] | None = None,
                      timeout: float | None = None) -> None:
        """Queues and sends data, waiting for room (worker side; thread-safe)."""
        with self.lock:
            self.queue(data, fds)
            while not self.flush():
                _r, w, _x = select.select([], [self.sock], [], timeout)
                if not w:
                    raise TimeoutError("control channel: the peer is not reading")

    # -- closing -----------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._out.clear()
        self.out_bytes = 0
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.popleft())
        self.sock.close()
