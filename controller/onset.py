"""Onset/offset detection on an envelope: threshold with hysteresis and minimum durations.

Pure and chunk-invariant: the envelope is examined at every ``tick``-th absolute
sample index (e.g. each millisecond), whatever the chunk boundaries. An onset is
declared once the envelope has stayed above the on threshold for ``min_on`` and is
dated at its first crossing; an offset likewise below the (lower) off threshold.
"""

from __future__ import annotations

import numpy as np


class OnsetDetector:
    """Per-channel active/inactive state with hysteresis; events as (index, channel, is_onset)."""

    def __init__(self, on_uv: np.ndarray, off_uv: np.ndarray, tick: int, min_on: int, min_off: int) -> None:
        self.on_uv = np.asarray(on_uv, dtype=np.float64)
        self.off_uv = np.asarray(off_uv, dtype=np.float64)
        self.tick = max(tick, 1)
        self._min_on_ticks = max(int(np.ceil(min_on / self.tick)), 1)
        self._min_off_ticks = max(int(np.ceil(min_off / self.tick)), 1)
        self.active = np.zeros(len(self.on_uv), dtype=bool)
        self._run = np.zeros(len(self.on_uv), dtype=np.int64)  # ticks the pending change has lasted

    def process(self, envelope_uv: np.ndarray, first_index: int) -> list[tuple[int, int, bool]]:
        """Examine the envelope block (n_samples, n_channels); return the state changes."""
        events: list[tuple[int, int, bool]] = []
        start = (-first_index) % self.tick
        for local in range(start, envelope_uv.shape[0], self.tick):
            value = envelope_uv[local]
            pending = np.where(self.active, value < self.off_uv, value > self.on_uv)
            self._run = np.where(pending, self._run + 1, 0)
            needed = np.where(self.active, self._min_off_ticks, self._min_on_ticks)
            for channel in np.flatnonzero(self._run >= needed):
                self.active[channel] = not self.active[channel]
                self._run[channel] = 0
                first_crossing = first_index + local - (int(needed[channel]) - 1) * self.tick
                events.append((first_crossing, int(channel), bool(self.active[channel])))
        return events
