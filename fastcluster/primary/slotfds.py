"""What a new worker's slot needs before the fork, made together or not at
all: a fresh sealed page of the counter table (its memfd, which only this
worker will get: csrc/counters.h), its data channel (whose primary end goes
to the dispatcher with a hold on the worker's end) and its control channel.
If any of them cannot be made (EMFILE, say), what was made is closed and
the slot is left as it was.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .._core import CounterTable, Dispatcher


@dataclass
class SlotFds:
    table_fd: int  # the slot's page (memfd): the worker's, closed here after the fork
    data_w: socket.socket  # the worker's end of the data channel
    ctl_p: socket.socket  # the control channel: ours
    ctl_w: socket.socket  # and the worker's

    def close(self) -> None:
        """Everything but the dispatcher's end (the fork failed)."""
        for s in (self.data_w, self.ctl_p, self.ctl_w):
            s.close()
        os.close(self.table_fd)


def open_slot(table: CounterTable, dispatcher: Dispatcher, slot: int) -> SlotFds:
    table_fd = table.renew(slot)
    made: list[socket.socket] = []
    try:
        made.extend(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
        made.extend(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
        data_p, data_w, ctl_p, ctl_w = made
        dispatcher.add_worker(slot, data_p.fileno(), data_w.fileno())
    except BaseException:
        for s in made:
            s.close()
        os.close(table_fd)
        raise
    data_p.detach()  # the dispatcher's now
    return SlotFds(table_fd, data_w, ctl_p, ctl_w)
