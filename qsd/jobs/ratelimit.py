# SPDX-License-Identifier: GPL-2.0-or-later
"""The speed limit of block jobs (``speed`` in bytes per second).

A copy loop reports every chunk it has moved and sleeps for the delay it
gets back, so that over time it moves ``speed`` bytes per second.  Within
a window of :data:`SLICE_S` a burst of up to ``speed * SLICE_S`` bytes goes
without delay (and the first chunk of a window always goes, however large:
QSD's ``speed: 1`` backup copies one 1 MiB cluster and then waits); past
that, the delay is how long the window needs to "pay" for what was sent.
"""

from __future__ import annotations

import time

#: Length of one accounting window in seconds (QEMU's job slice is 100 ms).
SLICE_S = 0.1


class RateLimit:
    """Bytes-per-second accounting for one job; ``speed`` 0 means unlimited."""

    def __init__(self, speed: int = 0) -> None:
        self.speed = speed
        self._start = 0.0
        self._sent = 0

    def set_speed(self, speed: int) -> None:
        """Change the limit; accounting restarts so the new rate applies at once."""
        self.speed = speed
        self._start = 0.0
        self._sent = 0

    def delay(self, sent: int, now: float | None = None) -> float:
        """Account ``sent`` bytes just moved; seconds to wait before the next chunk."""
        if self.speed <= 0:
            return 0.0
        if now is None:
            now = time.monotonic()
        if now >= self._start + max(SLICE_S, self._sent / self.speed):
            self._start, self._sent = now, 0
        self._sent += sent
        if self._sent <= self.speed * SLICE_S:
            return 0.0
        return max(0.0, self._start + self._sent / self.speed - now)
