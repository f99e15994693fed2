"""The primary's side of the `steer` policy (csrc/steer.h through _core.Steer).

Theory of operation. For each TCP address bound under `steer` the registry
holds the port with a bound, not listening, SO_REUSEPORT socket (it is no
member of the kernel's reuseport group), and this module makes one
SO_REUSEPORT listening socket per worker slot, when the worker in that slot
first asks to listen there, and keeps it: the worker gets a duplicate with
the listen reply and accepts on it natively. A reuseport program picks the
socket for each new connection by load: eBPF where bpf() is allowed, else
classic BPF weights refreshed every STEER_PERIOD_US by a timer the C
dispatcher runs in its own loop, else (setting steer_mode="plain") the
kernel's hash. Every address shares one set of per-slot counter pages (a
worker's load is its total), made at the first fork under `steer`: a forked
worker maps its own page in the child, before the primary's fds are closed
and before any user code runs; a spawned one (a fresh interpreter) gets the
pages' fd with its listen reply, maps its page and closes the fd there.

A slot's life (bias: what the program adds to a slot's load):

  forked into the slot      reconcile: open := what waits in its queues now
                            (the previous worker's accepted connections died
                            with it); still biased out
  listens                   bias 0: steered to
  disconnecting or hung     bias out at once: new connections go elsewhere
  exited, to be replaced    sockets kept, still biased out: the replacement
                            (the lowest free slot: this one) serves the queue
  exited, not replaced      sockets removed, then closed by us, the last
  (TTOU, rolling, stop)     holder: SELECT_OR_MIGRATE moves what is queued to
                            a live socket (classic BPF cannot: the queue is
                            reset, which the bias keeps small)

Nothing a worker writes in its page can reach the primary's state beyond the
program's choice: the C clamps every figure it reads. Known gap, spawn
only: the pages' fd reaches a spawned worker inside cluster.listen() and is
closed there; a worker already compromised when it listens could keep it and
write a sibling's counters (skewing the balance, nothing more).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core import (
    STEER_BIAS_OUT,
    STEER_CBPF,
    STEER_EBPF,
    STEER_PLAIN,
    Dispatcher,
    Steer,
    SteerPage,
)
from ..wire.listener import reuseport_socket

if TYPE_CHECKING:
    from ..wire.settings import Settings

log = logging.getLogger("fastcluster")

STEER_PERIOD_US = 2000  # classic BPF: weights recomputed this often (in C)
EBPF_CORRECT_US = 10000  # eBPF: open counts set back to queue + accepted - done this often
_ORDER = {"auto": (STEER_EBPF, STEER_CBPF), "ebpf": (STEER_EBPF,), "cbpf": (STEER_CBPF,),
          "plain": (STEER_PLAIN,)}


class Steering:
    """Every steer address of one primary, and the slots' sockets in each."""

    def __init__(self, nslots: int, dispatcher: Callable[[], Dispatcher]) -> None:
        self._nslots = nslots
        self._dispatcher = dispatcher
        self._first: Steer | None = None  # owns the counter pages the others share
        self._steers: dict[int, Steer] = {}  # by address id
        self._socks: dict[int, dict[int, socket.socket]] = {}  # address id -> slot -> socket
        self._where: dict[int, tuple[int, Any]] = {}  # address id -> (family, sockaddr)
        self._next_id = 0
        self.mode_name = ""  # "ebpf", "cbpf" or "plain" once the pages are made
        self._mapped: set[int] = set()  # slots whose worker mapped its page at the fork

    # -- addresses -----------------------------------------------------------

    def add_address(self, family: int, sockaddr: Any, want: str) -> int:
        """A new steer address (already held by the registry): its id."""
        if len(self._steers) == 1:  # a second address: see _make
            only = next(iter(self._steers.values()))
            if only.mode == STEER_EBPF:
                only.stop_timer()
        steer = self._make(want)
        aid = self._next_id
        self._next_id += 1
        self._steers[aid] = steer
        self._socks[aid] = {}
        self._where[aid] = (family, sockaddr)
        return aid

    def _pages(self, want: str) -> Steer:
        """The steer that owns the counter pages (made on first use)."""
        if self._first is None:
            self._first = self._first_steer(want)
            self.mode_name = self._first.mode_name
        return self._first

    def _make(self, want: str) -> Steer:
        first = self._pages(want)
        steer = Steer(self._nslots, first.mode, share=first)
        if steer.mode == STEER_EBPF and not self._steers:
            # the eBPF program's counts drift (csrc/steer.c, ebpf_correct): the
            # only address's steer puts them right every EBPF_CORRECT_US, in C.
            # With several addresses sharing the pages, each would see only
            # its own queues, so the correction is off (the drift stays)
            try:
                steer.start_timer(self._dispatcher(), EBPF_CORRECT_US)
            except OSError as e:
                log.warning("steer: no correction timer (%s): the program's open counts "
                            "may drift", e)
        if steer.mode == STEER_CBPF:
            try:
                steer.start_timer(self._dispatcher(), STEER_PERIOD_US)
            except OSError as e:  # out of dispatcher hooks: weights stay as attached
                log.warning("steer: no weights timer for this address (%s): the classic "
                            "BPF weights are refreshed only when sockets come and go", e)
        return steer

    def _first_steer(self, want: str) -> Steer:
        failure: OSError | None = None
        for mode in _ORDER[want]:
            try:
                steer = Steer(self._nslots, mode)
            except OSError as e:
                if mode == STEER_EBPF and want == "auto":
                    log.warning("steer: the eBPF program is refused (%s); falling back to "
                                "classic BPF weights from each worker's queue and open "
                                "connections", str(e).splitlines()[0])
                failure = e
                continue
            log.info("steer: %s", {STEER_EBPF: "eBPF program, fewest open connections "
                                   "per SYN", STEER_CBPF: "classic BPF weights, refreshed "
                                   f"every {STEER_PERIOD_US / 1000:g} ms",
                                   STEER_PLAIN: "plain SO_REUSEPORT (kernel hash, no "
                                   "load balance)"}[mode])
            return steer
        assert failure is not None
        raise failure

    def pages_fds(self, slot: int) -> list[int]:
        """What a listen reply passes besides the socket: the pages' fd, unless
        the slot's worker mapped its page at the fork."""
        assert self._first is not None
        return [] if slot in self._mapped else [self._first.pages_fd]

    def child_page(self, slot: int) -> SteerPage | None:
        """In the forked child, before the primary's fds close: its own page."""
        if self._first is None or slot not in self._mapped:
            return None
        return SteerPage(self._first.pages_fd, slot)

    def socket_for(self, aid: int, slot: int, backlog: int) -> socket.socket:
        """The slot's listening socket on the address (made on first use); the
        slot is steered to from now on."""
        socks = self._socks[aid]
        sock = socks.get(slot)
        if sock is None:
            family, sockaddr = self._where[aid]
            sock = reuseport_socket(family, sockaddr, backlog)
            try:
                self._steers[aid].add_socket(slot, sock.fileno())  # right after listen()
            except BaseException:
                sock.close()
                raise
            socks[slot] = sock
        self.set_bias(slot, 0)
        return sock

    # -- slots ---------------------------------------------------------------

    def set_bias(self, slot: int, bias: int) -> None:
        if self._first is not None:
            self._first.set_bias(slot, bias)  # the pages are shared: one write for all

    def bias_out(self, slot: int) -> None:
        """Dead, draining or hung: no new connections for the slot."""
        self.set_bias(slot, STEER_BIAS_OUT)

    def starting(self, slot: int, cfg: Settings, forked: bool) -> None:
        """A worker is about to be forked into slot (forked: it maps its page
        in the child): under `steer` the pages exist from now; what the slot's
        queues hold is its load."""
        if cfg.policy == "steer":
            self._pages(cfg.steer_mode)
        self._mapped.discard(slot)
        if self._first is None:
            return
        if forked:
            self._mapped.add(slot)
        queued = sum(max(0, st.info(slot)["queued"]) for st in self._steers.values())
        self._first.reconcile(slot, queued)
        if any(slot in socks for socks in self._socks.values()):
            self.bias_out(slot)  # until it listens

    def retire(self, slot: int) -> None:
        """The slot's worker is gone and not replaced: close its sockets (the
        program moves their queues to live sockets)."""
        self.bias_out(slot)
        for aid, socks in self._socks.items():
            sock = socks.pop(slot, None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    self._steers[aid].remove_socket(slot)
                sock.close()

    def slot_info(self, slot: int) -> dict[str, int] | None:
        """chosen/done/accepted of the slot (all addresses) and what waits in
        its queues now; None if the slot has no steer socket."""
        if self._first is None or not any(slot in s for s in self._socks.values()):
            return None
        info = self._first.info(slot)
        queued = sum(max(0, st.info(slot)["queued"]) for aid, st in self._steers.items()
                     if slot in self._socks[aid])
        opened = info["chosen"] - info["done"] if self._first.mode == STEER_EBPF \
            else queued + max(0, info["accepted"] - info["done"])
        return {"chosen": info["chosen"], "done": info["done"], "open": max(0, opened),
                "queued": queued, "biased": int(info["bias"] >= STEER_BIAS_OUT)}

    # -- ending --------------------------------------------------------------

    def fds(self) -> list[int]:
        return [s.fileno() for socks in self._socks.values() for s in socks.values()]

    def close_all(self, *, in_child: bool = False) -> None:
        """Closes every socket and steer. In a forked child only this
        process's copies go (forget: the epoll set is the primary's)."""
        for aid, socks in self._socks.items():
            for slot, sock in socks.items():
                if not in_child:
                    with contextlib.suppress(OSError, ValueError):
                        self._steers[aid].remove_socket(slot)
                sock.close()
            socks.clear()
        for steer in self._steers.values():
            if in_child:
                steer.forget()
            else:
                steer.close()
        if self._first is not None and self._first not in self._steers.values():
            if in_child:
                self._first.forget()
            else:
                self._first.close()
        self._steers.clear()
        self._socks.clear()
        self._where.clear()
        self._mapped.clear()
        self._first = None
