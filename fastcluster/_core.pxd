# C declarations of csrc/, just what _core.pyx uses (uvloop's layout).
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "fdpass.h" nogil:
    enum: FC_FDPASS_MAX
    int fc_send_fds(int sock, const int *fds, const uint32_t *tags, int n)
    int fc_recv_fds(int sock, int *fds, uint32_t *tags, int max)


cdef extern from "counters.h" nogil:
    ctypedef struct fc_counters:
        uint64_t taken
        uint64_t closed
        uint64_t requests
        uint32_t wake
        uint32_t pid
        uint64_t beat
        uint32_t timeout_ms
    fc_counters *fc_counters_at(fc_counters *table, int slot)
    int fc_counters_create(int nslots, fc_counters **table)
    int fc_counters_renew(fc_counters *table, int nslots, int slot)
    int fc_counters_confine(fc_counters *table, int nslots, int slot)
    int fc_counters_attach_slot(int fd, fc_counters **slot)
    void fc_counters_detach(fc_counters *table, int nslots)
    uint64_t fc_counter_load(const uint64_t *c)
    void fc_counter_add(uint64_t *c, uint64_t n)
    int fc_counters_took(fc_counters *slot, uint64_t n)
    void fc_counters_set_beat(fc_counters *slot, uint64_t stamp)
    uint64_t fc_counters_get_beat(const fc_counters *slot)
    void fc_counters_set_timeout_ms(fc_counters *slot, uint32_t ms)
    uint32_t fc_counters_get_timeout_ms(const fc_counters *slot)


cdef extern from "intake.h" nogil:
    int fc_intake_recv(int sock, fc_counters *slot, int *fds, uint32_t *tags, int max)


cdef extern from "dispatch.h" nogil:
    ctypedef struct fc_dispatcher:
        pass
    enum:
        FC_POLICY_RR
        FC_POLICY_LEAST
        FC_EV_WATCH
        FC_EV_WORKER_GONE
    ctypedef struct fc_event:
        int kind
        int id
        uint32_t events
    ctypedef struct fc_stats:
        uint64_t accepted
        uint64_t redispatched
        uint64_t shed
        uint64_t emfile
        uint64_t pauses
        uint64_t send_again
        uint64_t orphaned
        uint64_t stall_skips
        uint64_t orphans_shed
        uint64_t orphans_expired
    ctypedef struct fc_slot_stats:
        uint64_t dispatched
        uint32_t held
        uint32_t unsent
        uint64_t taken
        uint64_t closed
        uint64_t requests
    int fc_dispatcher_new(fc_dispatcher **out, fc_counters *table, int nslots,
                          int window, int accept_batch, int policy)
    void fc_dispatcher_free(fc_dispatcher *d)
    int fc_dispatcher_fd(const fc_dispatcher *d)
    int fc_dispatcher_set_policy(fc_dispatcher *d, int policy)
    void fc_dispatcher_set_accepting(fc_dispatcher *d, int on)
    int fc_dispatcher_set_stall_ms(fc_dispatcher *d, int ms)
    int fc_dispatcher_set_orphan_limits(fc_dispatcher *d, int max_orphans, int timeout_ms)
    int fc_dispatcher_add_listener(fc_dispatcher *d, int fd)
    int fc_dispatcher_remove_listener(fc_dispatcher *d, int lid)
    int fc_dispatcher_add_worker(fc_dispatcher *d, int slot, int data_fd, int peer_fd)
    int fc_dispatcher_set_window(fc_dispatcher *d, int slot, int window)
    int fc_dispatcher_subscribe(fc_dispatcher *d, int slot, int lid)
    int fc_dispatcher_unsubscribe(fc_dispatcher *d, int slot, int lid)
    int fc_dispatcher_remove_worker(fc_dispatcher *d, int slot)
    int fc_dispatcher_watch(fc_dispatcher *d, int fd, uint32_t events, int token)
    int fc_dispatcher_unwatch(fc_dispatcher *d, int fd)
    int fc_dispatcher_run(fc_dispatcher *d, int timeout_ms, fc_event *out, int max)
    void fc_dispatcher_stats(const fc_dispatcher *d, fc_stats *out)
    int fc_dispatcher_slot_stats(const fc_dispatcher *d, int slot, fc_slot_stats *out)
    ctypedef void (*fc_hook_fn)(void *arg, uint32_t events) noexcept nogil
    int fc_dispatcher_hook(fc_dispatcher *d, int fd, uint32_t events, fc_hook_fn fn, void *arg)
    int fc_dispatcher_unhook(fc_dispatcher *d, int fd)


cdef extern from "steer.h" nogil:
    ctypedef struct fc_steer:
        pass
    enum:
        FC_STEER_PLAIN
        FC_STEER_EBPF
        FC_STEER_CBPF
        FC_STEER_MAX_SLOTS
        FC_STEER_UNROLL
        FC_STEER_CBPF_SCALE
    uint64_t FC_STEER_BIAS_OUT
    uint64_t FC_STEER_BIAS_EMPTY
    ctypedef struct fc_steer_page:
        uint64_t chosen
        uint64_t done
        uint64_t bias
        uint64_t accepted
    ctypedef struct fc_steer_info:
        uint64_t chosen
        uint64_t done
        uint64_t bias
        uint64_t accepted
        int queued
        int qlimit
        uint32_t weight
        int index
    ctypedef struct fc_steer_stats:
        uint64_t ticks
        uint64_t attaches
        uint64_t errors
    int fc_steer_new(fc_steer **out, int nslots, int mode, const char **call,
                     char *log, size_t logsz)
    int fc_steer_new_shared(fc_steer **out, const fc_steer *share, const char **call,
                            char *log, size_t logsz)
    void fc_steer_free(fc_steer *s)
    int fc_steer_mode(const fc_steer *s)
    int fc_steer_nslots(const fc_steer *s)
    int fc_steer_pages_fd(const fc_steer *s)
    size_t fc_steer_page_size()
    const char *fc_steer_last_call(const fc_steer *s)
    int fc_steer_add_socket(fc_steer *s, int slot, int fd)
    int fc_steer_remove_socket(fc_steer *s, int slot)
    int fc_steer_set_bias(fc_steer *s, int slot, uint64_t bias)
    int fc_steer_reconcile(fc_steer *s, int slot, int queued)
    int fc_steer_info_get(const fc_steer *s, int slot, fc_steer_info *out)
    void fc_steer_stats_get(const fc_steer *s, fc_steer_stats *out)
    int fc_steer_tick(fc_steer *s)
    int fc_steer_timer_fd(fc_steer *s, int period_us)
    void fc_steer_on_timer(void *arg, uint32_t events)
    int fc_steer_page_map(int fd, int slot, fc_steer_page **out)
    void fc_steer_page_unmap(fc_steer_page *page)
    void fc_steer_page_add(uint64_t *field, uint64_t n)
    uint64_t fc_steer_page_load(const uint64_t *field)
    int fc_steer_load_prog(const void *insns, int n, char *log, size_t logsz)
