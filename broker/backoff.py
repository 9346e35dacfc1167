"""Capped exponential backoff with jitter, for clients that reconnect forever.

A fleet that lost its broker must not come back in lock step (every device at the same
second) nor hammer a broker that is still starting: each pause doubles up to a cap, and is
drawn from the upper half of its range (never zero, so never a hot loop).
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(self, first: float, cap: float, rand: Callable[[], float] = random.random) -> None:
        if not 0 < first <= cap:
            raise ValueError("backoff needs 0 < first <= cap")
        self.first, self.cap, self.rand = first, cap, rand
        self.failures = 0

    def next(self) -> float:
        """The pause before the next attempt (seconds), one more failure counted."""
        ceiling = min(self.cap, self.first * 2 ** min(self.failures, 60))
        self.failures += 1
        return ceiling / 2 + self.rand() * ceiling / 2

    def reset(self) -> None:
        """After a connection that held: the next failure starts from ``first`` again."""
        self.failures = 0
