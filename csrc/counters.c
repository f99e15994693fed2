/* counters: see counters.h. */
#define _GNU_SOURCE
#include "counters.h"

#include <errno.h>
#include <stddef.h>
#include <sys/mman.h>
#include <unistd.h>

_Static_assert(sizeof(fc_counters) == 64, "one cache line per slot");
_Static_assert(offsetof(fc_counters, beat) % 8 == 0, "beat is naturally aligned");

static size_t table_size(int nslots)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t bytes = sizeof(fc_counters) * (size_t)nslots;
    return (bytes + page - 1) / page * page;
}

int fc_counters_attach(int fd, int nslots, fc_counters **table)
{
    void *p;
    if (fd < 0 || nslots < 1 || nslots > 65536)
        return -EINVAL;
    p = mmap(NULL, table_size(nslots), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    *table = p;
    return 0;
}

int fc_counters_create(int nslots, fc_counters **table)
{
    int fd, r;
    if (nslots < 1 || nslots > 65536)
        return -EINVAL;
    fd = memfd_create("fastcluster-counters", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)table_size(nslots)) < 0) {
        r = -errno;
        close(fd);
        return r;
    }
    r = fc_counters_attach(fd, nslots, table);
    if (r < 0) {
        close(fd);
        return r;
    }
    return fd; /* the pages are zero-filled by the kernel */
}

void fc_counters_detach(fc_counters *table, int nslots)
{
    if (table)
        munmap(table, table_size(nslots));
}

uint64_t fc_counter_load(const uint64_t *c)
{
    return __atomic_load_n(c, __ATOMIC_ACQUIRE);
}

void fc_counter_add(uint64_t *c, uint64_t n)
{
    __atomic_fetch_add(c, n, __ATOMIC_RELEASE);
}

/* The wake handshake is Dekker's: each side writes its own variable, then
 * reads the other's, both sequentially consistent, so at least one of them
 * sees the other's write and no wake-up is lost. */
int fc_counters_took(fc_counters *slot, uint64_t n)
{
    __atomic_fetch_add(&slot->taken, n, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&slot->wake, __ATOMIC_SEQ_CST) == 0)
        return 0;
    return __atomic_exchange_n(&slot->wake, 0, __ATOMIC_SEQ_CST) != 0;
}

int fc_counters_want_wake(fc_counters *slot, uint64_t seen)
{
    __atomic_store_n(&slot->wake, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&slot->taken, __ATOMIC_SEQ_CST) != seen) {
        __atomic_store_n(&slot->wake, 0, __ATOMIC_SEQ_CST);
        return 1;
    }
    return 0;
}

void fc_counters_set_beat(fc_counters *slot, uint64_t stamp)
{
    __atomic_store_n(&slot->beat, stamp, __ATOMIC_RELEASE);
}

uint64_t fc_counters_get_beat(const fc_counters *slot)
{
    return __atomic_load_n(&slot->beat, __ATOMIC_ACQUIRE);
}

void fc_counters_set_timeout_ms(fc_counters *slot, uint32_t ms)
{
    __atomic_store_n(&slot->timeout_ms, ms, __ATOMIC_RELEASE);
}

uint32_t fc_counters_get_timeout_ms(const fc_counters *slot)
{
    return __atomic_load_n(&slot->timeout_ms, __ATOMIC_ACQUIRE);
}
