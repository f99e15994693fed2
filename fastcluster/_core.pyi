"""Type stubs for fastcluster._core, the Cython binding of csrc/.

Every OS failure is OSError(errno, "call: strerror"); bad arguments are
ValueError/TypeError naming the argument.
"""

from collections.abc import Sequence

FDPASS_MAX: int  # the most fds one message carries (253)
POLICY_RR: int
POLICY_LEAST: int
EV_WATCH: int  # a watched fd is ready: (EV_WATCH, token, epoll events)
EV_WORKER_GONE: int  # a worker's data channel hung up: (EV_WORKER_GONE, slot, 0)
EPOLLIN: int
EPOLLOUT: int

def send_fds(sock: int, fds: Sequence[int], tags: Sequence[int] | None = None) -> int:
    """Send 1..253 fds (not closed) in one message on a SOCK_SEQPACKET
    socket. Returns len(fds); raises BlockingIOError on backpressure."""

def recv_fds(sock: int, max_fds: int = 253) -> tuple[list[int], list[int]]:
    """Receive one message: (fds, tags), fds close-on-exec and owned by the
    caller. ([], []) when the peer hung up. BlockingIOError when nothing is
    queued; OSError(EMSGSIZE) when the batch exceeded max_fds (every fd that
    arrived was closed)."""

class CounterTable:
    """Per-worker counters in shared memory, one page per slot (csrc/counters.h).
    CounterTable(n) creates the table (the primary: every slot readable);
    CounterTable(n, fd, slot) maps one slot from the memfd renew() gave it
    (a spawned worker; the fd stays the caller's): only that slot is
    reachable, as after confine() in a forked worker."""

    def __init__(self, nslots: int, fd: int = -1, slot: int = -1) -> None: ...
    def renew(self, slot: int) -> int:
        """Primary, before a worker starts in slot: a fresh sealed one-page
        memfd over the slot (zeroed); the caller passes it on and closes it."""
    def confine(self, slot: int) -> None:
        """Forked worker, before any user code: unmap every slot but this one."""
    @property
    def nslots(self) -> int: ...
    def read(self, slot: int) -> dict[str, int]:
        """{"taken", "closed", "requests", "pid", "beat", "timeout_ms"} of one slot."""
    def beat(self, slot: int) -> int:
        """The slot's last heartbeat stamp (time.monotonic_ns(); 0: not beating)."""
    def set_timeout_ms(self, slot: int, ms: int) -> None:
        """The hang timeout applied to the slot's worker, ms (0: off)."""
    def add_closed(self, slot: int, n: int = 1) -> None: ...
    def add_requests(self, slot: int, n: int = 1) -> None: ...
    def set_pid(self, slot: int, pid: int) -> None: ...
    def close(self) -> None: ...

class WorkerChannel:
    """The worker's end of its data channel: batches of accepted fds."""

    def __init__(self, data_fd: int, table: CounterTable, slot: int) -> None:
        """data_fd becomes the channel's (closed by close()); it is made
        non-blocking."""
    def fileno(self) -> int: ...
    @property
    def slot(self) -> int: ...
    def recv(self) -> list[tuple[int, int]] | None:
        """One batch as [(tag, fd), ...], owned by the caller; [] when nothing
        is queued; None when the primary hung up. Counts the fds as taken
        (and wakes the primary when it asked)."""
    def forget(self) -> None:
        """Closes this process's descriptor only (in a child the worker forked)."""
    def connection_closed(self, n: int = 1) -> None:
        """n connections this worker took are finished (for `least`)."""
    def request_done(self, n: int = 1) -> None: ...
    def beat(self, stamp: int) -> None:
        """Stores a heartbeat stamp (time.monotonic_ns(); 0: not beating).
        Works after close(): the slot outlives the channel."""
    @property
    def timeout_ms(self) -> int:
        """The hang timeout the primary applies to this worker, ms (0: off)."""
    def close(self) -> None: ...

class Dispatcher:
    """The primary's C epoll loop (csrc/dispatch.h)."""

    def __init__(
        self,
        table: CounterTable,
        *,
        window: int = 128,
        accept_batch: int = 64,
        policy: int = ...,
    ) -> None: ...
    def fileno(self) -> int: ...
    def set_policy(self, policy: int) -> None: ...
    def set_accepting(self, on: bool) -> None: ...
    def set_stall_ms(self, ms: int) -> None:
        """Skip a worker that has held sent fds, none taken, for ms (0: never)."""
    def set_orphan_limits(self, max_orphans: int, timeout_ms: int) -> int:
        """Orphans (fds of a gone worker) kept at most (-1: no bound), the
        oldest reset; each at most timeout_ms (0: forever). Returns how many
        were reset now."""
    def add_listener(self, fd: int) -> int:
        """Returns the listener id (the tag its fds carry). fd stays the caller's."""
    def remove_listener(self, lid: int) -> None: ...
    def add_worker(self, slot: int, data_fd: int, peer_fd: int | None = None) -> None:
        """data_fd (the primary's end) becomes the dispatcher's. Zeroes the
        slot's counters: call before the worker starts. peer_fd (the
        worker's end) stays the caller's; the dispatcher holds a duplicate,
        closes its copies once sent and reads the queue back when the worker
        goes (remove_worker)."""
    def set_window(self, slot: int, window: int) -> None:
        """At most window fds in flight to the worker in slot (capped by the
        dispatcher's window; add_worker resets it)."""
    def subscribe(self, slot: int, lid: int) -> None: ...
    def unsubscribe(self, slot: int, lid: int) -> None: ...
    def remove_worker(self, slot: int) -> int:
        """The worker is gone: its untaken fds go to others. Returns how many."""
    def watch(self, fd: int, token: int, events: int = ...) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def run(self, timeout: float | None = None) -> list[tuple[int, int, int]]:
        """Serve connections in C (GIL released) until an event for Python is
        ready or timeout seconds pass (None: no limit). Returns events as
        (kind, id, epoll events); [] on timeout or a signal (whose Python
        handlers have then run)."""
    def stats(self) -> dict[str, int]: ...
    def slot_stats(self, slot: int) -> dict[str, int]: ...
    def close(self) -> None: ...

# ---- steer (csrc/steer.h) ----

STEER_PLAIN: int  # no program: the kernel's SO_REUSEPORT hash
STEER_EBPF: int  # SK_REUSEPORT eBPF program: fewest open per SYN
STEER_CBPF: int  # classic BPF weights, refreshed by tick()
STEER_MAX_SLOTS: int
STEER_UNROLL: int  # slots scanned in full by the eBPF program; p2c beyond
STEER_CBPF_SCALE: int  # a cBPF weight at load 0 (weight = SCALE / (1 + load)^2)
STEER_BIAS_OUT: int  # bias that keeps a slot out (dead, draining, hung)
STEER_BIAS_EMPTY: int  # bias of a slot with no socket
STEER_PAGE_SIZE: int  # bytes per slot in the pages fd

class Steer:
    """The primary's side of `steer`: one SO_REUSEPORT socket per slot, a
    program choosing among them by load. Steer(nslots, mode) raises OSError
    naming the failed call; a verifier refusal carries the log in the
    message's tail and in full as .verifier_log."""

    def __init__(self, nslots: int, mode: int = ..., share: Steer | None = None) -> None:
        """share: steer over share's counter pages (several addresses, one
        load per worker); nslots and mode must be share's."""
    @property
    def mode(self) -> int: ...
    @property
    def mode_name(self) -> str:
        """"ebpf", "cbpf" or "plain"."""
    @property
    def nslots(self) -> int: ...
    @property
    def pages_fd(self) -> int:
        """The counters' fd (the steer's): slot i's page at i * STEER_PAGE_SIZE."""
    def add_socket(self, slot: int, fd: int) -> None:
        """fd (listening, SO_REUSEPORT, the caller's) serves slot; call right
        after listen(), in listen order. A slot still STEER_BIAS_EMPTY gets 0."""
    def remove_socket(self, slot: int) -> None:
        """Call right before the close() that really closes the slot's socket.
        The bias stays as the caller set it."""
    def set_bias(self, slot: int, bias: int) -> None: ...
    def reconcile(self, slot: int, queued: int | None = None) -> int:
        """For a replacement worker: open := queued (None: this steer's
        socket's queue; give the sum over steers sharing pages). Returns it."""
    def info(self, slot: int) -> dict[str, int]:
        """{"chosen", "done", "bias", "accepted", "queued", "qlimit", "weight",
        "index"}; queued/qlimit -1 without a socket."""
    def stats(self) -> dict[str, int]:
        """{"ticks", "attaches", "errors"} of the cBPF weights."""
    def tick(self) -> bool:
        """cBPF: recompute the weights; True if a new program was attached."""
    def start_timer(self, dispatcher: Dispatcher, period_us: int = 2000) -> None:
        """tick() every period_us inside dispatcher's epoll loop, in C."""
    def stop_timer(self) -> None: ...
    def close(self) -> None: ...
    def forget(self) -> None:
        """In a forked child: drops this process's fds and mappings only."""

class SteerPage:
    """A worker's own counters page (only that page is mapped). fd stays the
    caller's: close it once mapped."""

    def __init__(self, fd: int, slot: int) -> None: ...
    @property
    def slot(self) -> int: ...
    def add_accepted(self, n: int = 1) -> None: ...
    def add_done(self, n: int = 1) -> None: ...
    def read(self) -> dict[str, int]:
        """{"chosen", "done", "bias", "accepted"}."""
    def close(self) -> None: ...

def steer_load_program(insns: bytes) -> int:
    """Loads raw eBPF instructions as the steer's program type (the test of
    a verifier refusal); returns the program fd, the caller's."""
