/* counters: per-worker counters in shared memory, the only feedback channel
 * from workers to the dispatcher on the hot path.
 *
 * The primary creates one table (a memfd mapped MAP_SHARED) before it forks
 * any worker; a worker owns one slot and is its only writer, except for
 * `wake`, which both sides touch. The dispatcher never waits for a
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
    uint8_t  pad_[20];  /* one cache line per slot: no false sharing */
} fc_counters;

/* Creates an anonymous shared table of nslots zeroed slots. Returns the
 * memfd (close-on-exec) and stores the mapping in *table, or -errno. */
int fc_counters_create(int nslots, fc_counters **table);

/* Maps an existing table from its memfd (in a spawned worker). */
int fc_counters_attach(int fd, int nslots, fc_counters **table);

/* Unmaps a table. */
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
