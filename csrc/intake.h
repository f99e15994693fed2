/* intake: the worker's end of its data channel.
 *
 * Receives one batch of fds, counts them as taken in the worker's counter
 * slot (from then on they are the worker's; the primary closes its copies),
 * and, when the primary asked to be woken, sends it a one-byte message.
 */
#ifndef FC_INTAKE_H
#define FC_INTAKE_H

#include <stdint.h>

#include "counters.h"

/* As fc_recv_fds (fdpass.h) on a non-blocking channel, plus the counting.
 * -EMSGSIZE (the worker is out of fds: the batch was truncated) also shuts
 * the channel down, so the primary re-dispatches every fd not yet taken. */
int fc_intake_recv(int sock, fc_counters *slot, int *fds, uint32_t *tags, int max);

#endif
