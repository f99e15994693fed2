# cython: language_level=3, boundscheck=False, wraparound=False
"""The Cython binding of csrc/: the only caller of the C core.

Theory of operation: each C call returns >= 0 or -errno; `_check` turns a
negative status into OSError(errno, "call: strerror"), so Python picks the
subclass (BlockingIOError, ConnectionResetError...) by itself. Calls that
block (the dispatcher's epoll loop) release the GIL; none calls back into
Python. Arguments are checked here and named in the errors.
"""

import fcntl as _fcntl
import os as _os
import sys as _sys

if not _sys.platform.startswith("linux"):
    raise ImportError(
        "fastcluster needs Linux (epoll, SOCK_SEQPACKET, memfd); "
        f"this is {_sys.platform!r}"
    )

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from posix.unistd cimport close


cdef extern from "<sys/socket.h>" nogil:
    int shutdown(int fd, int how)
    enum: SHUT_RDWR


FDPASS_MAX = FC_FDPASS_MAX
POLICY_RR = FC_POLICY_RR
POLICY_LEAST = FC_POLICY_LEAST
EV_WATCH = FC_EV_WATCH
EV_WORKER_GONE = FC_EV_WORKER_GONE
EPOLLIN = 0x001
EPOLLOUT = 0x004

DEF MAX_EVENTS = 256


cdef int _check(int status, str call) except -1:
    if status < 0:
        raise OSError(-status, f"{call}: {_os.strerror(-status)}")
    return status


cdef int _fd_arg(object fd, str name) except -1:
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"{name} must be an int file descriptor, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"{name} must be a file descriptor >= 0, got {fd}")
    return fd


def send_fds(sock, fds, tags=None):
    cdef int c_fds[FC_FDPASS_MAX]
    cdef uint32_t c_tags[FC_FDPASS_MAX]
    cdef int n = len(fds), i, r, s = _fd_arg(sock, "sock")
    if n < 1 or n > FC_FDPASS_MAX:
        raise ValueError(f"fds must hold 1 to {FC_FDPASS_MAX} fds, got {n}")
    if tags is not None and len(tags) != n:
        raise ValueError(f"tags must have one tag per fd ({n}), got {len(tags)}")
    for i in range(n):
        c_fds[i] = _fd_arg(fds[i], "fds[%d]" % i)
        c_tags[i] = 0 if tags is None else tags[i]
    with nogil:
        r = fc_send_fds(s, c_fds, c_tags, n)
    return _check(r, "sendmsg")


def recv_fds(sock, int max_fds=FC_FDPASS_MAX):
    cdef int c_fds[FC_FDPASS_MAX]
    cdef uint32_t c_tags[FC_FDPASS_MAX]
    cdef int r, s = _fd_arg(sock, "sock")
    if max_fds < 1 or max_fds > FC_FDPASS_MAX:
        raise ValueError(f"max_fds must be 1 to {FC_FDPASS_MAX}, got {max_fds}")
    with nogil:
        r = fc_recv_fds(s, c_fds, c_tags, max_fds)
    _check(r, "recvmsg")
    return [c_fds[i] for i in range(r)], [c_tags[i] for i in range(r)]


cdef class CounterTable:
    """Per-worker counters in shared memory (csrc/counters.h): one page per
    slot. In the primary every slot is readable; in a worker (after
    confine() or when attached from a slot's memfd) only its own."""
    cdef fc_counters *table   # the region (primary, or a forked worker's view)
    cdef fc_counters *own     # the one slot a worker can reach, else NULL
    cdef int _nslots
    cdef int _only            # that slot, else -1

    def __cinit__(self, int nslots, int fd=-1, int slot=-1):
        self.table = NULL
        self.own = NULL
        self._only = -1
        if nslots < 1 or nslots > 65536:
            raise ValueError(f"nslots must be 1 to 65536, got {nslots}")
        self._nslots = nslots
        if fd < 0:
            _check(fc_counters_create(nslots, &self.table), "mmap")
        else:
            if slot < 0 or slot >= nslots:
                raise ValueError(f"slot must be 0 to {nslots - 1}, got {slot}")
            _check(fc_counters_attach_slot(fd, &self.own), "mmap")
            self._only = slot

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        if self.own != NULL:
            fc_counters_detach(self.own, 1)
        elif self.table != NULL:
            fc_counters_detach(self.table, self._nslots)
        self.own = NULL
        self.table = NULL

    cdef fc_counters *slot_ptr(self, int slot) except NULL:
        if self.table == NULL and self.own == NULL:
            raise ValueError("the counter table is closed")
        if slot < 0 or slot >= self._nslots:
            raise ValueError(f"slot must be 0 to {self._nslots - 1}, got {slot}")
        if self._only >= 0:
            if slot != self._only:
                raise ValueError(f"this worker can reach only its own slot "
                                 f"{self._only}, not {slot}")
            return self.own
        return fc_counters_at(self.table, slot)

    def renew(self, int slot):
        """Primary, before a worker starts in slot: a fresh sealed one-page
        memfd mapped over the slot (zeroed). Returns the memfd, the caller's
        to pass to the worker and close."""
        self.slot_ptr(slot)
        if self._only >= 0:
            raise ValueError("a worker's table cannot renew slots")
        return _check(fc_counters_renew(self.table, self._nslots, slot), "memfd_create")

    def confine(self, int slot):
        """In a forked worker, before any user code: unmaps every slot but
        its own; from then on only that slot can be read or written."""
        cdef fc_counters *own = self.slot_ptr(slot)
        if self._only >= 0:
            return
        _check(fc_counters_confine(self.table, self._nslots, slot), "munmap")
        self.own = own
        self.table = NULL
        self._only = slot

    @property
    def nslots(self):
        return self._nslots

    def read(self, int slot):
        cdef fc_counters *c = self.slot_ptr(slot)
        return {
            "taken": fc_counter_load(&c.taken),
            "closed": fc_counter_load(&c.closed),
            "requests": fc_counter_load(&c.requests),
            "pid": c.pid,
            "beat": fc_counters_get_beat(c),
            "timeout_ms": fc_counters_get_timeout_ms(c),
        }

    def beat(self, int slot):
        """The slot's last heartbeat stamp (monotonic ns; 0: not beating)."""
        return fc_counters_get_beat(self.slot_ptr(slot))

    def set_timeout_ms(self, int slot, ms):
        if ms < 0 or ms > 0xFFFFFFFF:
            raise ValueError(f"ms must be 0 to {0xFFFFFFFF}, got {ms!r}")
        fc_counters_set_timeout_ms(self.slot_ptr(slot), ms)

    def add_closed(self, int slot, int n=1):
        fc_counter_add(&self.slot_ptr(slot).closed, n)

    def add_requests(self, int slot, int n=1):
        fc_counter_add(&self.slot_ptr(slot).requests, n)

    def set_pid(self, int slot, int pid):
        self.slot_ptr(slot).pid = pid

    def close(self):
        self._release()


cdef class WorkerChannel:
    """The worker's end of its data channel."""
    cdef int fd
    cdef int _slot
    cdef CounterTable table
    cdef fc_counters *counters

    def __cinit__(self, data_fd, CounterTable table, int slot):
        self.fd = -1
        self.counters = table.slot_ptr(slot)
        self.table = table
        self._slot = slot
        self.fd = _fd_arg(data_fd, "data_fd")
        _os.set_blocking(self.fd, False)

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    def fileno(self):
        return self.fd

    @property
    def slot(self):
        return self._slot

    def recv(self):
        cdef int c_fds[FC_FDPASS_MAX]
        cdef uint32_t c_tags[FC_FDPASS_MAX]
        cdef int r
        if self.fd < 0:
            raise ValueError("the channel is closed")
        r = fc_intake_recv(self.fd, self.counters, c_fds, c_tags, FC_FDPASS_MAX)
        if r == 0:
            return None
        if r == -EAGAIN:
            return []
        _check(r, "recvmsg")
        return [(c_tags[i], c_fds[i]) for i in range(r)]

    def connection_closed(self, int n=1):
        fc_counter_add(&self.counters.closed, n)

    def request_done(self, int n=1):
        fc_counter_add(&self.counters.requests, n)

    def beat(self, uint64_t stamp):
        fc_counters_set_beat(self.counters, stamp)

    @property
    def timeout_ms(self):
        return fc_counters_get_timeout_ms(self.counters)

    def close(self):
        # shutdown first: the primary may hold our end too (add_worker's
        # peer_fd), and must see this as a hang-up to pass on what is queued.
        if self.fd >= 0:
            shutdown(self.fd, SHUT_RDWR)
            close(self.fd)
            self.fd = -1

    def forget(self):
        """Closes this process's descriptor only (a child the worker forked:
        the channel stays the worker's)."""
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1


cdef class Dispatcher:
    """The primary's C epoll loop (csrc/dispatch.h)."""
    cdef fc_dispatcher *d
    cdef CounterTable table
    cdef fc_event *events

    def __cinit__(self, CounterTable table not None, *, int window=128,
                  int accept_batch=64, int policy=FC_POLICY_RR):
        self.d = NULL
        self.events = NULL
        if window < 1 or window > 65536:
            raise ValueError(f"window must be 1 to 65536, got {window}")
        if accept_batch < 1 or accept_batch > 4096:
            raise ValueError(f"accept_batch must be 1 to 4096, got {accept_batch}")
        if policy not in (FC_POLICY_RR, FC_POLICY_LEAST):
            raise ValueError(f"policy must be POLICY_RR or POLICY_LEAST, got {policy!r}")
        table.slot_ptr(0)
        if table._only >= 0:
            raise ValueError("a worker's counter table cannot drive a dispatcher")
        self.table = table
        self.events = <fc_event *>malloc(sizeof(fc_event) * MAX_EVENTS)
        if self.events == NULL:
            raise MemoryError()
        _check(fc_dispatcher_new(&self.d, table.table, table._nslots, window,
                                 accept_batch, policy), "fc_dispatcher_new")

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        if self.d != NULL:
            fc_dispatcher_free(self.d)
            self.d = NULL
        if self.events != NULL:
            free(self.events)
            self.events = NULL

    cdef fc_dispatcher *ptr(self) except NULL:
        if self.d == NULL:
            raise ValueError("the dispatcher is closed")
        return self.d

    def fileno(self):
        return fc_dispatcher_fd(self.ptr())

    def set_policy(self, int policy):
        _check(fc_dispatcher_set_policy(self.ptr(), policy), "set_policy")

    def set_accepting(self, bint on):
        fc_dispatcher_set_accepting(self.ptr(), on)

    def set_stall_ms(self, int ms):
        if ms < 0 or ms > 3600000:
            raise ValueError(f"stall_ms must be 0 to 3600000, got {ms}")
        _check(fc_dispatcher_set_stall_ms(self.ptr(), ms), "set_stall_ms")

    def set_orphan_limits(self, int max_orphans, int timeout_ms):
        if max_orphans < -1:
            raise ValueError(f"max_orphans must be -1 (no bound) or >= 0, got {max_orphans}")
        if timeout_ms < 0:
            raise ValueError(f"timeout_ms must be >= 0 (0: no expiry), got {timeout_ms}")
        return _check(fc_dispatcher_set_orphan_limits(self.ptr(), max_orphans, timeout_ms),
                      "set_orphan_limits")

    def add_listener(self, fd):
        return _check(fc_dispatcher_add_listener(self.ptr(), _fd_arg(fd, "fd")), "add_listener")

    def remove_listener(self, int lid):
        _check(fc_dispatcher_remove_listener(self.ptr(), lid), "remove_listener")

    def add_worker(self, int slot, data_fd, peer_fd=None):
        """data_fd becomes the dispatcher's. peer_fd (the worker's end) stays
        the caller's: the dispatcher holds a close-on-exec duplicate of it, so
        it closes its copy of each fd once sent and reads back, when the
        worker goes, what the worker never received (csrc/dispatch.h)."""
        cdef int data = _fd_arg(data_fd, "data_fd")
        cdef int peer = -1
        if peer_fd is not None:
            peer = _fd_arg(peer_fd, "peer_fd")
            peer = _fcntl.fcntl(peer, _fcntl.F_DUPFD_CLOEXEC, 0)
        r = fc_dispatcher_add_worker(self.ptr(), slot, data, peer)
        if r < 0 and peer >= 0:
            close(peer)
        _check(r, "add_worker")

    def set_window(self, int slot, int window):
        _check(fc_dispatcher_set_window(self.ptr(), slot, window), "set_window")

    def subscribe(self, int slot, int lid):
        _check(fc_dispatcher_subscribe(self.ptr(), slot, lid), "subscribe")

    def unsubscribe(self, int slot, int lid):
        _check(fc_dispatcher_unsubscribe(self.ptr(), slot, lid), "unsubscribe")

    def remove_worker(self, int slot):
        return _check(fc_dispatcher_remove_worker(self.ptr(), slot), "remove_worker")

    def watch(self, fd, int token, unsigned int events=EPOLLIN):
        _check(fc_dispatcher_watch(self.ptr(), _fd_arg(fd, "fd"), events, token), "epoll_ctl")

    def unwatch(self, fd):
        _check(fc_dispatcher_unwatch(self.ptr(), _fd_arg(fd, "fd")), "epoll_ctl")

    def run(self, timeout=None):
        cdef int ms, r
        cdef fc_dispatcher *d = self.ptr()
        if timeout is None:
            ms = -1
        else:
            if timeout < 0:
                raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
            ms = <int>min(timeout * 1000.0 + 0.999, 2147483647.0)
        with nogil:
            r = fc_dispatcher_run(d, ms, self.events, MAX_EVENTS)
        _check(r, "epoll_wait")
        if r == 0:
            PyErr_CheckSignals()  # run Python's handlers for the signal that woke us
            return []
        return [(self.events[i].kind, self.events[i].id, self.events[i].events)
                for i in range(r)]

    def stats(self):
        cdef fc_stats s
        fc_dispatcher_stats(self.ptr(), &s)
        return {"accepted": s.accepted, "redispatched": s.redispatched, "shed": s.shed,
                "emfile": s.emfile, "pauses": s.pauses, "send_again": s.send_again,
                "orphaned": s.orphaned, "stall_skips": s.stall_skips,
                "orphans_shed": s.orphans_shed, "orphans_expired": s.orphans_expired}

    def slot_stats(self, int slot):
        cdef fc_slot_stats s
        _check(fc_dispatcher_slot_stats(self.ptr(), slot, &s), "slot_stats")
        return {"dispatched": s.dispatched, "held": s.held, "unsent": s.unsent,
                "taken": s.taken, "closed": s.closed, "requests": s.requests}

    def close(self):
        self._release()


include "_core_steer.pxi"
