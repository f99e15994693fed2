/* dispatch: see dispatch.h for the surface and the theory of operation. */
#define _GNU_SOURCE
#include "dispatch.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fdpass.h"
#include "ledger.h"

/* epoll data: what kind of fd, and its index (listener id, slot or token). */
enum { KIND_LISTENER = 1, KIND_WORKER = 2, KIND_WATCH = 3, KIND_HOOK = 4 };
#define PACK(kind, id) (((uint64_t)(kind) << 32) | (uint32_t)(id))
#define KIND_OF(u64) ((int)((u64) >> 32))
#define ID_OF(u64) ((int)(uint32_t)(u64))

#define MAX_EVENTS 256
#define BACKOFF_FIRST_MS 10
#define BACKOFF_MAX_MS 1000
/* While a listener waits for a worker's wake-up, wake anyway this often: the
 * wake handshake does not lose wake-ups, this only bounds the harm of a bug. */
#define PAUSED_RECHECK_MS 100
/* sendmsg said ETOOMANYREFS: the channel is writable, so EPOLLOUT would spin. */
#define SEND_RETRY_MS 5

typedef struct fc_listener {
    int fd;              /* listening socket (the caller's); -1: free id */
    int polled;          /* EPOLLIN armed */
    int broken;          /* accept failed for good (closed behind our back) */
    int *subs;           /* slots of the workers that take its connections */
    int nsubs, capsubs;
    unsigned rr;         /* round-robin cursor into subs */
    int *orphans;        /* accepted fds waiting for a worker (FIFO) */
    int64_t *orphan_at;  /* ms when each became an orphan (same indices) */
    int orphan_head, norphans, caporphans;
} fc_listener;

typedef struct fc_worker {
    int data_fd;         /* our end of the data channel; -1: free slot */
    int peer_fd;         /* our hold on the worker's end, or -1 (see add_worker) */
    int out_armed;       /* EPOLLOUT armed: the channel was full */
    int waiting;         /* we asked the worker to wake us */
    int dirty;           /* has unsent fds, in d->dirty */
    int window;          /* this worker's window (<= d->window; set_window) */
    uint64_t dispatched;
    fc_ledger ledger;
    uint64_t stall_head; /* ledger head when stall_since was set */
    int64_t stall_since; /* ms: since when sent fds wait untaken (see stalled()) */
} fc_worker;

struct fc_dispatcher {
    int epfd;
    int reserve_fd;      /* /dev/null, given up to accept one connection on EMFILE */
    fc_counters *table;
    int nslots;
    int top;             /* 1 + highest slot ever used: loops stop here */
    int window, accept_batch, policy;
    int accepting;
    fc_worker *workers;  /* nslots */
    fc_listener *listeners;
    int nlisteners;      /* ids in use are < nlisteners */
    int *dirty;          /* slots with unsent fds */
    int ndirty;
    int *gone;           /* slots removed inside the loop, to report */
    int ngone;
    int64_t backoff_until;
    int backoff_ms;
    int send_retry;      /* a flush hit ETOOMANYREFS */
    int stall_ms;        /* a worker sitting on sent fds this long is skipped; 0: never */
    int max_orphans;     /* orphans kept at most (the oldest is reset); -1: no bound */
    int orphan_timeout_ms; /* an orphan older than this is reset; 0: never */
    int64_t orphan_deadline; /* ms when the oldest orphan expires; 0: none */
    int64_t now;         /* ms, this pass of the loop (for stalled()) */
    fc_stats stats;
    struct { int fd; fc_hook_fn fn; void *arg; } hooks[FC_DISPATCH_MAX_HOOKS]; /* fn NULL: free */
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int epoll_set(fc_dispatcher *d, int op, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.u64 = data;
    return epoll_ctl(d->epfd, op, fd, &ev) < 0 ? -errno : 0;
}

static int valid_slot(const fc_dispatcher *d, int slot)
{
    return slot >= 0 && slot < d->nslots && d->workers[slot].data_fd >= 0;
}

static int valid_listener(const fc_dispatcher *d, int lid)
{
    return lid >= 0 && lid < d->nlisteners && d->listeners[lid].fd >= 0;
}

/* ---- creation -------------------------------------------------------- */

int fc_dispatcher_new(fc_dispatcher **out, fc_counters *table, int nslots,
                      int window, int accept_batch, int policy)
{
    fc_dispatcher *d;
    int r;

    if (!table || nslots < 1 || nslots > 65536 || window < 1 || window > 65536 ||
        accept_batch < 1 || accept_batch > 4096 ||
        (policy != FC_POLICY_RR && policy != FC_POLICY_LEAST))
        return -EINVAL;
    d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->table = table;
    d->nslots = nslots;
    d->window = window;
    d->accept_batch = accept_batch;
    d->policy = policy;
    d->accepting = 1;
    d->reserve_fd = -1;
    d->now = now_ms();
    d->max_orphans = -1;
    d->workers = calloc((size_t)nslots, sizeof(fc_worker));
    d->dirty = calloc((size_t)nslots, sizeof(int));
    d->gone = calloc((size_t)nslots, sizeof(int));
    if (!d->workers || !d->dirty || !d->gone) {
        r = -ENOMEM;
        goto fail;
    }
    for (int i = 0; i < nslots; i++)
        d->workers[i].data_fd = d->workers[i].peer_fd = -1;
    d->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (d->epfd < 0) {
        r = -errno;
        goto fail;
    }
    d->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    *out = d;
    return 0;
fail:
    free(d->workers);
    free(d->dirty);
    free(d->gone);
    free(d);
    return r;
}

void fc_dispatcher_free(fc_dispatcher *d)
{
    if (!d)
        return;
    for (int i = 0; i < d->nslots; i++) {
        fc_worker *w = &d->workers[i];
        if (w->data_fd >= 0)
            close(w->data_fd);
        if (w->peer_fd >= 0)
            close(w->peer_fd);
        fc_ledger_free(&w->ledger);
    }
    for (int i = 0; i < d->nlisteners; i++) {
        fc_listener *l = &d->listeners[i];
        for (int k = l->orphan_head; k < l->norphans; k++)
            close(l->orphans[k]);
        free(l->orphans);
        free(l->orphan_at);
        free(l->subs);
    }
    if (d->reserve_fd >= 0)
        close(d->reserve_fd);
    close(d->epfd);
    free(d->listeners);
    free(d->workers);
    free(d->dirty);
    free(d->gone);
    free(d);
}

int fc_dispatcher_fd(const fc_dispatcher *d) { return d->epfd; }

int fc_dispatcher_set_policy(fc_dispatcher *d, int policy)
{
    if (policy != FC_POLICY_RR && policy != FC_POLICY_LEAST)
        return -EINVAL;
    d->policy = policy;
    return 0;
}

void fc_dispatcher_set_accepting(fc_dispatcher *d, int on) { d->accepting = on != 0; }

int fc_dispatcher_set_stall_ms(fc_dispatcher *d, int ms)
{
    if (ms < 0 || ms > 3600000)
        return -EINVAL;
    d->stall_ms = ms;
    return 0;
}

/* ---- listeners ------------------------------------------------------- */

int fc_dispatcher_add_listener(fc_dispatcher *d, int fd)
{
    int lid, flags, r;
    fc_listener *l;

    if (fd < 0)
        return -EBADF;
    for (lid = 0; lid < d->nlisteners; lid++)
        if (d->listeners[lid].fd < 0)
            break;
    if (lid == d->nlisteners) {
        fc_listener *grown = realloc(d->listeners, sizeof(fc_listener) * (size_t)(lid + 1));
        if (!grown)
            return -ENOMEM;
        d->listeners = grown;
        memset(&d->listeners[lid], 0, sizeof(fc_listener));
        d->listeners[lid].fd = -1;
        d->nlisteners++;
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -errno;
    r = epoll_set(d, EPOLL_CTL_ADD, fd, 0, PACK(KIND_LISTENER, lid));
    if (r < 0)
        return r;
    l = &d->listeners[lid];
    l->fd = fd;
    l->polled = 0; /* armed by update_polling once a worker subscribes */
    l->broken = 0;
    l->nsubs = 0;
    l->rr = 0;
    l->orphan_head = l->norphans = 0;
    return lid;
}

int fc_dispatcher_remove_listener(fc_dispatcher *d, int lid)
{
    fc_listener *l;
    if (!valid_listener(d, lid))
        return -ENOENT;
    l = &d->listeners[lid];
    epoll_ctl(d->epfd, EPOLL_CTL_DEL, l->fd, NULL); /* may be closed already */
    for (int k = l->orphan_head; k < l->norphans; k++)
        close(l->orphans[k]);
    l->orphan_head = l->norphans = 0;
    l->nsubs = 0;
    l->fd = -1;
    return 0;
}

/* ---- orphans: fds whose worker is gone, waiting for another ------------
 *
 * They come back from a dead worker's ledger and queue (remove_worker), and
 * each holds one of the primary's fds, so they are bounded: at most
 * max_orphans (the caller derives it from RLIMIT_NOFILE and the fds in use,
 * keeping room for respawns and control), the oldest reset at the bound,
 * and none kept longer than orphan_timeout_ms. A reset (SO_LINGER 0) tells
 * the client at once, where a hang would hold its fd in the primary. */

static void reset_close(int fd)
{
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)); /* not a socket: a plain close */
    close(fd);
}

static int count_orphans(const fc_dispatcher *d)
{
    int n = 0;
    for (int i = 0; i < d->nlisteners; i++)
        if (d->listeners[i].fd >= 0)
            n += d->listeners[i].norphans - d->listeners[i].orphan_head;
    return n;
}

/* The listener whose first orphan is the oldest, or NULL. */
static fc_listener *oldest_orphans(fc_dispatcher *d)
{
    fc_listener *best = NULL;
    for (int i = 0; i < d->nlisteners; i++) {
        fc_listener *l = &d->listeners[i];
        if (l->fd >= 0 && l->orphan_head < l->norphans &&
            (!best || l->orphan_at[l->orphan_head] < best->orphan_at[best->orphan_head]))
            best = l;
    }
    return best;
}

static int shed_orphans(fc_dispatcher *d, int keep)
{
    int n = count_orphans(d), shed = 0;
    while (n > keep) {
        fc_listener *l = oldest_orphans(d);
        if (!l)
            break;
        reset_close(l->orphans[l->orphan_head++]);
        n--;
        shed++;
    }
    d->stats.orphans_shed += (uint64_t)shed;
    return shed;
}

static int orphan_push(fc_dispatcher *d, fc_listener *l, int fd)
{
    if (d->max_orphans == 0)
        return -ENOSPC; /* no room at all: the caller resets it */
    if (d->max_orphans > 0)
        shed_orphans(d, d->max_orphans - 1);
    if (l->orphan_head > 0 && l->norphans == l->caporphans) {
        /* compact before growing */
        memmove(l->orphans, l->orphans + l->orphan_head,
                sizeof(int) * (size_t)(l->norphans - l->orphan_head));
        memmove(l->orphan_at, l->orphan_at + l->orphan_head,
                sizeof(int64_t) * (size_t)(l->norphans - l->orphan_head));
        l->norphans -= l->orphan_head;
        l->orphan_head = 0;
    }
    if (l->norphans == l->caporphans) {
        int cap = l->caporphans ? l->caporphans * 2 : 64;
        int *grown = realloc(l->orphans, sizeof(int) * (size_t)cap);
        int64_t *grown_at;
        if (!grown)
            return -ENOMEM;
        l->orphans = grown;
        grown_at = realloc(l->orphan_at, sizeof(int64_t) * (size_t)cap);
        if (!grown_at)
            return -ENOMEM;
        l->orphan_at = grown_at;
        l->caporphans = cap;
    }
    l->orphan_at[l->norphans] = now_ms();
    l->orphans[l->norphans++] = fd;
    return 0;
}

/* Resets the orphans older than orphan_timeout_ms; notes when the next one
 * expires (the loop wakes for it). */
static void expire_orphans(fc_dispatcher *d, int64_t now)
{
    int expired = 0;
    d->orphan_deadline = 0;
    if (d->orphan_timeout_ms <= 0)
        return;
    for (;;) {
        fc_listener *l = oldest_orphans(d);
        if (!l)
            break;
        if (now - l->orphan_at[l->orphan_head] < d->orphan_timeout_ms) {
            d->orphan_deadline = l->orphan_at[l->orphan_head] + d->orphan_timeout_ms;
            break;
        }
        reset_close(l->orphans[l->orphan_head++]);
        expired++;
    }
    d->stats.orphans_expired += (uint64_t)expired;
}

int fc_dispatcher_set_orphan_limits(fc_dispatcher *d, int max_orphans, int timeout_ms)
{
    if (max_orphans < -1 || timeout_ms < 0)
        return -EINVAL;
    d->max_orphans = max_orphans;
    d->orphan_timeout_ms = timeout_ms;
    return max_orphans >= 0 ? shed_orphans(d, max_orphans) : 0;
}

/* ---- workers --------------------------------------------------------- */

int fc_dispatcher_add_worker(fc_dispatcher *d, int slot, int data_fd, int peer_fd)
{
    fc_worker *w;
    int r, flags;

    if (slot < 0 || slot >= d->nslots)
        return -EINVAL;
    if (data_fd < 0 || peer_fd < -1)
        return -EBADF;
    w = &d->workers[slot];
    if (w->data_fd >= 0)
        return -EBUSY;
    if (!w->ledger.fds) {
        r = fc_ledger_init(&w->ledger, (uint32_t)d->window);
        if (r < 0)
            return r;
    }
    fc_ledger_reset(&w->ledger);
    flags = fcntl(data_fd, F_GETFL);
    if (flags < 0 || fcntl(data_fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -errno;
    r = epoll_set(d, EPOLL_CTL_ADD, data_fd, EPOLLIN | EPOLLRDHUP, PACK(KIND_WORKER, slot));
    if (r < 0)
        return r;
    memset(fc_counters_at(d->table, slot), 0, sizeof(fc_counters));
    w->data_fd = data_fd;
    w->peer_fd = peer_fd;
    w->out_armed = w->waiting = w->dirty = 0;
    w->window = d->window;
    w->dispatched = 0;
    w->stall_head = 0;
    w->stall_since = d->now;
    if (slot >= d->top)
        d->top = slot + 1;
    return 0;
}

int fc_dispatcher_set_window(fc_dispatcher *d, int slot, int window)
{
    if (!valid_slot(d, slot))
        return -ESRCH;
    if (window < 1)
        return -EINVAL;
    /* Fds already held above a lowered window stay: room() is <= 0 until
     * the worker takes them. The ledger was sized for d->window. */
    d->workers[slot].window = window < d->window ? window : d->window;
    return 0;
}

int fc_dispatcher_subscribe(fc_dispatcher *d, int slot, int lid)
{
    fc_listener *l;
    if (!valid_slot(d, slot))
        return -ESRCH;
    if (!valid_listener(d, lid))
        return -ENOENT;
    l = &d->listeners[lid];
    for (int i = 0; i < l->nsubs; i++)
        if (l->subs[i] == slot)
            return 0;
    if (l->nsubs == l->capsubs) {
        int cap = l->capsubs ? l->capsubs * 2 : 8;
        int *grown = realloc(l->subs, sizeof(int) * (size_t)cap);
        if (!grown)
            return -ENOMEM;
        l->subs = grown;
        l->capsubs = cap;
    }
    l->subs[l->nsubs++] = slot;
    return 0;
}

static void unsubscribe(fc_listener *l, int slot)
{
    for (int i = 0; i < l->nsubs; i++) {
        if (l->subs[i] != slot)
            continue;
        memmove(&l->subs[i], &l->subs[i + 1], sizeof(int) * (size_t)(l->nsubs - i - 1));
        l->nsubs--;
        if (l->rr > (unsigned)i)
            l->rr--; /* keep the round robin's place */
        return;
    }
}

int fc_dispatcher_unsubscribe(fc_dispatcher *d, int slot, int lid)
{
    if (!valid_listener(d, lid))
        return -ENOENT;
    unsubscribe(&d->listeners[lid], slot);
    return 0;
}

/* Reads back, from our hold on a gone worker's end, every batch it had not
 * received, and queues those fds for other workers. The worker may still be
 * alive (it hung up its end): each message goes to exactly one reader, so
 * an fd is either the worker's (counted taken) or comes back here, never
 * both. Bounded: the queue holds at most a window's worth. */
static int take_back(fc_dispatcher *d, int peer_fd)
{
    int fds[FC_FDPASS_MAX], moved = 0;
    uint32_t tags[FC_FDPASS_MAX];

    for (int round = 0; round < 65536; round++) {
        int n = fc_recv_fds_flags(peer_fd, fds, tags, FC_FDPASS_MAX, MSG_DONTWAIT);
        if (n == -EMSGSIZE || n == -EBADMSG)
            continue; /* lost to our own fd limit, or not ours: keep reading */
        if (n <= 0)
            break; /* -EAGAIN: empty */
        for (int k = 0; k < n; k++) {
            if (valid_listener(d, (int)tags[k]) &&
                orphan_push(d, &d->listeners[tags[k]], fds[k]) == 0)
                moved++;
            else
                reset_close(fds[k]);
        }
    }
    return moved;
}

int fc_dispatcher_remove_worker(fc_dispatcher *d, int slot)
{
    fc_worker *w;
    fc_ledger *led;
    int moved = 0;

    if (slot < 0 || slot >= d->nslots)
        return -EINVAL;
    w = &d->workers[slot];
    if (w->data_fd < 0)
        return 0;
    led = &w->ledger;
    /* Whatever the worker counted as taken is its own (and died with it);
     * the rest never reached it: ours are the only copies. */
    fc_ledger_reclaim(led, fc_counter_load(&fc_counters_at(d->table, slot)->taken));
    if (w->peer_fd >= 0) {
        moved += take_back(d, w->peer_fd); /* before our end closes: the queue goes with it */
        close(w->peer_fd);
        w->peer_fd = -1;
    }
    epoll_ctl(d->epfd, EPOLL_CTL_DEL, w->data_fd, NULL);
    close(w->data_fd);
    w->data_fd = -1;
    if (w->dirty) {
        w->dirty = 0;
        for (int i = 0; i < d->ndirty; i++)
            if (d->dirty[i] == slot) {
                d->dirty[i] = d->dirty[--d->ndirty];
                break;
            }
    }
    for (int i = 0; i < d->nlisteners; i++)
        if (d->listeners[i].fd >= 0)
            unsubscribe(&d->listeners[i], slot);
    for (uint64_t i = led->head; i < led->tail; i++) {
        int fd = led->fds[i & led->mask];
        uint32_t lid = led->tags[i & led->mask];
        if (fd < 0)
            continue; /* sent, copy closed: take_back() had it if it was not taken */
        if (valid_listener(d, (int)lid) && orphan_push(d, &d->listeners[lid], fd) == 0) {
            moved++;
        } else {
            reset_close(fd); /* its listener is gone, or no room: nobody can serve it */
        }
    }
    led->head = led->sent = led->tail = 0;
    d->stats.redispatched += (uint64_t)moved;
    return moved;
}

/* ---- choosing a worker ----------------------------------------------- */

static inline int room(const fc_dispatcher *d, const fc_worker *w)
{
    (void)d;
    return w->window - (int)fc_ledger_held(&w->ledger);
}

/* A worker that has had fds in its channel, none of them taken, for
 * stall_ms: stopped (SIGSTOP), hung, or starved of CPU. Skipped while
 * another worker can serve, until it takes them (its ledger head moves).
 * Only the ledger's positions count, never a raw counter: head is at most
 * what we sent, whatever the worker wrote into `taken`. */
static inline int stalled(const fc_dispatcher *d, const fc_worker *w)
{
    return d->stall_ms > 0 && w->ledger.sent != w->ledger.head &&
           d->now - w->stall_since >= d->stall_ms;
}

static int choose_among(fc_dispatcher *d, fc_listener *l, int skip_stalled, int *skipped)
{
    int best = -1, n = l->nsubs;
    uint64_t best_load = UINT64_MAX;

    for (int k = 0; k < n; k++) {
        int i = (int)((l->rr + (unsigned)k) % (unsigned)n);
        fc_worker *w = &d->workers[l->subs[i]];
        if (room(d, w) <= 0)
            continue;
        if (skip_stalled && stalled(d, w)) {
            *skipped = 1;
            continue;
        }
        if (d->policy == FC_POLICY_RR) {
            l->rr = (unsigned)(i + 1) % (unsigned)n;
            return l->subs[i];
        }
        /* open now = given to it - closed by it (a worker may overcount closes) */
        uint64_t closed = fc_counter_load(&fc_counters_at(d->table, l->subs[i])->closed);
        uint64_t given = w->dispatched;
        uint64_t load = given > closed ? given - closed : 0;
        if (load < best_load) {
            best_load = load;
            best = i;
        }
    }
    if (best < 0)
        return -1;
    l->rr = (unsigned)(best + 1) % (unsigned)n;
    return l->subs[best];
}

/* Every worker with room is stalled: the one holding the fewest fds it
 * has not taken (a busy worker short of CPU has a few; a stopped one has
 * all it was given since it stopped, one more with each choice). */
static int least_stalled(fc_dispatcher *d, fc_listener *l)
{
    int best = -1, n = l->nsubs;
    uint32_t best_held = UINT32_MAX;
    for (int k = 0; k < n; k++) {
        int i = (int)((l->rr + (unsigned)k) % (unsigned)n);
        fc_worker *w = &d->workers[l->subs[i]];
        if (room(d, w) > 0 && fc_ledger_held(&w->ledger) < best_held) {
            best_held = fc_ledger_held(&w->ledger);
            best = i;
        }
    }
    if (best < 0)
        return -1;
    l->rr = (unsigned)(best + 1) % (unsigned)n;
    return l->subs[best];
}

/* The worker for the next connection of l, or -1 when none has room. A
 * stalled worker is chosen only when every worker with room is stalled:
 * the connection then waits in its channel, where the worker's return or a
 * replacement (take_back) gets it, as it would wait in the backlog. */
static int choose(fc_dispatcher *d, fc_listener *l)
{
    int skipped = 0, slot = choose_among(d, l, 1, &skipped);
    if (skipped)
        d->stats.stall_skips++;
    if (slot < 0 && skipped)
        slot = least_stalled(d, l);
    return slot;
}

static int listener_room(const fc_dispatcher *d, const fc_listener *l)
{
    int total = 0;
    for (int i = 0; i < l->nsubs; i++) {
        int r = room(d, &d->workers[l->subs[i]]);
        if (r > 0)
            total += r;
    }
    return total;
}

static void give(fc_dispatcher *d, int slot, int fd, int lid)
{
    fc_worker *w = &d->workers[slot];
    assert(room(d, w) > 0);
    fc_ledger_push(&w->ledger, fd, (uint32_t)lid);
    w->dispatched++;
    if (!w->dirty) {
        w->dirty = 1;
        d->dirty[d->ndirty++] = slot;
    }
}

/* ---- the hot path ---------------------------------------------------- */

static void back_off(fc_dispatcher *d)
{
    d->backoff_ms = d->backoff_ms ? d->backoff_ms * 2 : BACKOFF_FIRST_MS;
    if (d->backoff_ms > BACKOFF_MAX_MS)
        d->backoff_ms = BACKOFF_MAX_MS;
    d->backoff_until = now_ms() + d->backoff_ms;
}

/* Out of fds: give up the reserve to accept one pending connection and
 * close it (its client gets an answer, not a hang), then back off. */
static void on_emfile(fc_dispatcher *d, fc_listener *l)
{
    d->stats.emfile++;
    if (d->reserve_fd >= 0) {
        int fd;
        close(d->reserve_fd);
        d->reserve_fd = -1;
        do
            fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        while (fd < 0 && errno == EINTR);
        if (fd >= 0) {
            close(fd);
            d->stats.shed++;
        }
        d->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
    back_off(d);
}

static void accept_batch(fc_dispatcher *d, int lid)
{
    fc_listener *l = &d->listeners[lid];
    int budget = listener_room(d, l);

    if (budget > d->accept_batch)
        budget = d->accept_batch;
    while (budget > 0) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (errno) {
            case EINTR:
                continue;
            case EAGAIN:
#if EAGAIN != EWOULDBLOCK
            case EWOULDBLOCK:
#endif
                return;
            case EMFILE:
            case ENFILE:
                on_emfile(d, l);
                return;
            /* the connection failed before we took it: next one */
            case ECONNABORTED: case EPROTO: case ENETDOWN: case ENOPROTOOPT:
            case EHOSTDOWN: case ENONET: case EHOSTUNREACH: case EOPNOTSUPP:
            case ENETUNREACH: case EPERM: case ETIMEDOUT:
                continue;
            case EBADF: case ENOTSOCK: case EINVAL:
                l->broken = 1; /* closed or shut down behind our back */
                return;
            default: /* ENOBUFS, ENOMEM, ...: the kernel is short; wait */
                back_off(d);
                return;
            }
        }
        d->backoff_ms = 0;
        d->stats.accepted++;
        give(d, choose(d, l), fd, lid);
        budget--;
    }
}

/* Writes each dirty worker's unsent fds, FC_FDPASS_MAX per message. */
static void worker_gone(fc_dispatcher *d, int slot);

static void flush(fc_dispatcher *d, int slot)
{
    fc_worker *w = &d->workers[slot];
    fc_ledger *led = &w->ledger;
    int fds[FC_FDPASS_MAX];
    uint32_t tags[FC_FDPASS_MAX];

    while (fc_ledger_unsent(led) > 0) {
        int n = 0, r;
        for (uint64_t i = led->sent; i < led->tail && n < FC_FDPASS_MAX; i++, n++) {
            fds[n] = led->fds[i & led->mask];
            tags[n] = led->tags[i & led->mask];
        }
        r = fc_send_fds(w->data_fd, fds, tags, n);
        if (r == -EAGAIN || r == -ETOOMANYREFS) {
            d->stats.send_again++;
            if (r == -EAGAIN && !w->out_armed &&
                epoll_set(d, EPOLL_CTL_MOD, w->data_fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                          PACK(KIND_WORKER, slot)) == 0)
                w->out_armed = 1;
            if (r == -ETOOMANYREFS)
                d->send_retry = 1;
            return; /* still dirty */
        }
        if (r < 0) {
            worker_gone(d, slot); /* EPIPE, ECONNRESET: the worker's end is closed */
            return;
        }
        if (led->sent == led->head) {
            w->stall_since = d->now; /* the first fd waiting: the stall clock starts */
            w->stall_head = led->head;
        }
        if (w->peer_fd >= 0) {
            /* The queue holds the file now and take_back() can read it back:
             * our copy would only delay the FIN of the worker's close(). */
            for (uint64_t i = led->sent; i < led->sent + (uint64_t)n; i++) {
                close(led->fds[i & led->mask]);
                led->fds[i & led->mask] = -1;
            }
        }
        led->sent += (uint64_t)n;
    }
    if (w->out_armed &&
        epoll_set(d, EPOLL_CTL_MOD, w->data_fd, EPOLLIN | EPOLLRDHUP, PACK(KIND_WORKER, slot)) == 0)
        w->out_armed = 0;
    w->dirty = 0;
}

static void flush_dirty(fc_dispatcher *d)
{
    int n = d->ndirty;
    d->ndirty = 0;
    for (int i = 0; i < n; i++) {
        int slot = d->dirty[i];
        fc_worker *w = &d->workers[slot];
        if (w->data_fd < 0)
            continue;
        w->dirty = 0;
        flush(d, slot); /* a full channel comes back by EPOLLOUT or the send retry */
    }
}

static void worker_gone(fc_dispatcher *d, int slot)
{
    if (d->workers[slot].data_fd < 0)
        return;
    fc_dispatcher_remove_worker(d, slot);
    d->gone[d->ngone++] = slot;
}

/* The worker wrote to its data channel: wake-up bytes (or garbage, whose
 * fds are closed). Reads a bounded number so a chatty worker cannot starve
 * the loop; level-triggered epoll brings us back for the rest. */
static void drain_worker(fc_dispatcher *d, int slot)
{
    fc_worker *w = &d->workers[slot];
    int fds[FC_FDPASS_MAX];
    for (int i = 0; i < 64; i++) {
        int r = fc_recv_fds(w->data_fd, fds, NULL, FC_FDPASS_MAX);
        if (r == -EAGAIN)
            break;
        if (r == 0) {
            worker_gone(d, slot);
            return;
        }
        if (r > 0) /* a worker has no business sending us fds */
            for (int k = 0; k < r; k++)
                close(fds[k]);
    }
    w->waiting = 0;
}

/* About to sleep: ask every worker with fds in its channel to wake us when
 * it takes them, so that we close our copies at once. Until we do, a worker's
 * close() of such a connection sends no FIN: ours is still open. Asking only
 * before sleeping keeps wake-ups off a busy loop, which reclaims every pass.
 * Returns 1 when a worker had already moved (reclaimed now: look again). */
static int ask_wake(fc_dispatcher *d)
{
    int moved = 0;
    for (int s = 0; s < d->top; s++) {
        fc_worker *w = &d->workers[s];
        if (w->data_fd < 0 || w->waiting || w->ledger.sent == w->ledger.head)
            continue;
        if (w->peer_fd >= 0 && room(d, w) > 0)
            continue; /* no copies to close: only a full window needs to hear */
        fc_counters *c = fc_counters_at(d->table, s);
        if (fc_counters_want_wake(c, fc_counter_load(&c->taken))) {
            fc_ledger_reclaim(&w->ledger, fc_counter_load(&c->taken));
            moved = 1;
        } else {
            w->waiting = 1;
        }
    }
    return moved;
}

/* Before waiting: close the copies workers have taken, hand orphans to
 * workers with room, and poll exactly the listeners that can be served. */
static void prepare(fc_dispatcher *d, int64_t now, int *paused_for_room)
{
    *paused_for_room = 0;
    d->now = now;
    for (int s = 0; s < d->top; s++) {
        fc_worker *w = &d->workers[s];
        if (w->data_fd >= 0 && fc_ledger_held(&w->ledger) > 0)
            fc_ledger_reclaim(&w->ledger, fc_counter_load(&fc_counters_at(d->table, s)->taken));
        if (w->ledger.head != w->stall_head) { /* it took some: not stalled */
            w->stall_head = w->ledger.head;
            w->stall_since = now;
        }
    }
    expire_orphans(d, now);
    for (int lid = 0; lid < d->nlisteners; lid++) {
        fc_listener *l = &d->listeners[lid];
        int want, servable;
        if (l->fd < 0)
            continue;
        servable = !l->broken && l->nsubs > 0;
        while (l->orphan_head < l->norphans) {
            int slot = choose(d, l);
            if (slot < 0)
                break;
            give(d, slot, l->orphans[l->orphan_head++], lid);
        }
        if (l->orphan_head == l->norphans)
            l->orphan_head = l->norphans = 0;
        want = servable && d->accepting && now >= d->backoff_until && l->norphans == 0;
        if (servable && listener_room(d, l) == 0) {
            if (want && l->polled)
                d->stats.pauses++;
            want = 0;
            *paused_for_room = 1;
        }
        if (want != l->polled &&
            epoll_set(d, EPOLL_CTL_MOD, l->fd, want ? EPOLLIN : 0, PACK(KIND_LISTENER, lid)) == 0)
            l->polled = want;
    }
    d->stats.orphaned = (uint64_t)count_orphans(d);
    if (d->ndirty)
        flush_dirty(d);
}

static int wait_ms(fc_dispatcher *d, int64_t now, int64_t deadline, int paused_for_room)
{
    int64_t t = deadline < 0 ? -1 : (deadline > now ? deadline - now : 0);
    if (d->backoff_until > now && (t < 0 || d->backoff_until - now < t))
        t = d->backoff_until - now;
    if (paused_for_room && (t < 0 || t > PAUSED_RECHECK_MS))
        t = PAUSED_RECHECK_MS;
    if (d->orphan_deadline > 0 && (t < 0 || d->orphan_deadline - now < t))
        t = d->orphan_deadline > now ? d->orphan_deadline - now : 0;
    if (d->send_retry && (t < 0 || t > SEND_RETRY_MS)) {
        t = SEND_RETRY_MS;
        d->send_retry = 0;
        for (int s = 0; s < d->top; s++) /* retry every channel with unsent fds */
            if (d->workers[s].data_fd >= 0 && fc_ledger_unsent(&d->workers[s].ledger) > 0 &&
                !d->workers[s].dirty) {
                d->workers[s].dirty = 1;
                d->dirty[d->ndirty++] = s;
            }
    }
    return t > 0x7fffffff ? 0x7fffffff : (int)t;
}

static int take_gone(fc_dispatcher *d, fc_event *out, int nout, int max)
{
    while (d->ngone > 0 && nout < max) {
        out[nout].kind = FC_EV_WORKER_GONE;
        out[nout].id = d->gone[--d->ngone];
        out[nout].events = 0;
        nout++;
    }
    return nout;
}

int fc_dispatcher_run(fc_dispatcher *d, int timeout_ms, fc_event *out, int max)
{
    struct epoll_event evs[MAX_EVENTS];
    int64_t now = now_ms();
    int64_t deadline = timeout_ms < 0 ? -1 : now + timeout_ms;

    if (max < 1)
        return -EINVAL;
    for (;;) {
        int paused, n, nout, wait;

        nout = take_gone(d, out, 0, max);
        if (nout)
            return nout;
        prepare(d, now, &paused);
        wait = wait_ms(d, now, deadline, paused);
        n = epoll_wait(d->epfd, evs, MAX_EVENTS, 0);
        if (n == 0 && wait != 0) {
            if (ask_wake(d)) {
                now = now_ms();
                continue;
            }
            n = epoll_wait(d->epfd, evs, MAX_EVENTS, wait);
        }
        if (n < 0)
            return errno == EINTR ? 0 : -errno; /* EINTR: let the caller run signal handlers */
        d->now = now_ms();
        for (int i = 0; i < n; i++) {
            uint64_t data = evs[i].data.u64;
            int id = ID_OF(data);
            switch (KIND_OF(data)) {
            case KIND_LISTENER:
                if (valid_listener(d, id) && d->listeners[id].polled)
                    accept_batch(d, id);
                break;
            case KIND_WORKER:
                if (!valid_slot(d, id))
                    break;
                if (evs[i].events & EPOLLIN)
                    drain_worker(d, id);
                if (valid_slot(d, id) && (evs[i].events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)))
                    worker_gone(d, id);
                else if (valid_slot(d, id) && (evs[i].events & EPOLLOUT)) {
                    if (!d->workers[id].dirty) {
                        d->workers[id].dirty = 1;
                        d->dirty[d->ndirty++] = id;
                    }
                }
                break;
            case KIND_HOOK:
                if (id >= 0 && id < FC_DISPATCH_MAX_HOOKS && d->hooks[id].fn)
                    d->hooks[id].fn(d->hooks[id].arg, evs[i].events);
                break;
            case KIND_WATCH:
                if (nout < max) {
                    out[nout].kind = FC_EV_WATCH;
                    out[nout].id = id;
                    out[nout].events = evs[i].events;
                    nout++;
                }
                break;
            }
        }
        if (d->ndirty)
            flush_dirty(d);
        nout = take_gone(d, out, nout, max);
        if (nout)
            return nout;
        now = now_ms();
        if (deadline >= 0 && now >= deadline)
            return 0;
    }
}

/* ---- watches and stats ----------------------------------------------- */

int fc_dispatcher_watch(fc_dispatcher *d, int fd, uint32_t events, int token)
{
    int r;
    if (fd < 0)
        return -EBADF;
    r = epoll_set(d, EPOLL_CTL_MOD, fd, events, PACK(KIND_WATCH, token));
    if (r == -ENOENT)
        r = epoll_set(d, EPOLL_CTL_ADD, fd, events, PACK(KIND_WATCH, token));
    return r;
}

int fc_dispatcher_unwatch(fc_dispatcher *d, int fd)
{
    return epoll_ctl(d->epfd, EPOLL_CTL_DEL, fd, NULL) < 0 ? -errno : 0;
}

/* ---- hooks ------------------------------------------------------------ */

int fc_dispatcher_hook(fc_dispatcher *d, int fd, uint32_t events, fc_hook_fn fn, void *arg)
{
    int id = -1, r;
    if (fd < 0)
        return -EBADF;
    if (!fn)
        return -EINVAL;
    for (int i = 0; i < FC_DISPATCH_MAX_HOOKS; i++) {
        if (d->hooks[i].fn && d->hooks[i].fd == fd) {
            id = i;
            break;
        }
        if (!d->hooks[i].fn && id < 0)
            id = i;
    }
    if (id < 0)
        return -ENOSPC;
    r = epoll_set(d, EPOLL_CTL_MOD, fd, events, PACK(KIND_HOOK, id));
    if (r == -ENOENT)
        r = epoll_set(d, EPOLL_CTL_ADD, fd, events, PACK(KIND_HOOK, id));
    if (r < 0)
        return r;
    d->hooks[id].fd = fd;
    d->hooks[id].fn = fn;
    d->hooks[id].arg = arg;
    return 0;
}

int fc_dispatcher_unhook(fc_dispatcher *d, int fd)
{
    for (int i = 0; i < FC_DISPATCH_MAX_HOOKS; i++) {
        if (d->hooks[i].fn && d->hooks[i].fd == fd) {
            d->hooks[i].fn = NULL;
            return epoll_ctl(d->epfd, EPOLL_CTL_DEL, fd, NULL) < 0 ? -errno : 0;
        }
    }
    return -ENOENT;
}

void fc_dispatcher_stats(const fc_dispatcher *d, fc_stats *out)
{
    *out = d->stats;
    out->orphaned = (uint64_t)count_orphans(d); /* now, not as of the last pass */
}

int fc_dispatcher_slot_stats(const fc_dispatcher *d, int slot, fc_slot_stats *out)
{
    const fc_worker *w;
    const fc_counters *c;
    if (slot < 0 || slot >= d->nslots)
        return -EINVAL;
    w = &d->workers[slot];
    c = fc_counters_at(d->table, slot);
    out->dispatched = w->dispatched;
    out->held = w->ledger.fds ? fc_ledger_held(&w->ledger) : 0;
    out->unsent = w->ledger.fds ? fc_ledger_unsent(&w->ledger) : 0;
    out->taken = fc_counter_load(&c->taken);
    out->closed = fc_counter_load(&c->closed);
    out->requests = fc_counter_load(&c->requests);
    return 0;
}
