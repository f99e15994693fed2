/* counters: see counters.h. */
#define _GNU_SOURCE
#include "counters.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(sizeof(fc_counters) == 64, "a slot fits any page");
_Static_assert(offsetof(fc_counters, beat) % 8 == 0, "beat is naturally aligned");

#define MAX_SLOTS 65536

size_t fc_counters_stride(void)
{
    static size_t page;
    if (!page)
        page = (size_t)sysconf(_SC_PAGESIZE);
    return page;
}

int fc_counters_create(int nslots, fc_counters **table)
{
    void *p;
    if (nslots < 1 || nslots > MAX_SLOTS)
        return -EINVAL;
    p = mmap(NULL, fc_counters_stride() * (size_t)nslots, PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -errno;
    *table = p;
    return 0; /* zero-filled by the kernel */
}

int fc_counters_renew(fc_counters *table, int nslots, int slot)
{
    size_t page = fc_counters_stride();
    int fd, r;
    void *p;

    if (!table || slot < 0 || slot >= nslots || nslots > MAX_SLOTS)
        return -EINVAL;
    fd = memfd_create("fastcluster-counters", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)page) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
        goto fail;
    /* MAP_FIXED replaces the slot's old page (the previous worker's memfd,
     * or the region's anonymous page) in one step. */
    p = mmap(fc_counters_at(table, slot), page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
             fd, 0);
    if (p == MAP_FAILED)
        goto fail;
    return fd;
fail:
    r = -errno;
    close(fd);
    return r;
}

int fc_counters_confine(fc_counters *table, int nslots, int slot)
{
    size_t page = fc_counters_stride();
    char *base = (char *)table, *own = (char *)fc_counters_at(table, slot);
    size_t after = (size_t)(nslots - slot - 1) * page;

    if (!table || slot < 0 || slot >= nslots || nslots > MAX_SLOTS)
        return -EINVAL;
    if (own > base && munmap(base, (size_t)(own - base)) < 0)
        return -errno;
    if (after && munmap(own + page, after) < 0)
        return -errno;
    return 0;
}

int fc_counters_attach_slot(int fd, fc_counters **slot)
{
    size_t page = fc_counters_stride();
    struct stat st;
    void *p;

    if (fd < 0)
        return -EBADF;
    if (fstat(fd, &st) < 0)
        return -errno;
    if ((size_t)st.st_size != page)
        return -EINVAL; /* not a slot's memfd */
    p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    *slot = p;
    return 0;
}

void fc_counters_detach(fc_counters *table, int nslots)
{
    if (table && nslots > 0)
        munmap(table, fc_counters_stride() * (size_t)nslots);
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
