"""Respawn pacing for workers that die young (crash loops).

Theory of operation: a worker that exits without being asked is replaced.
If it lived `stable_after` seconds or more, at once (delay 0: the goal is a
replacement accepting within milliseconds). If it lived less, it counts as
a crash; each crash in a row doubles the delay before the next replacement,
from `first` up to `cap`, with +-`jitter` spread so that a fleet of
primaries does not retry in step. The streak resets when a worker that
lived past `stable_after` exits, or when no crash came for `stable_after`
seconds after the last replacement was due (counting from the crash itself
would reset every streak whose delay grew past `stable_after`). One pacer
per primary (not per worker lineage): with every worker failing at boot,
the delays grow with each death whichever worker it was, so a broken
deploy never becomes a fork bomb.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float = 0.1
    cap: float = 30.0
    stable_after: float = 10.0
    jitter: float = 0.2
    streak: int = 0
    calm_since: float = float("-inf")  # when the last crash's replacement was due
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self.configure(self.first, self.cap, self.stable_after)
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter!r}")

    def configure(self, first: float, cap: float, stable_after: float) -> None:
        for name, value in (("first", first), ("cap", cap), ("stable_after", stable_after)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not value > 0:
                raise ValueError(f"backoff {name} must be a number > 0, got {value!r}")
        self.first, self.cap, self.stable_after = float(first), float(max(cap, first)), \
            float(stable_after)

    def on_exit(self, lifetime: float, asked: bool, now: float | None = None) -> float:
        """Records a worker's exit; returns the delay before its replacement."""
        now = time.monotonic() if now is None else now
        if now - self.calm_since >= self.stable_after:
            self.streak = 0  # calm for a stable period: the old streak is history
        if asked or lifetime >= self.stable_after:
            self.streak = 0
            return 0.0
        self.streak += 1
        delay: float = min(self.cap, self.first * 2.0 ** (self.streak - 1))
        delay *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        self.calm_since = now + delay
        return delay

    @property
    def crash_looping(self) -> bool:
        """True once the delay has reached its cap: worth a loud log line."""
        return bool(self.first * 2.0 ** max(self.streak - 1, 0) >= self.cap)
