"""Causal streaming EMG processing: filters with kept state, blanking-aware envelope.

Everything here is pure: arrays in, arrays out, state in the objects. Chunked
processing gives exactly what one-shot ``scipy.signal.sosfilt`` gives on the whole
signal, so a recording replayed offline matches the live loop.
"""

from __future__ import annotations

import numpy as np
from scipy import signal
from scipy.signal._sosfilt import _sosfilt  # the kernel behind signal.sosfilt, without its per-call overhead

from fesloop.config import FilterConfig

NYQUIST_MARGIN = 0.45  # cutoffs are clipped to this fraction of the sampling rate


def design_emg_sos(fs_hz: float, cfg: FilterConfig) -> np.ndarray:
    """High-pass, mains notches (with harmonics) and band-pass as one SOS cascade."""
    top_hz = NYQUIST_MARGIN * fs_hz
    sections = [signal.butter(2, min(cfg.highpass_hz, top_hz), "highpass", fs=fs_hz, output="sos")]
    if cfg.notch_hz > 0:
        for k in range(1, cfg.notch_harmonics + 1):
            f_hz = k * cfg.notch_hz
            if f_hz < top_hz:
                b, a = signal.iirnotch(f_hz, cfg.notch_q, fs=fs_hz)
                sections.append(signal.tf2sos(b, a))
    low_hz, high_hz = cfg.bandpass_hz[0], min(cfg.bandpass_hz[1], top_hz)
    if low_hz < high_hz:
        sections.append(signal.butter(cfg.order, [low_hz, high_hz], "bandpass", fs=fs_hz, output="sos"))
    return np.vstack(sections)


def design_envelope_sos(fs_hz: float, cutoff_hz: float) -> np.ndarray:
    """Second-order Butterworth low-pass for the rectified EMG.

    Its group delay near DC is about 0.225 / cutoff_hz seconds (e.g. ~37 ms at 6 Hz):
    the price of a smooth envelope, and the main part of detection latency.
    """
    return signal.butter(2, min(cutoff_hz, NYQUIST_MARGIN * fs_hz), "lowpass", fs=fs_hz, output="sos")


def sosfilt_channels(sos: np.ndarray, x: np.ndarray, zi: np.ndarray) -> None:
    """Filter ``x`` (n_channels, n_samples) in place, state ``zi`` (n_channels, n_sections, 2) in place.

    Both float64 C-contiguous; ``sos`` float64. The same kernel and arithmetic as
    ``scipy.signal.sosfilt`` (so bit-identical results), minus its validation,
    axis moves and copies, which cost ~10x the filtering itself on 1-10 ms chunks.
    """
    _sosfilt(sos, x, zi)


class StreamingSos:
    """An SOS filter over (n_samples, n_channels) blocks, state carried between blocks.

    With ``steady_start`` the state is initialised, on the first block, to the steady
    state for a constant input equal to the first sample, so a DC offset does not
    make the filter ring at start (one-shot equivalent: ``zi=sosfilt_zi(sos) * x[0]``).
    """

    def __init__(self, sos: np.ndarray, n_channels: int, steady_start: bool = False) -> None:
        self.sos = np.ascontiguousarray(sos, dtype=np.float64)
        self._zi_unit = signal.sosfilt_zi(self.sos)[np.newaxis]  # (1, n_sections, 2)
        self._zi = np.zeros((n_channels, self.sos.shape[0], 2))  # channel-major, as the kernel wants it
        self._steady_start = steady_start
        self._started = False

    def process(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros(x.shape)
        if not self._started:
            self._started = True
            if self._steady_start:
                self._zi[:] = self._zi_unit * x[0][:, np.newaxis, np.newaxis]
        y = np.array(x.T, dtype=np.float64, order="C")  # the output: (n_channels, n_samples), filtered in place
        sosfilt_channels(self.sos, y, self._zi)
        return y.T


def forward_fill(x: np.ndarray, valid: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Replace invalid samples by the last valid sample of their channel.

    ``previous`` is the last valid value before this block, per channel; it is updated
    in place. Holding the raw value keeps blanked artifacts out of the IIR filters
    without the step a zero-fill would cause on a DC-offset signal.
    """
    n = x.shape[0]
    index = np.where(valid, np.arange(n)[:, np.newaxis], -1)
    np.maximum.accumulate(index, axis=0, out=index)
    filled = np.where(index >= 0, np.take_along_axis(x, np.maximum(index, 0), axis=0), previous)
    has_valid = index[-1] >= 0
    previous[has_valid] = filled[-1, has_valid]
    return filled


class EnvelopeEstimator:
    """Per-channel envelope of EMG: hold blanked samples, band filter, rectify, low-pass.

    Blanked samples never reach the envelope: the raw signal is held across them
    before the band filter (so artifacts cannot make it ring), and the envelope
    low-pass runs on valid samples only, holding its value across blanked ones. Under
    heavy blanking the low-pass therefore sees fewer samples per second: its delay in
    real time grows by 1 / (share of valid samples). ``valid`` is one mask per sample,
    shared by all channels (an artifact reaches every electrode on the limb).
    """

    def __init__(self, fs_hz: float, n_channels: int, cfg: FilterConfig) -> None:
        self.fs_hz = fs_hz
        self._band = StreamingSos(design_emg_sos(fs_hz, cfg), n_channels, steady_start=True)
        self._lowpass = StreamingSos(design_envelope_sos(fs_hz, cfg.envelope_lowpass_hz), n_channels)
        self._tkeo = cfg.tkeo
        self._tkeo_history = np.zeros((2, n_channels))
        self._held_uv = np.zeros(n_channels)
        self._have_held = False
        self.last_envelope_uv = np.zeros(n_channels)

    def hold(self, emg_uv: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raw EMG with blanked samples held at the last valid raw value."""
        x = np.asarray(emg_uv, dtype=np.float64)
        if valid.all():  # the common case: nothing to hold
            if len(x):
                self._held_uv[:] = x[-1]
                self._have_held = True
            return x
        if not self._have_held and valid.any():
            self._held_uv[:] = x[int(np.argmax(valid))]
            self._have_held = True
        return forward_fill(x, np.broadcast_to(valid[:, np.newaxis], x.shape), self._held_uv)

    def band(self, held_uv: np.ndarray) -> np.ndarray:
        """High-pass, notches and band-pass, state kept across blocks."""
        return self._band.process(held_uv)

    def envelope(self, filtered_uv: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Rectified (or sqrt|TKEO|) and low-passed over valid samples; held across the others."""
        rectified = self._teager(filtered_uv) if self._tkeo else np.abs(filtered_uv)
        if valid.all():  # the common case: nothing to hold
            smoothed = self._lowpass.process(rectified)
            if len(smoothed):
                self.last_envelope_uv[:] = smoothed[-1]
            return smoothed
        smoothed = self._lowpass.process(rectified[valid])
        held = np.vstack((self.last_envelope_uv[np.newaxis], smoothed))
        self.last_envelope_uv[:] = held[-1]
        return held[np.cumsum(valid)]

    def _teager(self, x: np.ndarray) -> np.ndarray:
        """Causal sqrt|TKEO|: sqrt|x[n-1]^2 - x[n] x[n-2]| (one sample late), in uV."""
        joined = np.concatenate((self._tkeo_history, x))
        self._tkeo_history[:] = joined[-2:]
        return np.sqrt(np.abs(joined[1:-1] ** 2 - joined[2:] * joined[:-2]))

    def process(self, emg_uv: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Envelope (uV) for a block; ``valid`` is (n_samples,) bool."""
        return self.envelope(self.band(self.hold(emg_uv, valid)), valid)


def normalize(envelope_uv: np.ndarray, rest_uv: np.ndarray, mvc_uv: np.ndarray) -> np.ndarray:
    """Activation 0..1 from calibration: 0 at the rest level, 1 at MVC."""
    return np.clip((envelope_uv - rest_uv) / (mvc_uv - rest_uv), 0.0, 1.0)
