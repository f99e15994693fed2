/* fdpass: see fdpass.h. */
#define _GNU_SOURCE
#include "fdpass.h"

#include <assert.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Control buffer big enough for FC_FDPASS_MAX fds, aligned for cmsghdr. */
typedef union {
    char buf[CMSG_SPACE(sizeof(int) * FC_FDPASS_MAX)];
    struct cmsghdr align;
} fc_cmsgbuf;

int fc_send_fds(int sock, const int *fds, const uint32_t *tags, int n)
{
    static const uint32_t zeros[FC_FDPASS_MAX];
    fc_cmsgbuf cbuf;
    struct iovec iov;
    struct msghdr msg;
    struct cmsghdr *cmsg;
    ssize_t r;

    if (sock < 0 || n < 1 || n > FC_FDPASS_MAX)
        return -EINVAL;
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = (void *)(tags ? tags : zeros);
    iov.iov_len = sizeof(uint32_t) * (size_t)n;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
    memset(cbuf.buf, 0, msg.msg_controllen); /* CMSG_SPACE pads an odd count: no stack bytes */
    cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
    memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)n);

    do
        r = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return n;
}

static void close_all(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* Copies the fds of every SCM_RIGHTS block into out (up to max) and closes
 * any beyond max. Returns how many were stored. */
static int collect_fds(struct msghdr *msg, int *out, int max, int *overflow)
{
    int got = 0;
    *overflow = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        const unsigned char *data = CMSG_DATA(c);
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, data + sizeof(int) * (size_t)i, sizeof(int));
            if (got < max)
                out[got++] = fd;
            else {
                close(fd);
                *overflow = 1;
            }
        }
    }
    return got;
}

int fc_recv_fds(int sock, int *fds, uint32_t *tags, int max)
{
    return fc_recv_fds_flags(sock, fds, tags, max, 0);
}

int fc_recv_fds_flags(int sock, int *fds, uint32_t *tags, int max, int flags)
{
    fc_cmsgbuf cbuf;
    uint32_t payload[FC_FDPASS_MAX + 1];
    struct iovec iov;
    struct msghdr msg;
    ssize_t r;
    int got, overflow;

    if (sock < 0 || max < 1)
        return -EINVAL;
    if (max > FC_FDPASS_MAX)
        max = FC_FDPASS_MAX;
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = payload;
    iov.iov_len = sizeof(payload);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.buf;
    /* Room for exactly max fds: a bigger batch is truncated by the kernel
     * (MSG_CTRUNC), which closes the fds that did not fit. */
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)max);

    do
        r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | flags);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    got = collect_fds(&msg, fds, max, &overflow);
    if (r == 0 && got == 0)
        return 0; /* hung up */
    if ((msg.msg_flags & MSG_CTRUNC) || overflow) {
        close_all(fds, got);
        return -EMSGSIZE;
    }
    if (got == 0 || (msg.msg_flags & MSG_TRUNC) ||
        (size_t)r != sizeof(uint32_t) * (size_t)got) {
        close_all(fds, got);
        return -EBADMSG;
    }
    if (tags)
        memcpy(tags, payload, sizeof(uint32_t) * (size_t)got);
    return got;
}
