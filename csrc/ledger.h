/* ledger: the fds a worker has been given but not yet confirmed taking.
 *
 * A ring per worker slot, sized to the flow-control window. Positions are
 * absolute counts since the slot was (re)used, compared with the worker's
 * `taken` counter:
 *
 *     head <= taken <= sent <= tail
 *     [head, taken)  received by the worker: our copies may be closed
 *     [taken, sent)  in the channel's queue: ours are the copies that count
 *     [sent, tail)   assigned, not yet sent (the channel was full)
 *
 * Without a hold on the worker's end, the primary keeps its copy of every fd
 * in [head, tail), so a worker that dies with fds in its queue loses no
 * connection: they go to another worker. With one (the dispatcher's
 * peer_fd), copies are closed once sent (their entries become -1) and the
 * queue itself is read back instead; the positions still count the window.
 */
#ifndef FC_LEDGER_H
#define FC_LEDGER_H

#include <stdint.h>

typedef struct fc_ledger {
    int *fds;          /* ring of cap fds, owned by the ledger */
    uint32_t *tags;    /* listener id of each fd */
    uint32_t mask;     /* cap - 1; cap is a power of two */
    uint64_t head;     /* first fd whose copy we still hold */
    uint64_t sent;     /* first fd not yet written to the channel */
    uint64_t tail;     /* next free position */
} fc_ledger;

/* Allocates a ring of at least cap entries. Returns 0 or -ENOMEM. */
int fc_ledger_init(fc_ledger *l, uint32_t cap);

/* Closes every fd still held and frees the ring. */
void fc_ledger_free(fc_ledger *l);

/* Forgets everything, closing every fd held (the slot is reused). */
void fc_ledger_reset(fc_ledger *l);

/* Closes our copies of [head, min(taken, sent)). Returns how many. */
uint32_t fc_ledger_reclaim(fc_ledger *l, uint64_t taken);

static inline uint32_t fc_ledger_cap(const fc_ledger *l) { return l->mask + 1; }
static inline uint32_t fc_ledger_held(const fc_ledger *l) { return (uint32_t)(l->tail - l->head); }
static inline uint32_t fc_ledger_unsent(const fc_ledger *l) { return (uint32_t)(l->tail - l->sent); }

/* Appends fd for listener tag. The caller checks there is room. */
static inline void fc_ledger_push(fc_ledger *l, int fd, uint32_t tag)
{
    l->fds[l->tail & l->mask] = fd;
    l->tags[l->tail & l->mask] = tag;
    l->tail++;
}

#endif
