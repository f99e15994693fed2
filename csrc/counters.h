/* counters: per-worker counters in shared memory, the only feedback channel
 * from workers to the dispatcher on the hot path.
 *
 * The primary creates one table before it forks any worker; a worker owns
 * one slot, the only one it can reach, and is its only writer, except for
 * `wake`, which both sides touch (and `pid`/`timeout_ms`, the primary's). The dispatcher never waits for a
 * per-connection acknowledgement: it reads `taken` to learn which fds a
 * worker has received (and closes its own copies of those), and `closed` to
 * learn how many connections the worker has finished (for `least`).
 *
 * `beat` is the hang detector's proof of life (fastcluster/_heartbeat.py):
 * the thread that serves connections stamps it, the primary reads its age
 * on a timer. `timeout_ms` is the hang timeout the primary applies to this
 * worker (the worker derives how often to stamp from it).
 */
#ifndef FC_COUNTERS_H
#define FC_COUNTERS_H

#include <stddef.h>
#include <stdint.h>

typedef struct fc_counters {
    uint64_t taken;     /* fds received off the data channel (worker writes) */
    uint64_t closed;    /* connections the worker has closed (worker writes) */
    uint64_t requests;  /* requests served, for status only (worker writes) */
    uint32_t wake;      /* 1: the primary is waiting for `taken` to move */
    uint32_t pid;       /* the worker's pid, for status only (primary writes) */
    uint64_t beat;      /* CLOCK_MONOTONIC ns of the serving loop's last beat;
                           0: not beating (worker writes) */
    uint32_t timeout_ms; /* hang timeout, ms; 0: hang detection off
                           (primary writes before the fork) */
    uint8_t  pad_[20];  /* 64 bytes; each slot has a page of its own */
} fc_counters;

/* The table is a region of nslots pages, slot i at page i (fc_counters_at),
 * so that each worker can be given its own page and nothing else.
 *
 * Isolation (issue L2): the primary maps the region and, before each fork,
 * gives the slot a fresh one-page memfd (fc_counters_renew), sealed against
 * shrinking and growing (so no ftruncate() of a worker can SIGBUS the
 * primary) and against further seals, mapped over the slot's page. The
 * worker keeps only that page: a forked one unmaps the rest of the region
 * (fc_counters_confine) and closes the memfd; a spawned one maps the memfd
 * (fc_counters_attach_slot) and closes it. Its siblings' pages are in no
 * file it can reach, so mremap() or a reopened memfd gets it nothing but
 * its own page. The primary reads every slot and trusts none of it: a
 * counter never indexes memory or sizes an allocation (see ledger.c and
 * dispatch.c's uses of taken and closed). */

/* The distance between two slots (the page size). */
size_t fc_counters_stride(void);

static inline fc_counters *fc_counters_at(fc_counters *table, int slot)
{
    return (fc_counters *)(void *)((char *)table + (size_t)slot * fc_counters_stride());
}

/* Creates the region of nslots zeroed slots (anonymous, shared with forked
 * children until they confine themselves). Returns 0 or -errno. */
int fc_counters_create(int nslots, fc_counters **table);

/* Primary, before a worker starts in slot: maps a fresh sealed one-page
 * memfd (zeroed) over the slot. Returns the memfd (close-on-exec; the
 * caller closes it once the worker has it) or -errno (the slot unchanged). */
int fc_counters_renew(fc_counters *table, int nslots, int slot);

/* Forked worker: unmaps every page of the region but slot's. Returns 0 or
 * -errno. Afterwards only fc_counters_at(table, slot) may be touched, and
 * the table is released with fc_counters_detach(fc_counters_at(table,
 * slot), 1). */
int fc_counters_confine(fc_counters *table, int nslots, int slot);

/* Spawned worker: maps one slot's page from its memfd (fc_counters_renew's
 * fd; it stays the caller's). Release with fc_counters_detach(slot, 1). */
int fc_counters_attach_slot(int fd, fc_counters **slot);

/* Unmaps nslots pages from table. */
void fc_counters_detach(fc_counters *table, int nslots);

/* Atomic accessors: every access to a slot goes through these. */
uint64_t fc_counter_load(const uint64_t *c);
void fc_counter_add(uint64_t *c, uint64_t n);

/* Worker side: n more fds were received. Returns 1 when the primary had
 * asked to be woken (the caller then sends a wake message), else 0. */
int fc_counters_took(fc_counters *slot, uint64_t n);

/* Primary side: asks to be woken when `taken` moves past `seen`. Returns 1
 * when it already has (no need to wait), else 0. */
int fc_counters_want_wake(fc_counters *slot, uint64_t seen);

/* Heartbeat: the worker stores a stamp (0: not beating), the primary loads
 * it; the timeout is set by the primary and read by the worker. */
void fc_counters_set_beat(fc_counters *slot, uint64_t stamp);
uint64_t fc_counters_get_beat(const fc_counters *slot);
void fc_counters_set_timeout_ms(fc_counters *slot, uint32_t ms);
uint32_t fc_counters_get_timeout_ms(const fc_counters *slot);

#endif
