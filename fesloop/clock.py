"""The one clock of a host: ``pylsl.local_clock`` (monotonic), injectable for tests.

Every timestamp in messages and LSL streams comes from it. Deadlines and freshness
are judged on the receiving process's own clock, never on a sender's timestamp.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Protocol

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


OFFSET_TRIES = 3
OFFSET_MAX_WINDOW_S = 0.001  # a measurement whose local reads are closer than this is taken at once


def wall_to_local_offset_s(clock: Clock | None = None, wall: Callable[[], float] = time.time) -> float:
    """Offset to add to a wall-clock (``time.time``) stamp to put it on the local clock.

    Used at the edge where BrainFlow hands over wall-clock timestamps. The wall clock is
    read between two local-clock reads; a preemption between them shifts the midpoint,
    so of up to OFFSET_TRIES measurements the one with the closest local reads is kept.
    """
    clock = clock or LslClock()
    best_window_s, best_offset_s = math.inf, 0.0
    for _ in range(OFFSET_TRIES):
        before = clock.now()
        wall_s = wall()
        after = clock.now()
        if after - before < best_window_s:
            best_window_s, best_offset_s = after - before, (before + after) / 2.0 - wall_s
        if best_window_s <= OFFSET_MAX_WINDOW_S:
            break
    return best_offset_s
