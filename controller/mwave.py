"""Evoked M-wave amplitude per stimulated muscle, from delivered pulses and the raw EMG.

Pure (no I/O) and causal. For every delivered pulse on a stimulation channel, the
high-passed raw EMG of that channel's muscle is measured in
[pulse + window_start, pulse + window_end] (peak to peak or RMS) once the window's
last sample has arrived. The samples come from the raw signal, before blanking (the
blanker only builds the voluntary path's validity mask), through a ring buffer of the
recent high-passed signal, so a window may span any number of chunks and a pulse
message may arrive a little after its window started. Results do not depend on how
the signal is chunked.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from scipy import signal

from controller.buffers import Columns, fill_ring, read_ring, write_ring
from controller.dsp import NYQUIST_MARGIN, StreamingSos
from fesloop.config import MWaveConfig

HISTORY_S = 0.25  # how late a pulse message may arrive after its window started and still be measured
STEADY_TOLERANCE = 0.01  # pulses within 1 % of the same charge count as one steady stimulation level
_SNAP_SAMPLES = 1e-6  # a window edge this close to a sample counts as on it (float rounding of t * fs)


def window_amplitude_uv(x_uv: np.ndarray, method: str) -> float:
    """Peak-to-peak or RMS of one window's contiguous samples (NaN if any sample is unknown)."""
    if method == "rms":
        return math.sqrt(float(np.dot(x_uv, x_uv)) / len(x_uv))
    return float(np.max(x_uv) - np.min(x_uv))


class Measurement(NamedTuple):
    """One pulse's M-wave: when the pulse came, which muscle, its window's amplitude and that normalized."""

    pulse_time_s: float
    muscle: int
    amplitude_uv: float
    normalized: float  # NaN until the muscle has a reference


class MWaveEstimator:
    """Latest M-wave amplitude (uV, mean of the last pulses) and its normalization, per muscle.

    ``muscle_of_device`` maps a stimulator device channel to the muscle (column of the
    EMG handed to :meth:`process`) it stimulates; pulses on other channels are ignored.
    Only those muscles are filtered and kept: the others can have no M-wave.
    ``reference_uv`` per muscle normalizes to 1; where it is 0 the fresh reference is
    taken: the mean of the first ``reference_pulses`` M-waves evoked at one steady
    charge per pulse (the stimulator's ramp to the first level does not count).
    """

    def __init__(self, cfg: MWaveConfig, fs_hz: float, muscle_of_device: Mapping[int, int], reference_uv: np.ndarray) -> None:
        n_muscles = len(reference_uv)
        self.cfg = cfg
        self.fs_hz = fs_hz
        self._muscle_of_device = dict(muscle_of_device)
        self._start_samples = cfg.window_start_ms * 1e-3 * fs_hz
        self._end_samples = cfg.window_end_ms * 1e-3 * fs_hz
        stimulated = sorted(set(self._muscle_of_device.values()))
        self._all_stimulated = stimulated == list(range(n_muscles))
        self._stimulated = np.array(stimulated, dtype=np.intp)
        self._slot_of_muscle = {muscle: slot for slot, muscle in enumerate(stimulated)}  # column in the filter and ring
        self._picked = Columns(len(stimulated))
        sos = signal.butter(2, min(cfg.highpass_hz, NYQUIST_MARGIN * fs_hz), "highpass", fs=fs_hz, output="sos")
        self._highpass = StreamingSos(sos, len(stimulated), steady_start=True)
        self._step = max(int(HISTORY_S * fs_hz), 1)
        self._capacity = math.ceil(self._end_samples) + 2 + self._step
        self._history_uv = np.full((self._capacity, len(stimulated)), np.nan)
        self._window_uv = np.empty(self._capacity)
        self._next_index: int | None = None
        self._new_pulses: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending: list[tuple[int, int, int, float, float]] = []  # (first, last index, muscle, charge, pulse time)
        self.measurements: list[Measurement] = []  # every window measured, until taken
        self.recent_uv: list[deque[float]] = [deque(maxlen=cfg.smoothing_pulses) for _ in range(n_muscles)]
        self._steady_uv: list[list[float]] = [[] for _ in range(n_muscles)]
        self._steady_charge = np.full(n_muscles, np.nan)
        self.amplitude_uv = np.full(n_muscles, np.nan)
        self.reference_uv = np.where(np.asarray(reference_uv) > 0, reference_uv, np.nan).astype(np.float64)
        self.normalized = np.full(n_muscles, np.nan)
        self.measured = np.zeros(n_muscles, dtype=np.int64)
        self.missed = np.zeros(n_muscles, dtype=np.int64)

    def add_pulses(self, time_s: np.ndarray, device_channel: np.ndarray, charge_nc: np.ndarray | None = None) -> None:
        """Delivered pulses (shared-clock times); pulses of zero charge evoke nothing and are skipped.

        Without charges (a replayed pulse file) every pulse counts as the same steady level.
        """
        time_s = np.asarray(time_s, dtype=np.float64).ravel()
        muscle = np.array([self._muscle_of_device.get(int(c), -1) for c in np.asarray(device_channel).ravel()], dtype=np.int64)
        charge = np.ones(len(time_s)) if charge_nc is None else np.asarray(charge_nc, dtype=np.float64).ravel()
        keep = (muscle >= 0) & (charge > 0)
        if keep.any():
            self._new_pulses.append((time_s[keep], muscle[keep], charge[keep]))

    def process(self, first_index: int, first_time_s: float, raw_uv: np.ndarray) -> None:
        """Take the next block of raw EMG (n_samples, n_muscles), sample ``first_index`` at ``first_time_s``."""
        self._mark_gap(first_index)
        self._window_pulses(first_index, first_time_s)
        filtered_uv = self._highpass.process(raw_uv) if self._all_stimulated else self._filter_stimulated(raw_uv)
        # Measured in steps short enough that every window ending in a step is still in the ring.
        for start in range(0, raw_uv.shape[0], self._step):
            block_uv = filtered_uv[start : start + self._step]
            write_ring(self._history_uv, first_index + start, block_uv)
            self._next_index = first_index + start + len(block_uv)
            if self._pending and self._pending[0][1] < self._next_index:
                self._measure_ready(self._next_index)

    def _filter_stimulated(self, raw_uv: np.ndarray) -> np.ndarray:
        """The high-passed columns of the stimulated muscles (a reused buffer).

        Taken channel-major: with ``raw_uv`` in the :class:`Columns` layout (as the
        estimator hands it) both sides are contiguous and numpy needs no buffer.
        """
        filtered_uv = self._picked(raw_uv.shape[0])
        np.take(raw_uv.T, self._stimulated, axis=0, out=filtered_uv.T, mode="clip")
        self._highpass.filter_in_place(filtered_uv)
        return filtered_uv

    def _mark_gap(self, first_index: int) -> None:
        """Samples lost in a gap are unknown: windows that touch them are missed, not measured."""
        if self._next_index is None or first_index == self._next_index:
            return
        skipped = first_index - self._next_index
        fill_ring(self._history_uv, self._next_index, skipped if 0 < skipped < self._capacity else self._capacity, np.nan)

    def _window_pulses(self, first_index: int, first_time_s: float) -> None:
        """New pulses become windows of absolute sample indices (on this block's time base)."""
        for time_s, muscle, charge in self._new_pulses:
            offset = first_index + (time_s - first_time_s) * self.fs_hz
            first = np.ceil(offset + self._start_samples - _SNAP_SAMPLES).astype(np.int64)
            last = np.floor(offset + self._end_samples + _SNAP_SAMPLES).astype(np.int64)
            self._pending.extend(zip(first.tolist(), last.tolist(), muscle.tolist(), charge.tolist(), time_s.tolist()))
        self._new_pulses.clear()
        self._pending.sort()

    def _measure_ready(self, next_index: int) -> None:
        """Measure every pending window whose last sample (before ``next_index``) has arrived, in pulse order.

        Windows are sorted by first sample, hence by last sample too (they all have one length).
        """
        oldest = next_index - self._capacity
        ready = 0
        while ready < len(self._pending) and self._pending[ready][1] < next_index:
            first, last, muscle, charge, time_s = self._pending[ready]
            ready += 1
            amplitude_uv = math.nan
            if first >= oldest:
                slot = self._slot_of_muscle[muscle]
                window_uv = read_ring(self._history_uv[:, slot], first, self._window_uv[: last + 1 - first])
                amplitude_uv = window_amplitude_uv(window_uv, self.cfg.method)
            if math.isnan(amplitude_uv):
                self.missed[muscle] += 1
            else:
                self._record(muscle, amplitude_uv, charge)
                self.measurements.append(
                    Measurement(time_s, muscle, amplitude_uv, amplitude_uv / self.reference_uv[muscle])
                )
        del self._pending[:ready]

    def take_measurements(self) -> list[Measurement]:
        """The windows measured since the last call (the consumer publishes or writes them)."""
        taken, self.measurements = self.measurements, []
        return taken

    def _record(self, muscle: int, amplitude_uv: float, charge: float) -> None:
        self.measured[muscle] += 1
        recent = self.recent_uv[muscle]
        recent.append(amplitude_uv)
        self.amplitude_uv[muscle] = sum(recent) / len(recent)
        if math.isnan(self.reference_uv[muscle]):
            self._take_fresh_reference(muscle, amplitude_uv, charge)
        self.normalized[muscle] = self.amplitude_uv[muscle] / self.reference_uv[muscle]

    def _take_fresh_reference(self, muscle: int, amplitude_uv: float, charge: float) -> None:
        steady = self._steady_uv[muscle]
        if not abs(charge - self._steady_charge[muscle]) <= STEADY_TOLERANCE * self._steady_charge[muscle]:
            steady.clear()  # a new level (the ramp, a changed intensity): start counting again
            self._steady_charge[muscle] = charge
        steady.append(amplitude_uv)
        if len(steady) == self.cfg.reference_pulses:
            reference_uv = sum(steady) / len(steady)
            if reference_uv > 0:  # a flat line (lead off) measures 0: nothing to normalize by, wait for more
                self.reference_uv[muscle] = reference_uv
            else:
                steady.clear()

    def status(self, names: list[str]) -> dict[str, Any]:
        """Per muscle name: amplitude, reference, normalized (None until known) and pulse counts."""

        def known(x: float, digits: int) -> float | None:
            return None if math.isnan(x) else round(float(x), digits)

        return {
            name: {
                "amplitude_uv": known(self.amplitude_uv[i], 2),
                "reference_uv": known(self.reference_uv[i], 2),
                "normalized": known(self.normalized[i], 4),
                "measured": int(self.measured[i]),
                "missed": int(self.missed[i]),
            }
            for i, name in enumerate(names)
        }
