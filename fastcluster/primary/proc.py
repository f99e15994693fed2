"""The primary's private record of one worker (its slot, channel, timers)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..wire.channel import ControlSocket
    from ..wire.handle import Worker
    from .timers import Timer


class Proc:
    """The primary's private record of one worker."""

    def __init__(self, worker: Worker, slot: int, env: dict[str, str]) -> None:
        self.worker = worker
        self.slot = slot
        self.env = env  # fork(env=...) extras, reused by a respawn
        self.chan: ControlSocket | None = None
        self.started = time.monotonic()
        self.watching_out = False  # EPOLLOUT watched: output is queued
        self.bad_frames = 0
        self.kill_timer: Timer | None = None
        self.partial_timer: Timer | None = None  # armed while a partial frame is buffered
        self.partial_mark = 0  # frames decoded when it was armed
        self.given: set[str] = set()  # addresses we answered its listen requests with
        self.left = False  # it disconnected on its own (SIGTERM from outside, say)
        self.dead = False
        self.listens_ok = 0  # listen requests the primary granted it
        self.listened = 0  # "listening" frames it sent for them
        self.ready = False  # it listened on every address it asked for (respawn.py)
        self.replaced = False  # its replacement was forked already (it left: fd limit)
