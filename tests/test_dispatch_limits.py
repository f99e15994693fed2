"""The C core's limits of issue 17, driven from one process (and a forked
child for the counters): the sealed one-page slots, a worker's absurd
counters, the orphan bound and expiry, the stall skip. Run under ASan and
UBSan by .ci/sanitize, with test_dispatch.py.

The worker's end of each channel is read here, in-process, when a test
wants a worker that takes; a worker that does not read is a stopped one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import time

import pytest

from fastcluster import _core

F_GET_SEALS = 1034
SEALS = 0x0002 | 0x0004 | 0x0001  # F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def slot_address(fd: int) -> int:
    """Where this process maps the memfd fd (its slot's page)."""
    ino = os.fstat(fd).st_ino
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == ino and "fastcluster-counters" in line:
                return int(fields[0].split("-")[0], 16)
    raise AssertionError("the slot's page is not mapped")


class Rig:
    """A dispatcher, one listener, workers with held channel ends."""

    def __init__(self, workers: int, window: int = 16, peer: bool = True) -> None:
        self.table = _core.CounterTable(8)
        self.d = _core.Dispatcher(self.table, window=window)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.lid = self.d.add_listener(self.lsock.fileno())
        self.chans: list[_core.WorkerChannel] = []
        self.memfds: list[int] = []
        for slot in range(workers):
            self.memfds.append(self.table.renew(slot))
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.d.add_worker(slot, mine.detach(), theirs.fileno() if peer else None)
            self.d.subscribe(slot, self.lid)
            self.chans.append(_core.WorkerChannel(theirs.detach(), self.table, slot))
        self.clients: list[socket.socket] = []

    def connect(self, n: int) -> list[socket.socket]:
        new = [socket.create_connection(self.lsock.getsockname(), timeout=5) for _ in range(n)]
        self.clients += new
        self.spin()
        return new

    def spin(self, seconds: float = 0.05) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.d.run(0.01)

    def take(self, slot: int) -> list[socket.socket]:
        """The worker in slot takes what is queued for it and answers."""
        got = []
        while batch := self.chans[slot].recv():
            for _tag, fd in batch:
                s = socket.socket(fileno=fd)
                s.sendall(b"%d\n" % slot)
                got.append(s)
        return got

    def close(self) -> None:
        for s in self.clients:
            s.close()
        for c in self.chans:
            c.close()
        self.d.close()
        self.lsock.close()
        for fd in self.memfds:
            os.close(fd)
        self.table.close()


def test_a_slot_is_a_sealed_page_and_a_confined_worker_reaches_only_it() -> None:
    table = _core.CounterTable(4)
    fd = table.renew(2)
    try:
        assert os.fstat(fd).st_size == mmap.PAGESIZE
        assert fcntl.fcntl(fd, F_GET_SEALS) & SEALS == SEALS
        for size in (0, 1 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        pid = os.fork()
        if pid == 0:  # a forked worker: confined to slot 2, it counts there
            code = 1
            try:
                table.confine(2)
                table.add_closed(2, 5)
                try:
                    table.read(1)
                except ValueError as e:
                    code = 0 if "only its own slot 2" in str(e) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert table.read(2)["closed"] == 5  # the primary sees its write
        spawned = _core.CounterTable(4, fd, 2)  # a spawned worker's view: that page only
        spawned.add_requests(2, 7)
        assert table.read(2)["requests"] == 7
        with pytest.raises(ValueError):
            spawned.read(0)
        spawned.close()
        fd2 = table.renew(2)  # the next worker in the slot: a fresh, zeroed page
        os.close(fd2)
        assert table.read(2)["closed"] == 0
    finally:
        os.close(fd)
        table.close()


def test_absurd_taken_never_closes_an_unsent_fd_nor_loops() -> None:
    rig = Rig(workers=1, window=8, peer=False)  # no hold: the primary keeps copies
    try:
        clients = rig.connect(4)
        # the worker claims 2^63 taken before it took anything
        ctypes.c_uint64.from_address(slot_address(rig.memfds[0])).value = 1 << 63
        t0 = time.monotonic()
        rig.spin(0.05)
        more = rig.connect(3)
        assert time.monotonic() - t0 < 1.0
        stats = rig.d.slot_stats(0)
        assert stats["dispatched"] == 7 and stats["held"] == 0
        got = rig.take(0)  # every fd still reaches the worker, open
        assert len(got) == 7
        for c in clients + more:
            assert c.recv(16) == b"0\n"
        for s in got:
            s.close()
    finally:
        rig.close()


def test_orphans_bounded_oldest_reset_first_then_expired() -> None:
    rig = Rig(workers=1)
    before = open_fds()
    try:
        clients = rig.connect(10)
        assert rig.d.slot_stats(0)["dispatched"] == 10
        # the worker dies without taking: its queue comes back, nobody to serve it
        assert rig.d.remove_worker(0) == 10
        assert rig.d.stats()["orphaned"] == 10
        assert rig.d.set_orphan_limits(3, 0) == 7  # the 7 oldest reset now
        for c in clients[:7]:
            with pytest.raises(ConnectionResetError):
                c.recv(16)
        for c in clients[7:]:
            c.setblocking(False)
            with pytest.raises(BlockingIOError):  # still waiting for a worker
                c.recv(16)
        assert rig.d.stats()["orphans_shed"] == 7
        rig.d.set_orphan_limits(-1, 100)
        rig.spin(0.3)  # the loop wakes for the expiry on its own
        stats = rig.d.stats()
        assert stats["orphaned"] == 0 and stats["orphans_expired"] == 3, stats
        for c in clients[7:]:
            c.setblocking(True)
            with pytest.raises(ConnectionResetError):
                c.recv(16)
        for c in rig.clients:
            c.close()
        rig.clients.clear()
        assert open_fds() <= before - 2  # the worker's channel, and no orphan left
        with pytest.raises(ValueError):
            rig.d.set_orphan_limits(-2, 0)
        with pytest.raises(ValueError):
            rig.d.set_orphan_limits(0, -1)
    finally:
        rig.close()


def test_a_full_bound_resets_each_new_orphan_at_once() -> None:
    rig = Rig(workers=1)
    try:
        rig.d.set_orphan_limits(0, 0)
        clients = rig.connect(3)
        rig.d.remove_worker(0)
        assert rig.d.stats()["orphaned"] == 0
        for c in clients:
            with pytest.raises(ConnectionResetError):
                c.recv(16)
    finally:
        rig.close()


def test_a_stalled_worker_is_skipped_until_it_takes() -> None:
    rig = Rig(workers=2)
    rig.d.set_stall_ms(100)
    try:
        rig.connect(4)  # rr: two each
        assert [rig.d.slot_stats(s)["dispatched"] for s in (0, 1)] == [2, 2]
        rig.take(1)  # worker 1 takes; worker 0 sits on its two
        time.sleep(0.15)
        rig.connect(4)
        assert [rig.d.slot_stats(s)["dispatched"] for s in (0, 1)] == [2, 6]
        assert rig.d.stats()["stall_skips"] >= 4
        rig.take(0)
        rig.take(1)
        rig.spin(0.02)  # the ledger sees it took: round robin again
        rig.connect(4)
        assert [rig.d.slot_stats(s)["dispatched"] for s in (0, 1)] == [4, 8]
        with pytest.raises(ValueError):
            rig.d.set_stall_ms(-1)
    finally:
        rig.close()


def test_when_every_worker_is_stalled_the_one_holding_fewest_gets_it() -> None:
    rig = Rig(workers=2)
    rig.d.set_stall_ms(200)
    try:
        rig.connect(4)  # two each
        rig.take(1)  # worker 1 takes its two, worker 0 never takes
        rig.connect(2)  # one each (worker 0 is not stalled yet)
        time.sleep(0.25)  # now both sit on untaken fds: 0 on three, 1 on one
        held = [rig.d.slot_stats(s)["held"] for s in (0, 1)]
        rig.connect(2)
        after = [rig.d.slot_stats(s)["held"] for s in (0, 1)]
        assert held == [3, 1] and after == [3, 3], (held, after)
    finally:
        rig.close()


def test_renew_and_confine_check_their_arguments() -> None:
    table = _core.CounterTable(2)
    try:
        for bad in (-1, 2):
            with pytest.raises(ValueError):
                table.renew(bad)
        os.close(table.renew(0))
        nul = os.open(os.devnull, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as info:
                _core.CounterTable(2, nul, 0)  # not a slot's memfd
            assert info.value.errno == errno.EINVAL
        finally:
            os.close(nul)
    finally:
        table.close()
