"""The one clock of a host: ``pylsl.local_clock`` (monotonic), injectable for tests.

Every timestamp in messages and LSL streams comes from it. Deadlines and freshness
are judged on the receiving process's own clock, never on a sender's timestamp.
"""

from __future__ import annotations

import time
from typing import Protocol

import pylsl


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic clock shared by all processes of this host."""
        ...


class LslClock:
    """The shared host clock (``lsl_local_clock``: steady clock, seconds)."""

    def now(self) -> float:
        return pylsl.local_clock()


class ManualClock:
    """A clock that only moves when told to: for pure-logic tests."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.t = start_s

    def now(self) -> float:
        return self.t

    def advance(self, dt_s: float) -> None:
        self.t += dt_s


def wall_to_local_offset_s(clock: Clock | None = None) -> float:
    """Offset to add to a wall-clock (``time.time``) stamp to put it on the local clock.

    Used at the edge where BrainFlow hands over wall-clock timestamps.
    """
    clock = clock or LslClock()
    before = clock.now()
    wall = time.time()
    after = clock.now()
    return (before + after) / 2.0 - wall
