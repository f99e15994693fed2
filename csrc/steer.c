/* steer: see steer.h for the surface and the theory of operation. This file
 * holds the state, the sockets and the counters; steer_prog.c assembles and
 * loads the programs. */
#define _GNU_SOURCE
#include "steer.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "steer_prog.h"

_Static_assert(sizeof(fc_steer_page) == 32, "four 64-bit counters");

struct fc_steer {
    int mode;
    int nslots;
    size_t page;           /* bytes per slot */
    int pages_fd;          /* the counters: BPF array map (eBPF) or memfd */
    int sockarray_fd;      /* eBPF: slot -> socket */
    int prog_fd;           /* eBPF program, over slots [0, span) */
    int span;              /* 1 + the highest slot that had a socket */
    int timer_fd;          /* cBPF tick timer, -1 until asked */
    unsigned char *pages;  /* our mapping of every slot's page */
    int *sock;             /* slot -> the caller's socket fd, -1: none */
    int *order;            /* cBPF: group index -> slot (listen order) */
    int *index;            /* slot -> group index, -1 */
    int norder;
    uint32_t *weight;      /* cBPF weights last attached, by slot */
    int cbpf_dirty;        /* the group changed since the last attach */
    const char *call;      /* the last call that failed */
    fc_steer_stats stats;
};

size_t fc_steer_page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }

static fc_steer_page *page_of(const fc_steer *s, int slot)
{
    return (fc_steer_page *)(void *)(s->pages + (size_t)slot * s->page);
}

void fc_steer_page_add(uint64_t *field, uint64_t n)
{
    __atomic_fetch_add(field, n, __ATOMIC_RELAXED);
}

uint64_t fc_steer_page_load(const uint64_t *field)
{
    return __atomic_load_n(field, __ATOMIC_RELAXED);
}

static void page_store(uint64_t *field, uint64_t v)
{
    __atomic_store_n(field, v, __ATOMIC_RELAXED);
}

static int valid_slot(const fc_steer *s, int slot)
{
    return slot >= 0 && slot < s->nslots;
}

/* ---- creation -------------------------------------------------------- */

static int make_memfd_pages(fc_steer *s)
{
    int fd = memfd_create("fastcluster-steer", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)(s->page * (size_t)s->nslots)) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    s->pages_fd = fd;
    return 0;
}

static int steer_new(fc_steer **out, int nslots, int mode, int share_fd, const char **call,
                     char *log, size_t logsz)
{
    fc_steer *s;
    int r;

    static const char *none = "fc_steer_new";
    *call = none;
    if (log && logsz)
        log[0] = 0;
    if (nslots < 1 || nslots > FC_STEER_MAX_SLOTS ||
        (mode != FC_STEER_PLAIN && mode != FC_STEER_EBPF && mode != FC_STEER_CBPF))
        return -EINVAL;
    s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->mode = mode;
    s->nslots = nslots;
    s->page = fc_steer_page_size();
    s->pages_fd = s->sockarray_fd = s->prog_fd = s->timer_fd = -1;
    s->span = 1;
    s->pages = MAP_FAILED;
    s->sock = malloc(sizeof(int) * (size_t)nslots);
    s->order = malloc(sizeof(int) * (size_t)nslots);
    s->index = malloc(sizeof(int) * (size_t)nslots);
    s->weight = calloc((size_t)nslots, sizeof(uint32_t));
    if (!s->sock || !s->order || !s->index || !s->weight) {
        r = -ENOMEM;
        goto fail;
    }
    for (int i = 0; i < nslots; i++)
        s->sock[i] = s->index[i] = -1;
    if (share_fd >= 0) {
        *call = "fcntl(F_DUPFD_CLOEXEC)";
        s->pages_fd = fcntl(share_fd, F_DUPFD_CLOEXEC, 0);
        if (s->pages_fd < 0) {
            r = -errno;
            goto fail;
        }
    }
    if (mode == FC_STEER_EBPF) {
        r = fc_steer_prog_ebpf(nslots, s->page, &s->pages_fd, &s->sockarray_fd, &s->prog_fd,
                               call, log, logsz);
    } else if (share_fd < 0) {
        *call = "memfd_create";
        r = make_memfd_pages(s);
    } else {
        r = 0;
    }
    if (r < 0)
        goto fail;
    *call = "mmap";
    s->pages = mmap(NULL, s->page * (size_t)nslots, PROT_READ | PROT_WRITE, MAP_SHARED,
                    s->pages_fd, 0);
    if (s->pages == MAP_FAILED) {
        r = -errno;
        goto fail;
    }
    if (share_fd < 0)
        for (int i = 0; i < nslots; i++)
            page_store(&page_of(s, i)->bias, FC_STEER_BIAS_EMPTY);
    *call = none;
    *out = s;
    return 0;
fail:
    fc_steer_free(s);
    return r;
}

int fc_steer_new(fc_steer **out, int nslots, int mode, const char **call,
                 char *log, size_t logsz)
{
    return steer_new(out, nslots, mode, -1, call, log, logsz);
}

int fc_steer_new_shared(fc_steer **out, const fc_steer *share, const char **call,
                        char *log, size_t logsz)
{
    *call = "fc_steer_new_shared";
    if (!share)
        return -EINVAL;
    return steer_new(out, share->nslots, share->mode, share->pages_fd, call, log, logsz);
}

void fc_steer_free(fc_steer *s)
{
    if (!s)
        return;
    if (s->pages != MAP_FAILED)
        munmap(s->pages, s->page * (size_t)s->nslots);
    if (s->pages_fd >= 0)
        close(s->pages_fd);
    if (s->sockarray_fd >= 0)
        close(s->sockarray_fd);
    if (s->prog_fd >= 0)
        close(s->prog_fd);
    if (s->timer_fd >= 0)
        close(s->timer_fd);
    free(s->sock);
    free(s->order);
    free(s->index);
    free(s->weight);
    free(s);
}

int fc_steer_mode(const fc_steer *s) { return s->mode; }
int fc_steer_nslots(const fc_steer *s) { return s->nslots; }
int fc_steer_pages_fd(const fc_steer *s) { return s->pages_fd; }
const char *fc_steer_last_call(const fc_steer *s) { return s->call ? s->call : "steer"; }

/* ---- sockets --------------------------------------------------------- */

int fc_steer_add_socket(fc_steer *s, int slot, int fd)
{
    int r;
    s->call = "fc_steer_add_socket";
    if (!valid_slot(s, slot))
        return -EINVAL;
    if (fd < 0)
        return -EBADF;
    if (s->sock[slot] >= 0)
        return -EBUSY;
    if (s->mode == FC_STEER_EBPF && slot >= s->span) {
        /* Choose among the slots in use only: p2c over a capacity of 256
         * slots with two workers would nearly always draw empty ones. */
        char none[1];
        r = fc_steer_prog_load(slot + 1, s->pages_fd, s->sockarray_fd, &s->call, none, 0);
        if (r < 0)
            return r;
        close(s->prog_fd);
        s->prog_fd = r; /* attached below; the group drops the old one */
        s->span = slot + 1;
    }
    if (s->mode == FC_STEER_EBPF) {
        s->call = "bpf(BPF_MAP_UPDATE_ELEM)";
        r = fc_steer_sockarray_set(s->sockarray_fd, slot, fd);
        if (r < 0)
            return r;
        /* Attaching again on each socket is idempotent and keeps the group
         * steered even after every earlier socket was closed. */
        s->call = "setsockopt(SO_ATTACH_REUSEPORT_EBPF)";
        if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, &s->prog_fd,
                       sizeof(s->prog_fd)) < 0) {
            r = -errno;
            fc_steer_sockarray_del(s->sockarray_fd, slot);
            return r;
        }
    }
    s->sock[slot] = fd;
    s->index[slot] = s->norder;
    s->order[s->norder++] = slot;
    s->cbpf_dirty = 1;
    if (fc_steer_page_load(&page_of(s, slot)->bias) == FC_STEER_BIAS_EMPTY)
        page_store(&page_of(s, slot)->bias, 0);
    if (s->mode == FC_STEER_CBPF)
        fc_steer_tick(s); /* a failed attach is counted (stats.errors); the next tick retries */
    return 0;
}

int fc_steer_remove_socket(fc_steer *s, int slot)
{
    int at, last;
    s->call = "fc_steer_remove_socket";
    if (!valid_slot(s, slot))
        return -EINVAL;
    if (s->sock[slot] < 0)
        return -ENOENT;
    if (s->mode == FC_STEER_EBPF)
        fc_steer_sockarray_del(s->sockarray_fd, slot); /* the kernel drops it on close anyway */
    /* The kernel's group: the last socket takes the closed one's index. */
    at = s->index[slot];
    last = s->order[--s->norder];
    s->order[at] = last;
    s->index[last] = at;
    s->index[slot] = -1;
    s->sock[slot] = -1;
    s->weight[slot] = 0;
    s->cbpf_dirty = 1;
    if (s->mode == FC_STEER_CBPF && s->norder > 0)
        fc_steer_tick(s); /* before the caller's close shifts the indices */
    return 0;
}

int fc_steer_set_bias(fc_steer *s, int slot, uint64_t bias)
{
    s->call = "fc_steer_set_bias";
    if (!valid_slot(s, slot) || bias > FC_STEER_BIAS_EMPTY)
        return -EINVAL;
    page_store(&page_of(s, slot)->bias, bias);
    return 0;
}

/* The accept queue of a LISTEN socket and its limit. */
static int queue_depth(int fd, int32_t *queued, int32_t *limit)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
        return -errno;
    if (ti.tcpi_state != TCP_LISTEN)
        return -EINVAL;
    *queued = (int32_t)ti.tcpi_unacked;
    *limit = (int32_t)ti.tcpi_sacked;
    return 0;
}

int fc_steer_reconcile(fc_steer *s, int slot, int queued_total)
{
    int32_t queued = queued_total, limit = 0;
    fc_steer_page *p;
    uint64_t done;
    int r;

    s->call = "fc_steer_reconcile";
    if (!valid_slot(s, slot))
        return -EINVAL;
    if (queued_total < 0) {
        if (s->sock[slot] < 0)
            return -ENOENT;
        s->call = "getsockopt(TCP_INFO)";
        r = queue_depth(s->sock[slot], &queued, &limit);
        if (r < 0)
            return r;
    }
    p = page_of(s, slot);
    /* chosen - done must be what waits in the queue. Modulo 2^64 on purpose:
     * connections queued before the program counted make done "negative",
     * and the program's subtraction wraps back to the queue. */
    done = fc_steer_page_load(&p->chosen) - (uint64_t)queued;
    if (s->mode != FC_STEER_EBPF)
        done = 0;
    page_store(&p->done, done);
    page_store(&p->accepted, done);
    return queued;
}

int fc_steer_info_get(const fc_steer *s, int slot, fc_steer_info *out)
{
    const fc_steer_page *p;
    if (!valid_slot(s, slot))
        return -EINVAL;
    p = page_of(s, slot);
    out->chosen = fc_steer_page_load(&p->chosen);
    out->done = fc_steer_page_load(&p->done);
    out->bias = fc_steer_page_load(&p->bias);
    out->accepted = fc_steer_page_load(&p->accepted);
    out->queued = out->qlimit = -1;
    if (s->sock[slot] >= 0 && queue_depth(s->sock[slot], &out->queued, &out->qlimit) < 0)
        out->queued = out->qlimit = -1;
    out->weight = s->weight[slot];
    out->index = s->index[slot];
    return 0;
}

void fc_steer_stats_get(const fc_steer *s, fc_steer_stats *out) { *out = s->stats; }

/* ---- cBPF weights ---------------------------------------------------- */

/* A slot's weight: FC_STEER_CBPF_SCALE / (1 + load)^2, at least 1, where
 * load = queued + open in the worker (accepted - done, clamped: the worker
 * writes those) + a small bias. 0 when the queue is full; biased out slots
 * get 0 unless every slot is out. */
static uint32_t weight_of(const fc_steer *s, int slot, int32_t queued, int32_t limit,
                          int ignore_bias)
{
    const fc_steer_page *p = page_of(s, slot);
    uint64_t accepted = fc_steer_page_load(&p->accepted);
    uint64_t done = fc_steer_page_load(&p->done);
    uint64_t bias = fc_steer_page_load(&p->bias);
    uint64_t load, sq;

    if (bias >= FC_STEER_BIAS_OUT && !ignore_bias)
        return 0;
    if (limit > 0 && queued > limit)
        return 0; /* full: the kernel would drop the SYN */
    load = (uint64_t)(queued > 0 ? queued : 0);
    load += accepted > done ? accepted - done : 0;
    if (bias < FC_STEER_BIAS_OUT)
        load += bias;
    if (load > 65535)
        return 1;
    sq = (1 + load) * (1 + load);
    return sq >= FC_STEER_CBPF_SCALE ? 1 : (uint32_t)(FC_STEER_CBPF_SCALE / sq);
}

/* eBPF: the program adds to `chosen` at every SYN it steers, but not every
 * SYN it counts becomes a connection its worker accepts, so chosen - done
 * drifts upward, by different amounts per slot (measured: +30 to +90 per
 * slot over ~125k connections), and once the drifts differ by more than the
 * real loads do, "fewest open" follows the drift. Each tick sets every live
 * slot's open count back to what it is: its accept queue (TCP_INFO) plus
 * what its worker accepted and has not finished. An atomic add of the
 * difference, so the program's and the worker's concurrent adds are kept;
 * a connection moving from the queue to the worker between the reads is off
 * by one until the next tick. Only for a steer that is the pages' one user
 * (one address): with several, each sees only its own queues. */
static int ebpf_correct(fc_steer *s)
{
    int corrected = 0;
    s->stats.ticks++;
    for (int k = 0; k < s->norder; k++) {
        int slot = s->order[k];
        fc_steer_page *p = page_of(s, slot);
        int32_t queued, limit;
        uint64_t chosen, accepted, done, open_now, counted;
        if (fc_steer_page_load(&p->bias) >= FC_STEER_BIAS_OUT)
            continue; /* draining or dead: its figures are the primary's to set */
        if (queue_depth(s->sock[slot], &queued, &limit) < 0) {
            s->stats.errors++;
            continue;
        }
        done = fc_steer_page_load(&p->done);
        accepted = fc_steer_page_load(&p->accepted);
        chosen = fc_steer_page_load(&p->chosen);
        open_now = (uint64_t)(queued > 0 ? queued : 0) + (accepted > done ? accepted - done : 0);
        counted = chosen - done; /* modulo 2^64, as the program reads it */
        if (counted != open_now) {
            fc_steer_page_add(&p->chosen, open_now - counted); /* wraps: may subtract */
            corrected++;
        }
    }
    return corrected;
}

int fc_steer_tick(fc_steer *s)
{
    uint32_t *w;
    int32_t *queued, *limit;
    uint64_t total = 0;
    int changed, r = 0;

    if (s->mode == FC_STEER_EBPF && s->norder > 0)
        return ebpf_correct(s);
    if (s->mode != FC_STEER_CBPF || s->norder == 0)
        return 0;
    s->call = "fc_steer_tick";
    s->stats.ticks++;
    w = malloc(sizeof(uint32_t) * (size_t)s->nslots);
    queued = malloc(sizeof(int32_t) * (size_t)s->nslots * 2);
    if (!w || !queued) {
        free(w);
        free(queued);
        return -ENOMEM;
    }
    limit = queued + s->nslots;
    for (int k = 0; k < s->norder; k++) {
        int slot = s->order[k];
        if (queue_depth(s->sock[slot], &queued[slot], &limit[slot]) < 0) {
            s->stats.errors++;
            queued[slot] = limit[slot] = 0;
        }
    }
    for (int pass = 0; pass < 2 && total == 0; pass++) {
        for (int k = 0; k < s->norder; k++) {
            int slot = s->order[k];
            w[slot] = weight_of(s, slot, queued[slot], limit[slot], pass);
            total += w[slot];
        }
    }
    if (total == 0) /* every queue is full: spread evenly */
        for (int k = 0; k < s->norder; k++)
            w[s->order[k]] = 1;
    changed = s->cbpf_dirty;
    for (int k = 0; k < s->norder && !changed; k++)
        changed = w[s->order[k]] != s->weight[s->order[k]];
    if (changed) {
        s->call = "setsockopt(SO_ATTACH_REUSEPORT_CBPF)";
        r = fc_steer_cbpf_attach(s->sock[s->order[0]], s->order, s->norder, w);
        if (r < 0) {
            s->stats.errors++;
        } else {
            for (int k = 0; k < s->norder; k++)
                s->weight[s->order[k]] = w[s->order[k]];
            s->cbpf_dirty = 0;
            s->stats.attaches++;
            r = 1;
        }
    }
    free(w);
    free(queued);
    return r;
}

int fc_steer_timer_fd(fc_steer *s, int period_us)
{
    struct itimerspec its;
    s->call = "fc_steer_timer_fd";
    if (period_us < 100 || period_us > 1000000)
        return -EINVAL;
    if (s->timer_fd < 0) {
        s->call = "timerfd_create";
        s->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (s->timer_fd < 0)
            return -errno;
    }
    memset(&its, 0, sizeof(its));
    its.it_interval.tv_sec = period_us / 1000000;
    its.it_interval.tv_nsec = (long)(period_us % 1000000) * 1000;
    its.it_value = its.it_interval;
    s->call = "timerfd_settime";
    if (timerfd_settime(s->timer_fd, 0, &its, NULL) < 0)
        return -errno;
    return s->timer_fd;
}

void fc_steer_on_timer(void *arg, uint32_t events)
{
    fc_steer *s = arg;
    uint64_t expirations;
    (void)events;
    /* Non-blocking: EAGAIN when a spurious wake-up found nothing to read. */
    if (read(s->timer_fd, &expirations, sizeof(expirations)) != sizeof(expirations))
        return;
    fc_steer_tick(s);
}

/* ---- the worker's page ----------------------------------------------- */

int fc_steer_page_map(int fd, int slot, fc_steer_page **out)
{
    size_t page = fc_steer_page_size();
    void *p;
    if (fd < 0)
        return -EBADF;
    if (slot < 0 || slot >= FC_STEER_MAX_SLOTS)
        return -EINVAL;
    p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)((size_t)slot * page));
    if (p == MAP_FAILED)
        return -errno;
    *out = p;
    return 0;
}

void fc_steer_page_unmap(fc_steer_page *page)
{
    if (page)
        munmap(page, fc_steer_page_size());
}
