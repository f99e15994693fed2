/* ledger: see ledger.h. */
#include "ledger.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

int fc_ledger_init(fc_ledger *l, uint32_t cap)
{
    uint32_t n = 1;
    while (n < cap)
        n <<= 1;
    l->fds = calloc(n, sizeof(int));
    l->tags = calloc(n, sizeof(uint32_t));
    if (!l->fds || !l->tags) {
        free(l->fds);
        free(l->tags);
        l->fds = NULL;
        l->tags = NULL;
        return -ENOMEM;
    }
    l->mask = n - 1;
    l->head = l->sent = l->tail = 0;
    return 0;
}

void fc_ledger_reset(fc_ledger *l)
{
    for (uint64_t i = l->head; i < l->tail; i++)
        if (l->fds[i & l->mask] >= 0)
            close(l->fds[i & l->mask]);
    l->head = l->sent = l->tail = 0;
}

void fc_ledger_free(fc_ledger *l)
{
    if (!l->fds)
        return;
    fc_ledger_reset(l);
    free(l->fds);
    free(l->tags);
    l->fds = NULL;
    l->tags = NULL;
}

uint32_t fc_ledger_reclaim(fc_ledger *l, uint64_t taken)
{
    uint64_t upto = taken < l->sent ? taken : l->sent; /* a worker's counter is not trusted past what we sent */
    uint32_t n = 0;
    while (l->head < upto) {
        if (l->fds[l->head & l->mask] >= 0)
            close(l->fds[l->head & l->mask]);
        l->head++;
        n++;
    }
    return n;
}
