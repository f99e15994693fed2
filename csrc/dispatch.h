/* dispatch: the primary's epoll loop. Accepts connections on any number of
 * listening sockets and hands each fd to a worker over its data channel.
 *
 * Everything per connection happens here, without the caller: accept4 until
 * EAGAIN (at most `accept_batch` per listener per wake-up), choose a worker
 * (round robin, or fewest open connections), append to the worker's ledger,
 * and one sendmsg per worker per wake-up. The loop returns to its caller only
 * for the fds the caller asked to watch (signals, control channels, timers),
 * for a worker whose data channel hung up, or when the timeout runs out.
 *
 * Flow control: at most `window` fds in flight per worker. A worker whose
 * window is full is skipped; when every worker of a listener is full, the
 * listener is taken out of the epoll set (connections wait in the kernel's
 * backlog) until a worker's `taken` counter moves, which the worker signals
 * with a one-byte wake message only when asked to (counters.h).
 *
 * Out of fds (EMFILE/ENFILE): one pending connection is accepted on a reserve
 * fd and closed, so its client gets an answer instead of a hang, and the
 * listeners pause for a backoff that doubles up to 1 s. The loop never spins.
 *
 * Ownership: listening sockets stay the caller's. Worker data channels
 * passed to fc_dispatcher_add_worker become the dispatcher's. Accepted fds
 * are the dispatcher's until the worker's counter shows them taken.
 */
#ifndef FC_DISPATCH_H
#define FC_DISPATCH_H

#include <stdint.h>

#include "counters.h"

typedef struct fc_dispatcher fc_dispatcher;

enum fc_policy {
    FC_POLICY_RR = 0,     /* round robin over workers with window room */
    FC_POLICY_LEAST = 1,  /* fewest open connections; ties round robin */
};

enum fc_event_kind {
    FC_EV_WATCH = 1,       /* a watched fd is ready: id = its token */
    FC_EV_WORKER_GONE = 2, /* a data channel hung up: id = the slot, already removed */
};

typedef struct fc_event {
    int kind;          /* enum fc_event_kind */
    int id;            /* token or slot */
    uint32_t events;   /* epoll events for FC_EV_WATCH */
} fc_event;

typedef struct fc_stats {
    uint64_t accepted;      /* connections accepted */
    uint64_t redispatched;  /* fds moved from a gone worker to another */
    uint64_t shed;          /* connections closed by the EMFILE reserve trick */
    uint64_t emfile;        /* EMFILE/ENFILE events */
    uint64_t pauses;        /* times every worker of a listener was full */
    uint64_t send_again;    /* sendmsg backpressure (EAGAIN/ETOOMANYREFS) */
    uint64_t orphaned;      /* fds now waiting with no worker to take them */
    uint64_t stall_skips;   /* choices that passed over a stalled worker */
    uint64_t orphans_shed;  /* orphans reset at the max_orphans bound */
    uint64_t orphans_expired; /* orphans reset after orphan_timeout_ms */
} fc_stats;

typedef struct fc_slot_stats {
    uint64_t dispatched;    /* fds assigned to this slot since it was added */
    uint32_t held;          /* fds whose copy the dispatcher holds */
    uint32_t unsent;        /* of those, still waiting for the channel */
    uint64_t taken;         /* the worker's counters */
    uint64_t closed;
    uint64_t requests;
} fc_slot_stats;

/* Creates a dispatcher over a counter table of nslots slots (counters.h).
 * window: fds in flight per worker (1..65536); accept_batch: accepts per
 * listener per wake-up (1..4096). Returns 0 or -errno. */
int fc_dispatcher_new(fc_dispatcher **out, fc_counters *table, int nslots,
                      int window, int accept_batch, int policy);

/* Closes every fd the dispatcher owns (channels, held copies) and frees it. */
void fc_dispatcher_free(fc_dispatcher *d);

/* The epoll fd, readable while the dispatcher has work: for callers that
 * want to wait in their own loop and call fc_dispatcher_run with timeout 0. */
int fc_dispatcher_fd(const fc_dispatcher *d);

int fc_dispatcher_set_policy(fc_dispatcher *d, int policy);

/* A worker that has had fds sent to it, none taken, for ms milliseconds is
 * skipped (rr and least) while another worker has room, until it takes
 * them: a stopped or hung worker does not hold every other connection.
 * 0 (the default): never skipped. Returns 0 or -EINVAL (ms > 1 hour). */
int fc_dispatcher_set_stall_ms(fc_dispatcher *d, int ms);

/* Bounds the orphans (fds of a gone worker waiting for another): at most
 * max_orphans (-1: no bound, the default; 0: none, each is reset at once),
 * the oldest reset (SO_LINGER 0) to make room for a new one; and each kept
 * at most timeout_ms (0: no expiry). Returns how many were reset now. */
int fc_dispatcher_set_orphan_limits(fc_dispatcher *d, int max_orphans, int timeout_ms);

/* Starts or stops accepting on every listener (graceful shutdown). */
void fc_dispatcher_set_accepting(fc_dispatcher *d, int on);

/* Adds a listening socket (non-blocking is set here). Returns its id. */
int fc_dispatcher_add_listener(fc_dispatcher *d, int fd);

/* Removes a listener; fds waiting for a worker of it are closed. */
int fc_dispatcher_remove_listener(fc_dispatcher *d, int lid);

/* Puts a worker in slot, with its data channel (ownership passes here).
 * Zeroes the slot's counters: call it before the worker starts.
 *
 * peer_fd, if not -1, is a descriptor of the worker's own end of the channel
 * (ownership passes here too). Holding it, the dispatcher closes its copy of
 * each fd as soon as it is sent, and when the worker goes reads back from
 * the worker's end whatever it had not received. Without it, the dispatcher
 * keeps a copy of each fd until the worker's counter shows it taken, and
 * asks the worker for a wake-up to learn that. With a hold, a worker's
 * close() of its end is no hang-up (we hold it too): the worker must
 * shutdown() its end, or the caller remove_worker() when it reaps it. */
int fc_dispatcher_add_worker(fc_dispatcher *d, int slot, int data_fd, int peer_fd);

/* Sets the window of the worker in slot: at most that many fds in flight to
 * it (1..; above the dispatcher's window, the dispatcher's). A worker that
 * can start only a few connections at once (a blocking server), or that has
 * only a few fds free, declares so and never holds more. add_worker resets
 * it to the dispatcher's window. Returns 0, -ESRCH or -EINVAL. */
int fc_dispatcher_set_window(fc_dispatcher *d, int slot, int window);

/* The worker in slot takes (or stops taking) connections of listener lid.
 * Unsubscribing keeps fds already given: the worker still takes them. */
int fc_dispatcher_subscribe(fc_dispatcher *d, int slot, int lid);
int fc_dispatcher_unsubscribe(fc_dispatcher *d, int slot, int lid);

/* The worker in slot is gone (exited, or its channel broke): fds it had not
 * taken go to other workers of the same listener, or wait for one; our
 * copies of the fds it took are closed; its channel is closed. Returns the
 * number of fds passed on, or -errno. Idempotent. */
int fc_dispatcher_remove_worker(fc_dispatcher *d, int slot);

/* Watches fd (not owned) for events (EPOLLIN/EPOLLOUT); ready -> FC_EV_WATCH
 * with token. Watching an fd again changes its events and token. */
int fc_dispatcher_watch(fc_dispatcher *d, int fd, uint32_t events, int token);
int fc_dispatcher_unwatch(fc_dispatcher *d, int fd);

/* Hooks: fd (not owned) ready -> fn(arg, epoll events), called in C inside
 * the loop, which does not return for it (the steer's cBPF timer). At most
 * FC_DISPATCH_MAX_HOOKS; hooking an fd again replaces its fn and arg. */
#define FC_DISPATCH_MAX_HOOKS 8
typedef void (*fc_hook_fn)(void *arg, uint32_t events);
int fc_dispatcher_hook(fc_dispatcher *d, int fd, uint32_t events, fc_hook_fn fn, void *arg);
int fc_dispatcher_unhook(fc_dispatcher *d, int fd);

/* Runs the loop until at least one event is ready for the caller or
 * timeout_ms passes (-1: no timeout; 0: one non-blocking pass). Returns the
 * number of events stored in out[0..max), 0 on timeout or when a signal
 * interrupted the wait (so the caller can run its handlers), or -errno. */
int fc_dispatcher_run(fc_dispatcher *d, int timeout_ms, fc_event *out, int max);

void fc_dispatcher_stats(const fc_dispatcher *d, fc_stats *out);
int fc_dispatcher_slot_stats(const fc_dispatcher *d, int slot, fc_slot_stats *out);

#endif
