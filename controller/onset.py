"""Onset/offset detection on an envelope: threshold with hysteresis and minimum durations.

Pure and chunk-invariant: the envelope is examined at every ``tick``-th absolute
sample index (e.g. each millisecond), whatever the chunk boundaries. An onset is
declared once the envelope has stayed above the on threshold for ``min_on`` and is
dated at its first crossing; an offset likewise below the (lower) off threshold.
"""

from __future__ import annotations

import numpy as np

from controller.buffers import Columns, RepeatedRow


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
        self._needed = np.full(len(self.on_uv), self._min_on_ticks)  # ticks it must last: min on, or min off if active
        self._pending = np.zeros(len(self.on_uv), dtype=bool)
        self._below_off = np.zeros(len(self.on_uv), dtype=bool)
        self._events: list[tuple[int, int, bool]] = []
        self._changing = Columns(len(self.on_uv), dtype=bool)  # per tick of a block: would a change be pending?
        self._below = Columns(len(self.on_uv), dtype=bool)
        self._on_rows, self._off_rows = RepeatedRow(self.on_uv), RepeatedRow(self.off_uv)

    def process(self, envelope_uv: np.ndarray, first_index: int) -> list[tuple[int, int, bool]]:
        """Examine the envelope block (n_samples, n_channels); return the state changes (a list the next call reuses)."""
        events = self._events
        events.clear()
        pending, run = self._pending, self._run
        start = -first_index % self.tick
        ticks_uv = envelope_uv[start :: self.tick]
        if not len(ticks_uv):
            return events
        if not self._any_change_pending(ticks_uv):
            run[:] = 0  # every tick found no change pending: each restarted the count
            return events
        for local in range(start, envelope_uv.shape[0], self.tick):
            value = envelope_uv[local]
            np.greater(value, self.on_uv, out=pending)
            np.less(value, self.off_uv, out=self._below_off)
            np.copyto(pending, self._below_off, where=self.active)
            np.add(run, 1, out=run)
            np.logical_not(pending, out=self._below_off)
            np.copyto(run, 0, where=self._below_off)  # no change pending: the count restarts
            np.greater_equal(run, self._needed, out=pending)
            if pending.any():
                for channel in np.flatnonzero(pending).tolist():
                    now_active = not self.active[channel]
                    first_crossing = first_index + local - (int(self._needed[channel]) - 1) * self.tick
                    self.active[channel] = now_active
                    self._needed[channel] = self._min_off_ticks if now_active else self._min_on_ticks
                    run[channel] = 0
                    events.append((first_crossing, channel, now_active))
        return events

    def _any_change_pending(self, ticks_uv: np.ndarray) -> bool:
        """Would any tick of the block leave a change pending? (Mostly not: then the block needs no per-tick walk.)"""
        n = len(ticks_uv)
        changing, below = self._changing(n), self._below(n)
        np.greater(ticks_uv, self._on_rows(n), out=changing)
        np.less(ticks_uv, self._off_rows(n), out=below)
        np.copyto(changing, below, where=self.active)
        return bool(changing.any())
