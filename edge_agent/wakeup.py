"""Noticing that the device slept: the wall clock jumped ahead of the monotonic clock.

On Linux the monotonic clock stops while the system is suspended and the wall clock does
not, so their difference grows by the time asleep. A device that wakes up catches up (reads
the latest model and open round) at once instead of waiting for its connection to time out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class SleepWatch:
    def __init__(self, threshold: float = 10.0, clock: Callable[[], tuple[float, float]] | None = None) -> None:
        self.threshold = threshold
        self.clock = clock or (lambda: (time.time(), time.monotonic()))
        wall, mono = self.clock()
        self._offset = wall - mono

    def slept(self) -> float:
        """Seconds slept since the last call (0.0 when below ``threshold``; a clock step counts too)."""
        wall, mono = self.clock()
        offset = wall - mono
        gap, self._offset = offset - self._offset, offset
        return gap if gap >= self.threshold else 0.0

    async def wait(self, tick: float = 2.0) -> float:
        """Return once a sleep was noticed, with its length."""
        while True:
            await asyncio.sleep(tick)
            if gap := self.slept():
                return gap
