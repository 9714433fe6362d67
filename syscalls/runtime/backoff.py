"""Restart pacing shared by the supervisor (services) and the launcher (daemons).

The first restart happens at once; the next ones wait ``base`` seconds, doubling up to ``cap``.
More than ``limit`` restarts within ``window`` seconds means the thing cannot stay up: give up.
"""

from __future__ import annotations

from collections import deque


class Backoff:
    def __init__(self, base: float, cap: float, limit: int, window: float):
        self.base, self.cap, self.limit, self.window = base, cap, limit, window
        self.times: deque[float] = deque()

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next restart, or None to give up; records the restart."""
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return None
        delay = 0.0 if not self.times else min(self.cap, self.base * 2 ** (len(self.times) - 1))
        self.times.append(now)
        return delay

    def reset(self) -> None:
        self.times.clear()

    def __len__(self) -> int:
        return len(self.times)
