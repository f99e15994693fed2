/* steer_prog: the programs of steer.h and the bpf() calls that load them.
 * Private to steer.c (and the refusal test through fc_steer_load_prog). */
#ifndef FC_STEER_PROG_H
#define FC_STEER_PROG_H

#include <stddef.h>
#include <stdint.h>

/* Creates the counters map (ARRAY, BPF_F_MMAPABLE, nslots values of page
 * bytes) unless *pages_fd is one already (>= 0, kept on failure), the
 * REUSEPORT_SOCKARRAY and the SK_REUSEPORT program over them. Returns 0 with
 * the fds (close-on-exec), or -errno with *call and the verifier's log
 * (fc_steer_new's contract). */
int fc_steer_prog_ebpf(int nslots, size_t page, int *pages_fd, int *sockarray_fd,
                       int *prog_fd, const char **call, char *log, size_t logsz);

/* Loads the program over the maps for slots [0, span): the choice ranges
 * over the slots in use, not over the maps' capacity. Returns its fd. */
int fc_steer_prog_load(int span, int pages_fd, int sockarray_fd, const char **call,
                       char *log, size_t logsz);

int fc_steer_sockarray_set(int map_fd, int slot, int sock_fd);
int fc_steer_sockarray_del(int map_fd, int slot);

/* Attaches the classic program: a random number mod the total weight,
 * walked over cumulative weights w[order[k]], returns group index k. */
int fc_steer_cbpf_attach(int sock_fd, const int *order, int norder, const uint32_t *w);

#endif
