/* fdpass: batches of file descriptors over an AF_UNIX SOCK_SEQPACKET socket.
 *
 * One message carries up to FC_FDPASS_MAX fds in one SCM_RIGHTS block, and a
 * payload of one uint32_t tag per fd (the dispatcher's listener id), so the
 * receiver knows which listener each connection came from. A message always
 * has at least one fd, so a zero-length read means the peer hung up.
 *
 * Ownership: fc_send_fds never closes the fds it sends (the sender keeps its
 * copies); fc_recv_fds hands the caller new fds, close-on-exec, and on every
 * error path closes whatever it received before returning.
 *
 * Status: >= 0 on success, -errno on failure. -EAGAIN and -ETOOMANYREFS are
 * backpressure (the receiver's queue is full, or too many fds are in flight
 * for this user), not failures: try again later.
 */
#ifndef FC_FDPASS_H
#define FC_FDPASS_H

#include <stdint.h>

/* SCM_MAX_FD in the kernel: the most fds one sendmsg may carry. */
#define FC_FDPASS_MAX 253

/* Sends fds[0..n) with tags[0..n) (tags may be NULL: all zero) in one
 * message. 1 <= n <= FC_FDPASS_MAX. Returns n, or -errno. Never blocks longer
 * than the socket does: on a non-blocking socket a full queue is -EAGAIN. */
int fc_send_fds(int sock, const int *fds, const uint32_t *tags, int n);

/* Receives one message into fds[0..max) and tags[0..max) (tags may be NULL).
 * Returns the number of fds received (>= 1), 0 when the peer has hung up,
 * -EAGAIN when nothing is queued on a non-blocking socket, -EMSGSIZE when the
 * message carried more fds than max (MSG_CTRUNC: every fd that arrived is
 * closed), -EBADMSG when a message carried no fd or a malformed payload (its
 * fds are closed), or another -errno. */
int fc_recv_fds(int sock, int *fds, uint32_t *tags, int max);

/* fc_recv_fds with extra recvmsg flags (MSG_DONTWAIT: never block, whatever
 * the socket's mode, as when reading a worker's end of its channel). */
int fc_recv_fds_flags(int sock, int *fds, uint32_t *tags, int max, int flags);

#endif
