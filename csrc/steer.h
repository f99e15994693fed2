/* steer: the kernel picks the worker for each new connection, by load.
 *
 * Every worker slot has its own SO_REUSEPORT listening socket on the address
 * (all in one reuseport group); the primary keeps a descriptor of each and
 * the worker in slot i accepts natively on socket i. A reuseport program
 * chooses the socket at SYN time, so no connection hops through the primary.
 *
 * Modes, best first (the caller falls back and says so in its log):
 *
 *  FC_STEER_EBPF   A BPF_PROG_TYPE_SK_REUSEPORT program, expected attach type
 *                  BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, loaded by the raw
 *                  bpf() syscall from instructions assembled here (no
 *                  libbpf, no clang), attached by SO_ATTACH_REUSEPORT_EBPF.
 *                  Two maps: a REUSEPORT_SOCKARRAY (slot -> socket) and an
 *                  ARRAY with BPF_F_MMAPABLE of one page per slot
 *                  (fc_steer_page). The program picks the fewest open,
 *                  chosen - done + bias: an unrolled scan of every slot from
 *                  a random start (ties spread) up to FC_STEER_UNROLL slots,
 *                  beyond that power of two choices over two distinct random
 *                  slots, up to three draws while the best is biased out.
 *                  It adds 1 to the chosen slot's `chosen` atomically. When
 *                  a listening socket closes (migration), the same choice
 *                  moves each queued connection to a live socket; if a
 *                  choice fails (the slot has no socket) the kernel's hash
 *                  picks among the live sockets. Needs CAP_BPF+CAP_NET_ADMIN
 *                  (or root); the verifier's log comes back on refusal.
 *
 *  FC_STEER_CBPF   Classic BPF (SO_ATTACH_REUSEPORT_CBPF, no privilege):
 *                  `ld rand; mod #total;` then jumps over cumulative weights,
 *                  returning a socket's index in the group (listen order).
 *                  fc_steer_tick() recomputes the weights from each slot's
 *                  accept queue (TCP_INFO on the LISTEN socket: tcpi_unacked
 *                  is the queue, tcpi_sacked its limit) and the worker's open
 *                  count (accepted - done), and re-attaches when they changed.
 *                  fc_steer_timer_fd() + fc_steer_on_timer() run the tick
 *                  from a timerfd in the dispatcher's epoll loop, in C.
 *
 *  FC_STEER_PLAIN  No program: the kernel's hash over the group.
 *
 * Counters (fc_steer_page, one page per slot, at slot * fc_steer_page_size()
 * of fc_steer_pages_fd(): the BPF map in eBPF mode, a memfd otherwise). A worker
 * maps only its own page (fc_steer_page_map) and closes the fd before user
 * code runs: it may skew its own figures, never a sibling's or the
 * primary's (an unprivileged process cannot get a closed map fd back:
 * BPF_MAP_GET_FD_BY_ID needs CAP_SYS_ADMIN). Whatever a worker writes is
 * clamped by the program and by the tick: at worst it draws traffic to
 * itself or sends it away.
 *
 * Group order (cBPF). The kernel indexes the group in listen order; when a
 * socket is really closed the last one takes its place. fc_steer_add_socket
 * must be called right after each listen(), and fc_steer_remove_socket
 * right before the caller's close() that really closes the socket (no other
 * process holds it).
 *
 * Ownership: sockets stay the caller's. The steer owns its map, program,
 * memfd and timer fds, all close-on-exec. fc_steer_free touches only this
 * process's fds and mappings (the kernel's program, maps and group stay
 * while another process holds them), so a forked worker calls it to drop
 * the primary's view before user code runs.
 */
#ifndef FC_STEER_H
#define FC_STEER_H

#include <stddef.h>
#include <stdint.h>

typedef struct fc_steer fc_steer;

enum fc_steer_mode {
    FC_STEER_PLAIN = 0,  /* SO_REUSEPORT hash, no program */
    FC_STEER_EBPF = 1,   /* SK_REUSEPORT eBPF program, load-aware per SYN */
    FC_STEER_CBPF = 2,   /* classic BPF weights, refreshed by fc_steer_tick */
};

#define FC_STEER_MAX_SLOTS 1024
#define FC_STEER_UNROLL 16       /* slots scanned in full; p2c beyond */
/* Added to a slot's load to keep the program off it (dead, draining, hung).
 * Loads are clamped below 2^40, so a biased slot loses to every unbiased
 * one; among biased slots the least loaded still wins. */
#define FC_STEER_BIAS_OUT (UINT64_C(1) << 40)
/* A slot without a socket: loses even to biased-out slots. */
#define FC_STEER_BIAS_EMPTY ((UINT64_C(1) << 41) - 1)
#define FC_STEER_CBPF_SCALE 65536 /* a slot's cBPF weight at load 0 */

/* The start of one slot's page. Fields are 64-bit, naturally aligned, read
 * and written with atomics; the rest of the page is unused. */
typedef struct fc_steer_page {
    uint64_t chosen;    /* eBPF: connections steered here (the program) */
    uint64_t done;      /* connections the worker finished (the worker) */
    uint64_t bias;      /* added to the load (the primary) */
    uint64_t accepted;  /* connections the worker accepted (the worker) */
} fc_steer_page;

typedef struct fc_steer_info {
    uint64_t chosen, done, bias, accepted;
    int32_t queued;     /* accept queue now (tcpi_unacked), -1: no socket */
    int32_t qlimit;     /* its limit (tcpi_sacked) */
    uint32_t weight;    /* cBPF weight last attached */
    int32_t index;      /* cBPF: the socket's index in the group, -1: none */
} fc_steer_info;

typedef struct fc_steer_stats {
    uint64_t ticks;     /* cBPF weight recomputations */
    uint64_t attaches;  /* cBPF programs attached */
    uint64_t errors;    /* failed attaches or TCP_INFO reads */
} fc_steer_stats;

/* Creates a steer over nslots slots (1..FC_STEER_MAX_SLOTS) in mode. For
 * FC_STEER_EBPF, creates the maps and loads the program. On failure returns
 * -errno, *call names the call that failed and, if the verifier refused,
 * log[0..logsz) holds its log (else log[0] = 0). Every slot starts empty
 * (FC_STEER_BIAS_EMPTY). */
int fc_steer_new(fc_steer **out, int nslots, int mode, const char **call,
                 char *log, size_t logsz);
/* The same, over share's counters pages (same mode and nslots): a primary
 * with several addresses steers them all by each worker's total load, and a
 * worker maps one page. The pages' biases are left as they are. */
int fc_steer_new_shared(fc_steer **out, const fc_steer *share, const char **call,
                        char *log, size_t logsz);
void fc_steer_free(fc_steer *s);
int fc_steer_mode(const fc_steer *s);
int fc_steer_nslots(const fc_steer *s);

/* The fd whose page at slot * fc_steer_page_size() is slot's counters (the
 * steer's own fd). The page size is the system's (the map's value size). */
int fc_steer_pages_fd(const fc_steer *s);
size_t fc_steer_page_size(void);

/* The name of the call that last failed ("bpf(BPF_PROG_LOAD)", ...). */
const char *fc_steer_last_call(const fc_steer *s);

/* Socket fd (listening, SO_REUSEPORT, the caller's) serves slot: put in the
 * sockarray and the program attached (eBPF), or appended to the group order
 * (cBPF; a failed attach there is counted in stats.errors and retried by
 * the next tick). A slot still FC_STEER_BIAS_EMPTY gets bias 0. -EBUSY if
 * the slot has one already. */
int fc_steer_add_socket(fc_steer *s, int slot, int fd);
/* The slot's socket is about to be closed for good: out of the sockarray,
 * out of the group order (the last socket takes its index). The bias stays
 * (the caller biased the slot out before draining it). */
int fc_steer_remove_socket(fc_steer *s, int slot);

int fc_steer_set_bias(fc_steer *s, int slot, uint64_t bias);

/* For a replacement worker: the connections the old worker had accepted
 * died with it, so the slot's open count becomes what is queued now:
 * done = chosen - queued (eBPF) and accepted = done. queued < 0: this
 * steer's socket's queue (give the sum over the addresses that share the
 * pages). Returns queued. */
int fc_steer_reconcile(fc_steer *s, int slot, int queued);

int fc_steer_info_get(const fc_steer *s, int slot, fc_steer_info *out);
void fc_steer_stats_get(const fc_steer *s, fc_steer_stats *out);

/* cBPF: recompute the weights and re-attach if they changed. Returns 1 if
 * it attached, 0 if nothing changed, -errno. Other modes: 0. */
int fc_steer_tick(fc_steer *s);

/* A periodic timerfd (period_us 100..1000000) for fc_steer_on_timer; made
 * once, re-armed on later calls. Returns the fd (the steer's) or -errno. */
int fc_steer_timer_fd(fc_steer *s, int period_us);
/* The timer's handler (fc_hook_fn of dispatch.h; arg is the fc_steer). */
void fc_steer_on_timer(void *arg, uint32_t events);

/* Worker side: maps slot's page of fd read-write (only that page). */
int fc_steer_page_map(int fd, int slot, fc_steer_page **out);
void fc_steer_page_unmap(fc_steer_page *page);
void fc_steer_page_add(uint64_t *field, uint64_t n);
uint64_t fc_steer_page_load(const uint64_t *field);

/* Loads insns (n of them, struct bpf_insn) as an SK_REUSEPORT program; the
 * verifier's log goes to log. Returns the program fd or -errno. Exposed for
 * the test of a refusal. */
int fc_steer_load_prog(const void *insns, int n, char *log, size_t logsz);

#endif
