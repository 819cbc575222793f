"""The simulated patient: the default demo's amplifier, a virtual muscle per configured muscle.

Pure and deterministic (seeded): no I/O, no clock. Sample k is at
``start_time_s + k / sampling_rate_hz`` on the shared clock. Each muscle's surface EMG
is rest noise plus voluntary EMG that follows a scripted drive, mains interference and
a DC offset. Every delivered pulse adds a stimulation artifact (full size on the
stimulated muscle's channel, scaled by the crosstalk factor on the others) and an
M-wave on the stimulated muscle, whose size follows the recruitment curve and shrinks
as delivered charge fatigues the muscle.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.signal import butter, sosfilt
from scipy.special import expit

from controller.dsp import sosfilt_channels
from fesloop.config import SimulatedPatientConfig

_EMG_BAND_HZ = (20.0, 450.0)
_EMG_BAND_ORDER = 4
_WARMUP_S = 0.25  # noise filter run-in at construction, so the first sample is already stationary
_ARTIFACT_DECAYS = 10.0  # artifact window in decay constants; the cut tail is below 0.05 % of its peak
_SNAP_SAMPLES = 1e-6  # a time this close above a sample counts as on it (float rounding of t * fs)


def recruitment(amplitude_ma: float, cfg: SimulatedPatientConfig) -> float:
    """Fraction 0..1 of the muscle a pulse of this amplitude recruits (sigmoid in mA)."""
    return float(_recruitment(np.asarray(amplitude_ma, dtype=np.float64), cfg))


def _recruitment(amplitude_ma: np.ndarray, cfg: SimulatedPatientConfig) -> np.ndarray:
    return expit((amplitude_ma - cfg.recruitment_mid_ma) / cfg.recruitment_slope_ma)


def _raised_cosine(x_s: np.ndarray, ramp_s: float) -> np.ndarray:
    """0 -> 1 over ``ramp_s`` seconds from x = 0 (1 from there on; a step when ramp_s is 0)."""
    if ramp_s <= 0.0:
        return np.ones_like(x_s)
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(x_s / ramp_s, 0.0, 1.0))


class _Span(enum.Enum):
    """Where a block of samples lies against a contraction's windows."""

    OUTSIDE = "outside"  # in no window
    PLATEAU = "plateau"  # all in one window, past its rise and before its fall
    MIXED = "mixed"  # anything else: per sample


def _block_span(first_s: float, last_s: float, period_s: float, duration_s: float, ramp_s: float) -> _Span:
    """Classify [first_s, last_s] (seconds since the first start) against the windows
    [k period_s, k period_s + duration_s), k >= 0, whose ramps last ``ramp_s``."""
    newest_k = math.floor(last_s / period_s)  # the last window starting at or before the block's end
    oldest_k = max(math.floor((first_s - duration_s) / period_s) + 1, 0)  # the first one ending after its start
    if newest_k < oldest_k:
        return _Span.OUTSIDE
    if newest_k == oldest_k:
        local_first_s, local_last_s = first_s - newest_k * period_s, last_s - newest_k * period_s
        if local_first_s >= ramp_s and local_last_s <= duration_s - ramp_s:
            return _Span.PLATEAU
    return _Span.MIXED


class SimulatedPatient:
    """Virtual muscles whose surface EMG follows a scripted drive and answers delivered pulses.

    ``render`` must be called with consecutive blocks; the output is the same whatever
    the block sizes, because noise is drawn row-major from one seeded generator, the
    band-pass filter keeps its state across blocks and everything else is a function of
    the sample index. Pulses are registered with ``add_pulses``; a pulse registered after
    its waveform started contributes only the samples not yet rendered.
    """

    def __init__(
        self,
        cfg: SimulatedPatientConfig,
        muscles: Sequence[str],
        channel_to_muscle: Mapping[int, int],
        start_time_s: float,
    ) -> None:
        names = list(muscles)
        if not names:
            raise ValueError("the simulated patient needs at least one muscle")
        n_muscles = len(names)
        for channel, muscle in channel_to_muscle.items():
            if channel < 0 or not 0 <= muscle < n_muscles:
                raise ValueError(
                    f"channel_to_muscle[{channel}] = {muscle}: needs channel >= 0 and 0 <= muscle < {n_muscles}"
                )
        self._contractions: list[tuple[int, float, float, float]] = []
        for contraction in cfg.contractions:
            if contraction.muscle not in names:
                raise ValueError(f"contraction of {contraction.muscle!r}: not one of the muscles {names}")
            self._contractions.append(
                (names.index(contraction.muscle), contraction.start_s, contraction.duration_s, contraction.level)
            )
        self._cfg = cfg
        self._fs = float(cfg.sampling_rate_hz)
        self._start_time_s = float(start_time_s)
        self._n_muscles = n_muscles
        self._muscle_of_channel = np.full(max(channel_to_muscle, default=-1) + 1, -1, dtype=np.int64)
        for channel, muscle in channel_to_muscle.items():
            self._muscle_of_channel[channel] = muscle

        # Two independent unit-rms band-limited noise sources per muscle: rest, voluntary.
        high_hz = min(_EMG_BAND_HZ[1], 0.45 * self._fs)
        self._sos = butter(_EMG_BAND_ORDER, (_EMG_BAND_HZ[0], high_hz), btype="bandpass", fs=self._fs, output="sos")
        impulse = np.zeros(int(2 * self._fs))
        impulse[0] = 1.0
        self._noise_gain = 1.0 / math.sqrt(float(np.sum(sosfilt(self._sos, impulse) ** 2)))
        self._rng = np.random.default_rng(cfg.seed)
        zi = np.zeros((self._sos.shape[0], 2, 2 * n_muscles))
        warmup = self._rng.standard_normal((int(_WARMUP_S * self._fs), 2 * n_muscles))
        _, zi = sosfilt(self._sos, warmup, axis=0, zi=zi)
        self._zi = np.ascontiguousarray(zi.transpose(2, 0, 1))  # (2 n_muscles, n_sections, 2) for the kernel

        # Artifact: sample-locked (1 - x) exp(-x), x in decay constants: peak at the pulse sample, one undershoot.
        decay_samples = cfg.artifact_decay_ms * 1e-3 * self._fs
        x = np.arange(math.ceil(_ARTIFACT_DECAYS * decay_samples) + 1) / decay_samples
        self._artifact_shape = (1.0 - x) * np.exp(-x)
        self._artifact_gain = np.full((n_muscles, n_muscles), cfg.artifact_crosstalk)
        np.fill_diagonal(self._artifact_gain, 1.0)
        self._mwave_s = cfg.mwave_duration_ms * 1e-3
        mwave_len = math.ceil(self._mwave_s * self._fs) + 1
        self._pulse_dtype = np.dtype(
            [
                ("muscle", np.int64),
                ("artifact_start", np.int64),  # first sample at or after the pulse
                ("artifact_uv", np.float64),
                ("mwave_start", np.int64),  # first sample at or after pulse + latency
                ("mwave_uv", np.float64, (mwave_len,)),  # the M-wave sampled from mwave_start on
                ("end", np.int64),  # first sample after both waveforms
            ]
        )
        self._pending = np.empty(0, dtype=self._pulse_dtype)
        self._charge_uc = np.zeros(n_muscles)
        self._next_index = 0

        self._capacity = 0
        self._reserve(int(0.05 * self._fs))

    @property
    def sampling_rate_hz(self) -> float:
        return self._fs

    def add_pulses(
        self, channel: np.ndarray, time_s: np.ndarray, amplitude_ma: np.ndarray, pulse_width_us: np.ndarray
    ) -> None:
        """Register delivered pulses (shared-clock times); unknown channels and zero amplitude are ignored.

        Each pulse's M-wave is scaled by the fatigue of its muscle just before it, then
        its charge (amplitude x pulse width) is added to the muscle's total, so fatigue
        counts pulses whose waveforms are already over too.
        """
        channel = np.asarray(channel, dtype=np.int64).ravel()
        time_s = np.asarray(time_s, dtype=np.float64).ravel()
        amplitude_ma = np.asarray(amplitude_ma, dtype=np.float64).ravel()
        pulse_width_us = np.asarray(pulse_width_us, dtype=np.float64).ravel()
        known = (channel >= 0) & (channel < self._muscle_of_channel.size)
        muscle = np.full(channel.shape, -1, dtype=np.int64)
        muscle[known] = self._muscle_of_channel[channel[known]]
        keep = np.flatnonzero((muscle >= 0) & (amplitude_ma > 0.0))
        keep = keep[np.argsort(time_s[keep], kind="stable")]
        muscle, time_s, amplitude_ma = muscle[keep], time_s[keep], amplitude_ma[keep]
        charge_uc = amplitude_ma * pulse_width_us[keep] * 1e-3  # mA * us = nC

        charge_before_uc = np.empty_like(charge_uc)
        for m in np.unique(muscle):
            mine = muscle == m
            running_uc = self._charge_uc[m] + np.cumsum(charge_uc[mine])
            charge_before_uc[mine] = np.concatenate(([self._charge_uc[m]], running_uc[:-1]))
            self._charge_uc[m] = running_uc[-1]
        fatigue = np.exp(-charge_before_uc / self._cfg.fatigue_charge_uc)

        cfg, fs = self._cfg, self._fs
        pulses = np.empty(keep.size, dtype=self._pulse_dtype)
        offset = (time_s - self._start_time_s) * fs  # in samples
        pulses["muscle"] = muscle
        pulses["artifact_start"] = np.ceil(offset - _SNAP_SAMPLES)
        pulses["artifact_uv"] = cfg.artifact_uv_per_ma * amplitude_ma
        mwave_onset = offset + cfg.mwave_latency_ms * 1e-3 * fs
        pulses["mwave_start"] = np.ceil(mwave_onset - _SNAP_SAMPLES)
        mwave_len = self._pulse_dtype["mwave_uv"].shape[0]
        age_s = (pulses["mwave_start"][:, None] + np.arange(mwave_len) - mwave_onset[:, None]) / fs
        peak_uv = cfg.mwave_max_uv * _recruitment(amplitude_ma, cfg) * fatigue
        pulses["mwave_uv"] = peak_uv[:, None] * np.sin(2.0 * np.pi * age_s / self._mwave_s) * (age_s < self._mwave_s)
        pulses["end"] = np.maximum(
            pulses["artifact_start"] + self._artifact_shape.size, pulses["mwave_start"] + mwave_len
        )
        self._pending = np.concatenate((self._pending, pulses[pulses["end"] > self._next_index]))

    def drive(self, first_index: int, out: np.ndarray) -> None:
        """Fill ``out`` (n, n_muscles) with the scripted voluntary drive 0..1 from sample ``first_index`` on.

        A contraction is active on [start_s, start_s + duration_s) of every schedule period
        (counted from sample 0; windows may run over into the next period, none before the
        first start), with raised-cosine ramps inside the window. Overlaps take the maximum.
        A block wholly outside every window or wholly on a plateau skips the per-sample
        formula (same values: outside adds nothing, a plateau is exactly ``level``).
        """
        n = out.shape[0]
        self._reserve(n)
        out[:] = 0.0
        if n == 0:
            return
        t_s = (first_index + self._offsets[:n]) / self._fs
        period_s = self._cfg.schedule_period_s
        margin_s = 1.0 / self._fs  # far beyond the rounding of the sample times
        first_s, last_s = float(t_s[0]) - margin_s, float(t_s[-1]) + margin_s
        for muscle, start_s, duration_s, level in self._contractions:
            ramp_s = min(self._cfg.drive_ramp_ms * 1e-3, duration_s / 2)
            span = _block_span(first_s - start_s, last_s - start_s, period_s, duration_s, ramp_s)
            if span is _Span.OUTSIDE:
                continue
            if span is _Span.PLATEAU:
                np.maximum(out[:, muscle], level, out=out[:, muscle])
                continue
            since_s = t_s - start_s
            cycle = np.floor(since_s / period_s)
            for back in range(math.ceil(duration_s / period_s)):
                local_s = since_s - (cycle - back) * period_s
                active = (cycle - back >= 0) & (local_s < duration_s)
                level_now = level * _raised_cosine(local_s, ramp_s) * _raised_cosine(duration_s - local_s, ramp_s)
                np.maximum(out[:, muscle], level_now * active, out=out[:, muscle])

    def render(self, first_index: int, out: np.ndarray, drive_out: np.ndarray | None = None) -> None:
        """Fill ``out`` (n, n_muscles) float32 with EMG in uV; blocks must be consecutive.

        ``drive_out`` (same shape, float32), if given, receives the drive behind it
        (what :meth:`drive` gives, without computing it twice).
        """
        if first_index != self._next_index:
            raise ValueError(f"render expects sample {self._next_index} next, got {first_index}")
        n = out.shape[0]
        if out.shape != (n, self._n_muscles):
            raise ValueError(f"out has shape {out.shape}, expected (n, {self._n_muscles})")
        if n == 0:
            return
        self._reserve(n)
        cfg, m = self._cfg, self._n_muscles
        white = self._white[:n]
        self._rng.standard_normal(out=white)  # row-major draws: the same noise whatever the block sizes
        band = np.array(white.T, order="C")  # (2 n_muscles, n), filtered in place
        sosfilt_channels(self._sos, band, self._zi)
        drive = self._drive[:n]
        self.drive(first_index, drive)
        if drive_out is not None:
            drive_out[:] = drive
        emg_uv = band[:m].T * (cfg.rest_noise_uv * self._noise_gain)
        emg_uv += band[m:].T * (drive * (cfg.full_drive_uv * self._noise_gain))
        mains_phase = np.mod((first_index + self._offsets[:n]) * (cfg.mains_hz / self._fs), 1.0)
        emg_uv += (cfg.mains_uv * np.sin(2.0 * np.pi * mains_phase) + cfg.dc_offset_uv)[:, None]
        self._add_pulse_waveforms(first_index, emg_uv)
        out[:] = emg_uv
        self._next_index += n
        if self._pending.size:
            self._pending = self._pending[self._pending["end"] > self._next_index]

    def _add_pulse_waveforms(self, first_index: int, emg_uv: np.ndarray) -> None:
        """Add the artifacts and M-waves of the pending pulses that reach into this block to ``emg_uv``.

        Pulse by pulse (a few are pending at a time), on the rows of the block each
        waveform covers: the artifact on every channel through the crosstalk gains of
        the stimulated muscle, the M-wave on that muscle only.
        """
        n = emg_uv.shape[0]
        end = first_index + n
        shape = self._artifact_shape
        for pulse in self._pending[self._pending["artifact_start"] < end]:  # the artifact comes first
            muscle = int(pulse["muscle"])
            start = int(pulse["artifact_start"])
            low, high = max(first_index, start), min(end, start + shape.size)
            if low < high:
                artifact_uv = self._pulse_uv[: high - low]
                np.multiply.outer(
                    pulse["artifact_uv"] * shape[low - start : high - start], self._artifact_gain[muscle], out=artifact_uv
                )
                emg_uv[low - first_index : high - first_index] += artifact_uv
            mwave_uv = pulse["mwave_uv"]
            start = int(pulse["mwave_start"])
            low, high = max(first_index, start), min(end, start + mwave_uv.size)
            if low < high:
                emg_uv[low - first_index : high - first_index, muscle] += mwave_uv[low - start : high - start]

    def _reserve(self, n: int) -> None:
        """Grow the per-block work buffers to hold ``n`` samples (allocates only when a block is larger)."""
        if n <= self._capacity:
            return
        self._capacity = n
        self._offsets = np.arange(n, dtype=np.int64)
        self._white = np.empty((n, 2 * self._n_muscles))
        self._drive = np.empty((n, self._n_muscles), dtype=np.float32)
        self._pulse_uv = np.empty((n, self._n_muscles))  # one pulse's artifact on the rows of a block
