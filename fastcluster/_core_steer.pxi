# The binding of csrc/steer.h, included by _core.pyx (one extension module).
# Theory of operation: Steer is the primary's side (the program, the maps,
# each slot's socket and bias, the cBPF timer hooked into a Dispatcher's
# epoll loop, in C); SteerPage is a worker's side (its own counters page,
# mapped alone, so the fd can be closed before user code runs).

STEER_PLAIN = FC_STEER_PLAIN
STEER_EBPF = FC_STEER_EBPF
STEER_CBPF = FC_STEER_CBPF
STEER_MAX_SLOTS = FC_STEER_MAX_SLOTS
STEER_UNROLL = FC_STEER_UNROLL
STEER_CBPF_SCALE = FC_STEER_CBPF_SCALE
STEER_BIAS_OUT = FC_STEER_BIAS_OUT
STEER_BIAS_EMPTY = FC_STEER_BIAS_EMPTY
STEER_PAGE_SIZE = fc_steer_page_size()

_STEER_MODES = {FC_STEER_PLAIN: "plain", FC_STEER_EBPF: "ebpf", FC_STEER_CBPF: "cbpf"}
DEF STEER_LOG_SIZE = 1 << 20
DEF STEER_LOG_SHOWN = 4000


def _steer_error(int err, str call, bytes log):
    """OSError(err, "call: strerror"), with the verifier's log when it refused:
    the tail (where the reason is) in the message, all of it in .verifier_log."""
    text = log.decode("utf-8", "replace").strip()
    msg = f"{call}: {_os.strerror(err)}"
    if text:
        tail = text
        if len(text) > STEER_LOG_SHOWN:  # the reason is at the end
            tail = "..." + text[len(text) - STEER_LOG_SHOWN:]
        msg += f"; the verifier refused the program:\n{tail}"
    exc = OSError(err, msg)
    exc.verifier_log = text
    return exc


cdef int _slot_arg(int slot, int nslots) except -1:
    if slot < 0 or slot >= nslots:
        raise ValueError(f"slot must be 0 to {nslots - 1}, got {slot}")
    return slot


cdef class Steer:
    """The primary's steer over nslots per-slot sockets (csrc/steer.h)."""
    cdef fc_steer *s
    cdef int _nslots
    cdef Dispatcher hooked
    cdef int hooked_fd

    def __cinit__(self, int nslots, int mode=FC_STEER_EBPF, Steer share=None):
        cdef const char *call = NULL
        cdef char *log
        cdef int r
        cdef fc_steer *shared = NULL
        self.s = NULL
        self.hooked_fd = -1
        if share is not None:
            shared = share.ptr()
            if nslots != share._nslots or mode != fc_steer_mode(shared):
                raise ValueError("share must have the same nslots and mode "
                                 f"({share._nslots}, {fc_steer_mode(shared)}), "
                                 f"got {nslots}, {mode}")
        if nslots < 1 or nslots > FC_STEER_MAX_SLOTS:
            raise ValueError(f"nslots must be 1 to {FC_STEER_MAX_SLOTS}, got {nslots}")
        if mode not in _STEER_MODES:
            raise ValueError(f"mode must be STEER_PLAIN, STEER_EBPF or STEER_CBPF, got {mode!r}")
        self._nslots = nslots
        log = <char *>calloc(1, STEER_LOG_SIZE)  # zeroed: valgrind cannot see the kernel write it
        if log == NULL:
            raise MemoryError()
        try:
            with nogil:
                if shared != NULL:
                    r = fc_steer_new_shared(&self.s, shared, &call, log, STEER_LOG_SIZE)
                else:
                    r = fc_steer_new(&self.s, nslots, mode, &call, log, STEER_LOG_SIZE)
            if r < 0:
                raise _steer_error(-r, call.decode(), bytes(log))
        finally:
            free(log)

    def __dealloc__(self):
        if self.s != NULL:
            fc_steer_free(self.s)
            self.s = NULL

    cdef fc_steer *ptr(self) except NULL:
        if self.s == NULL:
            raise ValueError("the steer is closed")
        return self.s

    cdef int _check(self, int r) except -1:
        if r < 0:
            raise OSError(-r, f"{fc_steer_last_call(self.s).decode()}: {_os.strerror(-r)}")
        return r

    @property
    def mode(self):
        return fc_steer_mode(self.ptr())

    @property
    def mode_name(self):
        return _STEER_MODES[fc_steer_mode(self.ptr())]

    @property
    def nslots(self):
        return self._nslots

    @property
    def pages_fd(self):
        """The counters' fd (the steer's): slot i's page at i * STEER_PAGE_SIZE."""
        return fc_steer_pages_fd(self.ptr())

    def add_socket(self, int slot, fd):
        cdef fc_steer *s = self.ptr()
        self._check(fc_steer_add_socket(s, _slot_arg(slot, self._nslots), _fd_arg(fd, "fd")))

    def remove_socket(self, int slot):
        cdef fc_steer *s = self.ptr()
        self._check(fc_steer_remove_socket(s, _slot_arg(slot, self._nslots)))

    def set_bias(self, int slot, bias):
        cdef fc_steer *s = self.ptr()
        if not isinstance(bias, int) or bias < 0 or bias > FC_STEER_BIAS_EMPTY:
            raise ValueError(f"bias must be an int 0 to STEER_BIAS_EMPTY, got {bias!r}")
        self._check(fc_steer_set_bias(s, _slot_arg(slot, self._nslots), bias))

    def reconcile(self, int slot, queued=None):
        cdef fc_steer *s = self.ptr()
        cdef int q = -1
        if queued is not None:
            if not isinstance(queued, int) or queued < 0 or queued > 0x7fffffff:
                raise ValueError(f"queued must be an int >= 0 or None, got {queued!r}")
            q = queued
        return self._check(fc_steer_reconcile(s, _slot_arg(slot, self._nslots), q))

    def info(self, int slot):
        cdef fc_steer_info i
        cdef fc_steer *s = self.ptr()
        fc_steer_info_get(s, _slot_arg(slot, self._nslots), &i)
        return {"chosen": i.chosen, "done": i.done, "bias": i.bias, "accepted": i.accepted,
                "queued": i.queued, "qlimit": i.qlimit, "weight": i.weight, "index": i.index}

    def stats(self):
        cdef fc_steer_stats st
        fc_steer_stats_get(self.ptr(), &st)
        return {"ticks": st.ticks, "attaches": st.attaches, "errors": st.errors}

    def tick(self):
        cdef fc_steer *s = self.ptr()
        return self._check(fc_steer_tick(s)) == 1

    def start_timer(self, Dispatcher dispatcher not None, int period_us=2000):
        """Runs tick() every period_us from dispatcher's epoll loop, in C."""
        cdef fc_steer *s = self.ptr()
        cdef fc_dispatcher *d = dispatcher.ptr()
        if period_us < 100 or period_us > 1000000:
            raise ValueError(f"period_us must be 100 to 1000000, got {period_us}")
        if self.hooked is not None and self.hooked is not dispatcher:
            raise ValueError("the steer's timer runs in another dispatcher: stop_timer() first")
        fd = self._check(fc_steer_timer_fd(s, period_us))
        _check(fc_dispatcher_hook(d, fd, 0x001, fc_steer_on_timer, <void *>s), "epoll_ctl")
        self.hooked = dispatcher
        self.hooked_fd = fd

    def stop_timer(self):
        if self.hooked is not None:
            if self.hooked.d != NULL:
                fc_dispatcher_unhook(self.hooked.d, self.hooked_fd)
            self.hooked = None
            self.hooked_fd = -1

    def close(self):
        self.stop_timer()
        if self.s != NULL:
            fc_steer_free(self.s)
            self.s = NULL

    def forget(self):
        """In a forked child: drops this process's fds and mappings only (the
        epoll set is shared with the primary: no unhooking)."""
        self.hooked = None
        self.hooked_fd = -1
        if self.s != NULL:
            fc_steer_free(self.s)
            self.s = NULL


cdef class SteerPage:
    """A worker's own counters page, mapped from the steer's pages fd. The fd
    stays the caller's: close it once mapped; the page outlives it."""
    cdef fc_steer_page *page
    cdef int _slot

    def __cinit__(self, fd, int slot):
        self.page = NULL
        if slot < 0 or slot >= FC_STEER_MAX_SLOTS:
            raise ValueError(f"slot must be 0 to {FC_STEER_MAX_SLOTS - 1}, got {slot}")
        self._slot = slot
        _check(fc_steer_page_map(_fd_arg(fd, "fd"), slot, &self.page), "mmap")

    def __dealloc__(self):
        fc_steer_page_unmap(self.page)
        self.page = NULL

    cdef fc_steer_page *ptr(self) except NULL:
        if self.page == NULL:
            raise ValueError("the steer page is closed")
        return self.page

    @property
    def slot(self):
        return self._slot

    def add_accepted(self, uint64_t n=1):
        fc_steer_page_add(&self.ptr().accepted, n)

    def add_done(self, uint64_t n=1):
        fc_steer_page_add(&self.ptr().done, n)

    def read(self):
        cdef fc_steer_page *p = self.ptr()
        return {"chosen": fc_steer_page_load(&p.chosen), "done": fc_steer_page_load(&p.done),
                "bias": fc_steer_page_load(&p.bias),
                "accepted": fc_steer_page_load(&p.accepted)}

    def close(self):
        fc_steer_page_unmap(self.page)
        self.page = NULL


def steer_load_program(insns):
    """Loads raw eBPF instructions (bytes, 8 per instruction) as the steer's
    program type; returns the program fd (the caller's). For the test of a
    verifier refusal, which raises OSError with the log."""
    cdef bytes code = bytes(insns)
    cdef char *log
    cdef int r
    if len(code) == 0 or len(code) % 8:
        raise ValueError(f"insns must be a non-empty multiple of 8 bytes, got {len(code)}")
    log = <char *>calloc(1, STEER_LOG_SIZE)  # zeroed: valgrind cannot see the kernel write it
    if log == NULL:
        raise MemoryError()
    try:
        r = fc_steer_load_prog(<const char *>code, len(code) // 8, log, STEER_LOG_SIZE)
        if r < 0:
            raise _steer_error(-r, "bpf(BPF_PROG_LOAD)", bytes(log))
        return r
    finally:
        free(log)
