"""Respawn pacing for workers that die young (crash loops).

Theory of operation: a worker that exits without being asked is replaced.
If it lived less than `stable_after` seconds it counts as a crash; each
crash in a row doubles the delay before the next replacement, from `first`
up to `cap`, with +-`jitter` spread so that a fleet of primaries does not
retry in step. A worker that lives past `stable_after` resets the streak.
One pacer per worker slot's lineage (the id chain of replacements) would be
finer; one per primary is what gunicorn and Node users expect, and it is
what stops a broken deploy from becoming a fork bomb.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float = 0.1
    cap: float = 30.0
    stable_after: float = 10.0
    jitter: float = 0.2
    streak: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        for name in ("first", "cap", "stable_after"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"backoff {name} must be a number > 0, got {value!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter!r}")

    def on_exit(self, lifetime: float, asked: bool) -> float:
        """Records a worker's exit; returns the delay before its replacement."""
        if asked or lifetime >= self.stable_after:
            self.streak = 0
            return 0.0
        self.streak += 1
        delay: float = min(self.cap, self.first * 2.0 ** (self.streak - 1))
        return delay * (1 + self._rng.uniform(-self.jitter, self.jitter))

    @property
    def crash_looping(self) -> bool:
        """True once the delay has reached its cap: worth a loud log line."""
        return bool(self.first * 2.0 ** max(self.streak - 1, 0) >= self.cap)
