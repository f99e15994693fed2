/* intake: see intake.h. */
#define _GNU_SOURCE
#include "intake.h"

#include <errno.h>
#include <sys/socket.h>

#include "fdpass.h"

int fc_intake_recv(int sock, fc_counters *slot, int *fds, uint32_t *tags, int max)
{
    static const char wake = 'w';
    int n = fc_recv_fds(sock, fds, tags, max);
    ssize_t r;

    if (n == -EMSGSIZE) {
        /* The batch did not fit: this process is at its fd limit and the
         * kernel dropped what it could not install. We never counted those
         * fds taken, so the primary still holds them; hanging up our end
         * makes it pass everything we have not taken to other workers. The
         * caller sees a hang-up next and winds down like a disconnect. */
        shutdown(sock, SHUT_RDWR);
        return n;
    }
    if (n <= 0)
        return n;
    if (fc_counters_took(slot, (uint64_t)n)) {
        /* A full queue means a wake-up is already on its way: drop this one. */
        do
            r = send(sock, &wake, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (r < 0 && errno == EINTR);
    }
    return n;
}
