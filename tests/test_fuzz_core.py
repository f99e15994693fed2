"""Fuzz the fd-batch receiver with hypothesis: any message a peer can send
on the channel is either a well-formed batch or an OSError, and never leaks
an fd into this process."""

from __future__ import annotations

import array
import errno
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from fastcluster import _core

ACCEPTED_ERRORS = {errno.EBADMSG, errno.EMSGSIZE}


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=1200), nfds=st.integers(0, 300),
       max_fds=st.integers(1, 253))
def test_any_message_is_a_batch_or_a_clean_error(payload: bytes, nfds: int, max_fds: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    src = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = open_count()
        anc = []
        if nfds:
            # SCM_MAX_FD is 253: larger blocks are refused by the kernel itself
            fds = array.array("i", [src] * min(nfds, 253))
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
        try:
            a.sendmsg([payload], anc)
        except OSError:
            return
        try:
            got, tags = _core.recv_fds(b.fileno(), max_fds)
        except OSError as e:
            assert e.errno in ACCEPTED_ERRORS, e
            assert open_count() == before
            return
        if not payload and not anc:
            assert (got, tags) == ([], [])  # an empty datagram reads as a hang-up
        else:
            assert 1 <= len(got) <= max_fds
            assert len(payload) == 4 * len(got)
            assert len(tags) == len(got)
        for fd in got:
            os.close(fd)
        assert open_count() == before
    finally:
        os.close(src)
        a.close()
        b.close()
