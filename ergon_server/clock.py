"""Time as a parameter: the engine and stores never read the wall clock themselves."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time in integer milliseconds since the Unix epoch."""

    def now_ms(self) -> int:
        """The current time."""
        ...


class SystemClock:
    """The wall clock."""

    def now_ms(self) -> int:
        """The current wall-clock time."""
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to, for tests."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        """The time the clock was last set to."""
        return self._now_ms

    def advance(self, milliseconds: int) -> None:
        """Move the clock forward."""
        if milliseconds < 0:
            raise ValueError("a clock never goes back")
        self._now_ms += milliseconds

    def set(self, now_ms: int) -> None:
        """Set the clock, never backwards."""
        self.advance(now_ms - self._now_ms)
