"""Stimulation artifact windows: which samples lie within [pulse - pre, pulse + post].

Pure: pulse times in, a validity mask out. Pulses come from the stimulator's
``pulses`` stream; every EMG channel is blanked around every pulse, because the
artifact reaches all electrodes on the limb.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from controller.buffers import Rows


class Blanker:
    """Remembers recent pulse times and marks the samples their windows cover."""

    def __init__(self, pre_s: float, post_s: float, capacity: int = 1024) -> None:
        self.pre_s = pre_s
        self.post_s = post_s
        self._pulse_times_s: deque[float] = deque(maxlen=capacity)
        self.blanked_samples = 0
        self._valid = Rows(dtype=bool)

    def add_pulses(self, times_s: np.ndarray) -> None:
        self._pulse_times_s.extend(float(t) for t in times_s)

    def valid_mask(self, first_sample_time_s: float, fs_hz: float, n_samples: int) -> np.ndarray:
        """True for samples outside every artifact window, shape (n_samples,): a view the next call overwrites."""
        valid = self._valid(n_samples)
        valid[:] = True
        last_time_s = first_sample_time_s + (n_samples - 1) / fs_hz
        # Half a sample of slack: float rounding must not drop a window's last sample.
        while self._pulse_times_s and self._pulse_times_s[0] + self.post_s < first_sample_time_s - 0.5 / fs_hz:
            self._pulse_times_s.popleft()
        blanked = False
        for pulse_s in self._pulse_times_s:
            if pulse_s - self.pre_s > last_time_s + 0.5 / fs_hz:
                continue
            start = math.ceil((pulse_s - self.pre_s - first_sample_time_s) * fs_hz - 1e-9)
            stop = math.floor((pulse_s + self.post_s - first_sample_time_s) * fs_hz + 1e-9) + 1
            valid[max(start, 0) : max(stop, 0)] = False
            blanked = True
        if blanked:
            self.blanked_samples += int(n_samples - np.count_nonzero(valid))
        return valid
