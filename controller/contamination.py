"""Contamination: samples whose EMG cannot be trusted, per channel, with a hold-off.

Pure and chunk-invariant. A sample is contaminated when it is near the amplifier's
rail (saturation), ends a run of near-constant samples at least ``flat`` long
(lead-off), or when the 1-20 Hz content of the blanked signal exceeds ``motion_uv``
(movement spikes). A channel stays contaminated until ``holdoff`` samples after its
last contaminated sample, counted by the position the caller gives each block (the
estimator counts samples received, so samples lost in a gap do not shorten it).
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from controller.buffers import Columns, RowIndex, column_steps
from controller.dsp import StreamingSos
from fesloop.config import ContaminationConfig

MOTION_BAND_HZ = (1.0, 20.0)
NEVER = -(1 << 62)


class ContaminationDetector:
    """Per-channel contamination state; ``process`` returns it per sample."""

    def __init__(self, fs_hz: float, n_channels: int, cfg: ContaminationConfig) -> None:
        self._rail_uv = cfg.rail_uv * cfg.rail_fraction if cfg.rail_uv > 0 else None
        self._flat_uv = cfg.flat_uv if cfg.flat_uv > 0 else None
        self._flat = max(int(round(cfg.flat_ms * 1e-3 * fs_hz)), 1)
        self._holdoff = int(round(cfg.holdoff_ms * 1e-3 * fs_hz))
        self._motion_uv = cfg.motion_uv if cfg.motion_uv > 0 else None
        self._motion = (
            StreamingSos(signal.butter(2, MOTION_BAND_HZ, "bandpass", fs=fs_hz, output="sos"), n_channels)
            if self._motion_uv is not None
            else None
        )
        self._previous: np.ndarray | None = None
        self._last_moving = np.full(n_channels, NEVER)
        self._last_bad = np.full(n_channels, NEVER)
        self.contaminated = np.zeros(n_channels, dtype=bool)
        self.bad = np.zeros((0, n_channels), dtype=bool)  # the last block's contaminated samples, hold-off not included
        self._bad = Columns(n_channels, dtype=bool)
        self._test = Columns(n_channels, dtype=bool)
        self._steps = Columns(n_channels)
        self._last = Columns(n_channels, dtype=np.int64)
        self._flags = Columns(n_channels, dtype=bool)
        self._none_yet = Columns(n_channels, dtype=bool)
        self._row = RowIndex(n_channels)
        self._before = np.zeros(n_channels, dtype=np.int64)

    @property
    def enabled(self) -> bool:
        return self._rail_uv is not None or self._flat_uv is not None or self._motion is not None

    def process(self, raw_uv: np.ndarray, held_uv: np.ndarray, first_index: int) -> np.ndarray:
        """Contaminated flags (n_samples, n_channels) from the raw and the blanked (held) signal.

        The flags are a view of a buffer that the next call overwrites.
        """
        n = raw_uv.shape[0]
        bad, test = self._bad(n), self._test(n)
        bad[:] = False
        if self._rail_uv is not None:
            np.greater_equal(np.abs(raw_uv, out=self._steps(n)), self._rail_uv, out=bad)
        if self._flat_uv is not None and n:
            if self._previous is None:
                self._previous = raw_uv[0].copy()
                self._last_moving[:] = first_index
            steps = self._steps(n)
            column_steps(raw_uv, self._previous, steps)
            np.abs(steps, out=steps)
            np.greater(steps, self._flat_uv, out=test)  # moving
            self._previous[:] = raw_uv[-1]
            since_moving = self._running_last(test, self._last_moving, first_index, n)
            np.greater_equal(since_moving, self._flat, out=test)
            np.logical_or(bad, test, out=bad)
        if self._motion is not None:
            motion = self._motion.process(held_uv)
            np.abs(motion, out=motion)
            np.greater(motion, self._motion_uv, out=test)
            np.logical_or(bad, test, out=bad)
        self.bad = bad
        since_bad = self._running_last(bad, self._last_bad, first_index, n)
        flags = self._flags(n)
        np.less_equal(since_bad, self._holdoff, out=flags)
        if n:  # any flagged sample closes the gate for this block's command, however short the hold-off
            np.logical_or.reduce(flags, axis=0, out=self.contaminated)
        return flags

    def _running_last(self, happened: np.ndarray, last: np.ndarray, first_index: int, n: int) -> np.ndarray:
        """Per sample and channel: samples since ``happened`` was last true (``last``: before the block, updated)."""
        running, row = self._last(n), self._row(n)
        running[:] = -1  # row of the newest time it happened in this block (-1: not yet) ...
        np.copyto(running, row, where=happened)
        np.maximum.accumulate(running, axis=0, out=running)
        np.subtract(last, first_index, out=self._before)
        none_yet = self._none_yet(n)
        np.less(running, 0, out=none_yet)
        np.copyto(running, self._before, where=none_yet)  # ... or the last time before it (< 0)
        if n:
            np.add(running[-1], first_index, out=last)
        np.subtract(row, running, out=running)
        return running
