"""The steer's C core (csrc/steer.h) through _core: real SO_REUSEPORT groups
on loopback, real clients, the kernel's own choice read back from each
socket's accept queue (TCP_INFO).

Nothing here accepts unless a test says so: every connection a client opens
waits in the accept queue of the socket the program chose, so the queue
depths are the program's decisions.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from fastcluster import _core

EBPF, CBPF, PLAIN = _core.STEER_EBPF, _core.STEER_CBPF, _core.STEER_PLAIN
SCALE = _core.STEER_CBPF_SCALE


def _ebpf_refusal() -> str | None:
    try:
        _core.Steer(1, EBPF).close()
    except PermissionError as exc:
        return f"bpf() refused here (not root / no CAP_BPF+CAP_NET_ADMIN): {exc}"
    return None


needs_bpf = pytest.mark.skipif(_ebpf_refusal() is not None, reason=str(_ebpf_refusal()))


class Group:
    """n SO_REUSEPORT listening sockets on one loopback port, in listen order."""

    def __init__(self, stack: ExitStack, n: int, family: int = socket.AF_INET) -> None:
        self.host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.family = family
        self.socks: list[socket.socket | None] = []
        self.clients: list[socket.socket] = []
        port = 0
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((self.host, port))
            port = s.getsockname()[1]
            s.listen(128)
            self.socks.append(s)
        self.port = port
        stack.callback(self.close)

    def fd(self, i: int) -> int:
        s = self.socks[i]
        assert s is not None
        return s.fileno()

    def close_socket(self, i: int) -> None:
        s = self.socks[i]
        assert s is not None
        s.close()
        self.socks[i] = None

    def connect(self, n: int) -> None:
        for _ in range(n):
            self.clients.append(socket.create_connection((self.host, self.port), timeout=5))

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for s in self.socks:
            if s is not None:
                s.close()


def queues(steer: _core.Steer, expect_total: int) -> list[int]:
    """Each slot's accept queue once all expect_total connections are queued
    (the client's final ACK may be processed a moment after connect returns)."""
    deadline = time.monotonic() + 3
    while True:
        q = [max(steer.info(i)["queued"], 0) for i in range(steer.nslots)]
        if sum(q) >= expect_total or time.monotonic() > deadline:
            return q
        time.sleep(0.005)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def make(stack: ExitStack, n: int, mode: int, family: int = socket.AF_INET
         ) -> tuple[_core.Steer, Group]:
    g = Group(stack, n, family)
    steer = _core.Steer(n, mode)
    stack.callback(steer.close)
    for i in range(n):
        steer.add_socket(i, g.fd(i))
    return steer, g


# ---- eBPF ----------------------------------------------------------------

@needs_bpf
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_ebpf_spreads_queued_connections_exactly(stack: ExitStack, family: int) -> None:
    steer, g = make(stack, 3, EBPF, family)
    assert steer.mode_name == "ebpf"
    g.connect(30)
    assert queues(steer, 30) == [10, 10, 10]  # fewest open wins, every time
    assert [steer.info(i)["chosen"] for i in range(3)] == [10, 10, 10]


@needs_bpf
def test_ebpf_chooses_among_the_slots_in_use_not_the_capacity(stack: ExitStack) -> None:
    # a primary's steer has room for 256 slots; two are in use
    g = Group(stack, 2)
    steer = _core.Steer(256, EBPF)
    stack.callback(steer.close)
    for i in range(2):
        steer.add_socket(i, g.fd(i))
    g.connect(10)
    assert queues(steer, 10)[:2] == [5, 5]


@needs_bpf
def test_ebpf_sends_new_connections_to_the_slot_with_fewer_open(stack: ExitStack) -> None:
    steer, g = make(stack, 2, EBPF)
    g.connect(10)
    assert queues(steer, 10) == [5, 5]
    # the worker of slot 1 serves its five and says so on its own page
    page = _core.SteerPage(steer.pages_fd, 1)
    stack.callback(page.close)
    sock1 = g.socks[1]
    assert sock1 is not None
    for _ in range(5):
        sock1.accept()[0].close()
    page.add_accepted(5)
    page.add_done(5)
    g.connect(5)
    assert queues(steer, 10) == [5, 5]  # all five new ones went to slot 1
    assert steer.info(1)["chosen"] == 10 and steer.info(0)["chosen"] == 5


@needs_bpf
def test_ebpf_bias_keeps_connections_off_a_slot(stack: ExitStack) -> None:
    steer, g = make(stack, 3, EBPF)
    steer.set_bias(1, _core.STEER_BIAS_OUT)
    g.connect(20)
    assert queues(steer, 20) == [10, 0, 10]
    steer.set_bias(1, 0)  # back in: it is the least loaded now
    g.connect(10)
    assert queues(steer, 30) == [10, 10, 10]


@needs_bpf
def test_ebpf_beyond_the_unrolled_scan_p2c_avoids_biased_slots(stack: ExitStack) -> None:
    n = _core.STEER_UNROLL + 4
    steer, g = make(stack, n, EBPF)
    steer.set_bias(0, _core.STEER_BIAS_OUT)
    steer.set_bias(1, _core.STEER_BIAS_OUT)
    g.connect(90)
    q = queues(steer, 90)
    assert q[0] == q[1] == 0, q
    assert sum(q) == 90 and max(q) <= 9, q  # 5 each on average; p2c keeps the tail short


@needs_bpf
def test_ebpf_closing_a_socket_migrates_its_queue(stack: ExitStack) -> None:
    steer, g = make(stack, 2, EBPF)
    steer.set_bias(1, _core.STEER_BIAS_OUT)
    g.connect(8)
    assert queues(steer, 8) == [8, 0]
    steer.set_bias(0, _core.STEER_BIAS_OUT)  # draining, then closed
    steer.set_bias(1, 0)
    steer.remove_socket(0)
    g.close_socket(0)
    assert queues(steer, 8)[1] == 8  # SELECT_OR_MIGRATE moved them, none reset
    sock1 = g.socks[1]
    assert sock1 is not None
    for client in g.clients:
        client.sendall(b"x")
    for _ in range(8):
        conn, _addr = sock1.accept()
        with conn:
            assert conn.recv(1) == b"x"
            conn.sendall(b"y")
    assert all(client.recv(1) == b"y" for client in g.clients)


@pytest.mark.skipif(open("/proc/sys/net/ipv4/tcp_migrate_req").read().strip() != "0",
                    reason="tcp_migrate_req is set here: the kernel migrates without the program")
def test_plain_closing_a_socket_resets_its_queue(stack: ExitStack) -> None:
    # The control for the test above: without SELECT_OR_MIGRATE the queue dies.
    steer, g = make(stack, 2, PLAIN)
    g.connect(16)
    q = queues(steer, 16)
    assert q[0] > 0, q  # the hash put some on socket 0 (16 connections: 2^-16 it would not)
    steer.remove_socket(0)
    g.close_socket(0)
    reset = 0
    for client in g.clients:
        try:
            client.sendall(b"x")
            client.settimeout(0.05)
            if client.recv(1) == b"":
                reset += 1
        except (ConnectionResetError, BrokenPipeError):
            reset += 1
        except TimeoutError:
            pass  # queued on socket 1, alive
    assert reset == q[0]


@needs_bpf
def test_reconcile_makes_open_what_is_queued(stack: ExitStack) -> None:
    steer, g = make(stack, 2, EBPF)
    steer.set_bias(1, _core.STEER_BIAS_OUT)
    g.connect(6)
    assert queues(steer, 6) == [6, 0]
    sock0 = g.socks[0]
    assert sock0 is not None
    taken = [sock0.accept()[0] for _ in range(2)]  # the worker took two, then died
    stack.callback(lambda: [t.close() for t in taken])
    assert steer.reconcile(0) == 4
    info = steer.info(0)
    assert info["chosen"] - info["done"] == 4 and info["accepted"] == info["done"]
    steer.set_bias(1, 0)
    g.connect(4)  # slot 0 counts 4 open, slot 1 none: the four go to slot 1
    assert queues(steer, 8) == [4, 4]


@needs_bpf
def test_ebpf_tick_puts_a_drifted_open_count_back(stack: ExitStack) -> None:
    # the program counts every SYN it steers; when more are counted than the
    # worker accepts, chosen - done drifts up and "fewest open" follows the
    # drift. tick() sets open back to queue + accepted - done
    steer, g = make(stack, 2, EBPF)
    steer.set_bias(1, _core.STEER_BIAS_OUT)
    g.connect(3)
    assert queues(steer, 3) == [3, 0]
    sock0 = g.socks[0]
    assert sock0 is not None
    for _ in range(3):  # taken and finished without being counted: a drift of 3
        sock0.accept()[0].close()
    steer.set_bias(1, 0)
    info = steer.info(0)
    assert info["chosen"] - info["done"] == 3  # the program still sees 3 open
    assert steer.tick() == 1  # one slot corrected
    info = steer.info(0)
    assert info["chosen"] - info["done"] == 0
    assert steer.tick() == 0  # nothing to correct now
    g.connect(4)  # both at 0 open: two each (with the drift, all four went to slot 1)
    assert queues(steer, 4) == [2, 2]
    assert steer.tick() == 0  # a queued load is a true one: left as it is


@needs_bpf
def test_worker_page_is_its_own_and_outlives_the_fd(stack: ExitStack) -> None:
    steer = _core.Steer(3, EBPF)
    stack.callback(steer.close)
    fd = os.dup(steer.pages_fd)
    page = _core.SteerPage(fd, 2)
    os.close(fd)  # what a worker does before user code runs
    page.add_done(7)
    page.add_accepted(9)
    assert steer.info(2)["done"] == 7 and steer.info(2)["accepted"] == 9
    assert steer.info(1)["done"] == 0
    assert page.read()["bias"] == _core.STEER_BIAS_EMPTY  # no socket in slot 2 yet
    page.close()
    with pytest.raises(OSError) as exc:  # the map has three pages: no fourth
        _core.SteerPage(steer.pages_fd, 3)
    assert exc.value.errno == errno.EINVAL and "mmap" in str(exc.value)


def test_verifier_refusal_comes_back_with_its_log() -> None:
    if _ebpf_refusal():
        pytest.skip(str(_ebpf_refusal()))
    exit_only = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # exit with r0 never set
    with pytest.raises(OSError) as exc:
        _core.steer_load_program(exit_only)
    assert exc.value.errno in (errno.EACCES, errno.EINVAL)
    assert str(exc.value).startswith(f"[Errno {exc.value.errno}] bpf(BPF_PROG_LOAD): ")
    assert "R0 !read_ok" in str(exc.value)
    assert "R0 !read_ok" in exc.value.verifier_log  # type: ignore[attr-defined]
    # a long log: the message keeps its tail, where the reason is
    mov_r0_0, mov_r0_r2 = bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), bytes([0xbf, 0x20, 0, 0, 0, 0, 0, 0])
    with pytest.raises(OSError) as exc:
        _core.steer_load_program(mov_r0_0 * 600 + mov_r0_r2 + exit_only)
    assert "R2 !read_ok" in str(exc.value) and len(str(exc.value)) < 4200
    assert len(exc.value.verifier_log) > 4000  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="multiple of 8"):
        _core.steer_load_program(b"\x95\0\0")


# ---- cBPF ----------------------------------------------------------------

def test_cbpf_weights_follow_queue_depth_and_open_count(stack: ExitStack) -> None:
    steer, g = make(stack, 3, CBPF)
    assert [steer.info(i)["weight"] for i in range(3)] == [SCALE] * 3
    steer.set_bias(1, _core.STEER_BIAS_OUT)
    steer.set_bias(2, _core.STEER_BIAS_OUT)
    assert steer.tick() is True
    assert [steer.info(i)["weight"] for i in range(3)] == [SCALE, 0, 0]
    g.connect(5)
    assert queues(steer, 5) == [5, 0, 0]  # the classic program obeys the weights
    steer.set_bias(1, 0)
    steer.set_bias(2, 0)
    page1 = _core.SteerPage(steer.pages_fd, 1)
    stack.callback(page1.close)
    page1.add_accepted(3)  # worker 1 has three open connections
    assert steer.tick() is True
    # load 5 queued, 3 open, 0: SCALE / (1 + load)^2
    assert [steer.info(i)["weight"] for i in range(3)] == [SCALE // 36, SCALE // 16, SCALE]
    assert steer.tick() is False  # nothing changed: no re-attach
    assert steer.stats()["attaches"] == 3 + 2  # one per add_socket, then two ticks


def test_cbpf_index_follows_the_group_after_a_close(stack: ExitStack) -> None:
    steer, g = make(stack, 3, CBPF)
    assert [steer.info(i)["index"] for i in range(3)] == [0, 1, 2]
    steer.remove_socket(0)
    g.close_socket(0)  # the kernel moves the last socket (slot 2) to index 0
    assert steer.info(2)["index"] == 0 and steer.info(0)["index"] == -1
    steer.set_bias(1, _core.STEER_BIAS_OUT)
    steer.tick()
    g.connect(6)
    assert queues(steer, 6) == [0, 0, 6]


def test_cbpf_timer_ticks_inside_the_dispatcher_loop(stack: ExitStack) -> None:
    steer, g = make(stack, 2, CBPF)
    table = _core.CounterTable(1)
    stack.callback(table.close)
    d = _core.Dispatcher(table)
    stack.callback(d.close)
    steer.start_timer(d, 1000)
    stack.callback(steer.stop_timer)
    steer.set_bias(0, _core.STEER_BIAS_OUT)  # no tick() from Python after this
    before = steer.stats()["ticks"]
    deadline = time.monotonic() + 3  # ~20 ms here; valgrind is slower
    while steer.stats()["ticks"] - before < 5 and time.monotonic() < deadline:
        assert d.run(timeout=0.02) == []  # the timer is C's business: no event for us
    assert steer.stats()["ticks"] - before >= 5
    assert steer.info(0)["weight"] == 0
    g.connect(8)
    assert queues(steer, 8) == [0, 8]
    with pytest.raises(ValueError, match="period_us"):
        steer.start_timer(d, 10)


# ---- plain and misuse -----------------------------------------------------

def test_plain_mode_has_pages_and_no_program(stack: ExitStack) -> None:
    steer, g = make(stack, 2, PLAIN)
    assert steer.mode_name == "plain" and steer.tick() is False
    g.connect(4)
    assert sum(queues(steer, 4)) == 4
    page = _core.SteerPage(steer.pages_fd, 1)
    page.add_done(2)
    assert steer.info(1)["done"] == 2
    page.close()


def test_bad_arguments_are_named(stack: ExitStack) -> None:
    with pytest.raises(ValueError, match="nslots must be 1 to 1024, got 0"):
        _core.Steer(0, CBPF)
    with pytest.raises(ValueError, match="mode must be"):
        _core.Steer(2, 7)
    steer, g = make(stack, 2, CBPF)
    with pytest.raises(ValueError, match="slot must be 0 to 1, got 2"):
        steer.add_socket(2, g.fd(0))
    with pytest.raises(OSError) as exc:
        steer.add_socket(0, g.fd(0))
    assert exc.value.errno == errno.EBUSY and "fc_steer_add_socket" in str(exc.value)
    with pytest.raises(ValueError, match="bias must be"):
        steer.set_bias(0, -1)
    with pytest.raises(TypeError, match="fd must be an int"):
        steer.add_socket(1, "3")


@needs_bpf
def test_ebpf_refuses_a_socket_that_is_not_listening(stack: ExitStack) -> None:
    steer = _core.Steer(1, EBPF)
    stack.callback(steer.close)
    s = socket.socket()
    stack.callback(s.close)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with pytest.raises(OSError) as exc:
        steer.add_socket(0, s.fileno())
    assert "bpf(BPF_MAP_UPDATE_ELEM)" in str(exc.value)
    assert steer.info(0)["index"] == -1


@needs_bpf
def test_steers_sharing_pages_balance_by_the_worker_total(stack: ExitStack) -> None:
    a, ga = make(stack, 2, EBPF)
    a.set_bias(1, _core.STEER_BIAS_OUT)
    ga.connect(4)  # four open in slot 0 through address A
    assert queues(a, 4) == [4, 0]
    a.set_bias(1, 0)
    gb = Group(stack, 2)
    b = _core.Steer(2, EBPF, share=a)
    stack.callback(b.close)
    for i in range(2):
        b.add_socket(i, gb.fd(i))
    gb.connect(4)  # address B sees slot 0's four: all four go to slot 1
    assert queues(b, 4) == [0, 4]
    assert b.info(0)["chosen"] == 4 and a.reconcile(0, queued=1) == 1
    assert b.info(0)["chosen"] - b.info(0)["done"] == 1
    with pytest.raises(ValueError, match="same nslots and mode"):
        _core.Steer(3, EBPF, share=a)
