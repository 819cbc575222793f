"""Contamination: samples whose EMG cannot be trusted, per channel, with a hold-off.

Pure and chunk-invariant. A sample is contaminated when it is near the amplifier's
rail (saturation), ends a run of near-constant samples at least ``flat`` long
(lead-off), or when the 1-20 Hz content of the blanked signal exceeds ``motion_uv``
(movement spikes). A channel stays contaminated until ``holdoff`` samples after its
last contaminated sample.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

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

    @property
    def enabled(self) -> bool:
        return self._rail_uv is not None or self._flat_uv is not None or self._motion is not None

    def process(self, raw_uv: np.ndarray, held_uv: np.ndarray, first_index: int) -> np.ndarray:
        """Contaminated flags (n_samples, n_channels) from the raw and the blanked (held) signal."""
        n = raw_uv.shape[0]
        index = np.arange(first_index, first_index + n)[:, np.newaxis]
        bad = np.zeros(raw_uv.shape, dtype=bool)
        if self._rail_uv is not None:
            bad |= np.abs(raw_uv) >= self._rail_uv
        if self._flat_uv is not None and n:
            if self._previous is None:
                self._previous = raw_uv[0].copy()
                self._last_moving[:] = first_index
            moving = np.abs(np.diff(raw_uv, axis=0, prepend=self._previous[np.newaxis])) > self._flat_uv
            self._previous[:] = raw_uv[-1]
            last_moving = np.maximum.accumulate(np.where(moving, index, self._last_moving), axis=0)
            self._last_moving[:] = last_moving[-1]
            bad |= index - last_moving >= self._flat
        if self._motion is not None:
            bad |= np.abs(self._motion.process(held_uv)) > self._motion_uv
        last_bad = np.maximum.accumulate(np.where(bad, index, self._last_bad), axis=0)
        if n:
            self._last_bad[:] = last_bad[-1]
        flags = index - last_bad <= self._holdoff
        if n:
            self.contaminated[:] = flags[-1]
        return flags
