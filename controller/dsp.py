"""Causal streaming EMG processing: filters with kept state, blanking-aware envelope.

Everything here is pure: arrays in, arrays out, state in the objects. Chunked
processing gives exactly what one-shot ``scipy.signal.sosfilt`` gives on the whole
signal, so a recording replayed offline matches the live loop.
"""

from __future__ import annotations

import numpy as np
from scipy import signal
from scipy.signal._sosfilt import _sosfilt  # the kernel behind signal.sosfilt, without its per-call overhead

from controller.buffers import Columns, Rows
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
        self._zi_unit = signal.sosfilt_zi(self.sos)  # (n_sections, 2)
        self._zi = np.zeros((n_channels, self.sos.shape[0], 2))  # channel-major, as the kernel wants it
        self._restart_zi = np.zeros_like(self._zi)
        self._out = Columns(n_channels)
        self._steady_start = steady_start
        self._started = False

    def process(self, x: np.ndarray) -> np.ndarray:
        """The filtered block (n_samples, n_channels): a view the next call overwrites."""
        y = self._out(x.shape[0])
        np.copyto(y, x)
        self.filter_in_place(y)
        return y

    def restart(self, channels: np.ndarray, level: np.ndarray) -> None:
        """The state of ``channels`` (bool per channel) set to the steady state for a constant input at
        ``level`` (per channel): whatever those channels were ringing with is forgotten."""
        np.multiply(self._zi_unit, level[:, np.newaxis, np.newaxis], out=self._restart_zi)
        np.copyto(self._zi, self._restart_zi, where=channels[:, np.newaxis, np.newaxis])
        self._started = True

    def filter_in_place(self, y: np.ndarray) -> None:
        """Filter a float64 (n_samples, n_channels) block in the :class:`Columns` layout, in place."""
        if not y.shape[0]:
            return
        if not self._started:
            self._started = True
            if self._steady_start:
                np.multiply(self._zi_unit, y[0, :, np.newaxis, np.newaxis], out=self._zi)
        sosfilt_channels(self.sos, y.T, self._zi)


class EnvelopeEstimator:
    """Per-channel envelope of EMG: hold blanked samples, band filter, rectify, low-pass.

    Blanked samples never reach the envelope: the raw signal is held across them
    before the band filter (so artifacts cannot make it ring), and the envelope
    low-pass runs on valid samples only, holding its value across blanked ones. Under
    heavy blanking the low-pass therefore sees fewer samples per second: its delay in
    real time grows by 1 / (share of valid samples). ``valid`` is one mask per sample,
    shared by all channels (an artifact reaches every electrode on the limb).

    The arrays returned are views of buffers that the next block overwrites.
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
        self._zeros = np.zeros(n_channels)
        self._edges = Rows(dtype=bool)
        self._held = Columns(n_channels)
        self._rectified = Columns(n_channels)
        self._valid_only = Columns(n_channels)
        self._envelope = Columns(n_channels)
        self._teager_terms = (Columns(n_channels), Columns(n_channels), Columns(n_channels))

    def valid_runs(self, valid: np.ndarray) -> list[int] | None:
        """Edges of the runs of valid samples in a block: [start, stop, start, stop, ...] (a few
        per block); None when every sample is valid (the common case: nothing to hold).

        Computed once per block for :meth:`hold` and :meth:`envelope`.
        """
        if valid.all():
            return None
        n = len(valid)
        edges = self._edges(n + 1)
        edges[0], edges[n] = valid[0], valid[-1]
        np.not_equal(valid[1:], valid[:-1], out=edges[1:n])
        return np.flatnonzero(edges).tolist()

    def hold(self, emg_uv: np.ndarray, runs: list[int] | None) -> np.ndarray:
        """Raw EMG with blanked samples (outside ``runs``, see :meth:`valid_runs`) held at the last valid raw value."""
        x = np.asarray(emg_uv, dtype=np.float64)
        n = x.shape[0]
        if runs is None:
            if n:
                self._held_uv[:] = x[-1]
                self._have_held = True
            return x
        if not self._have_held and runs:
            self._held_uv[:] = x[runs[0]]
            self._have_held = True
        held = self._held(n)
        np.copyto(held, x)
        for start, stop in zip([0, *runs[1::2]], [*runs[::2], n]):  # the blanked stretches
            if start:
                self._held_uv[:] = held[start - 1]  # (a row of held itself would make numpy copy the whole fill)
            held[start:stop] = self._held_uv
        self._held_uv[:] = held[-1]
        return held

    def restart(self, channels: np.ndarray, input_uv: np.ndarray) -> None:
        """Forget the filters' past on ``channels`` (bool per channel): band filters at rest for a constant
        input at ``input_uv``, envelope 0. Where contamination ends, so what a railed or jumping signal
        set ringing (a 50 Hz notch with Q 30 rings for over a second) is not read as activation."""
        self._band.restart(channels, input_uv)
        self._lowpass.restart(channels, self._zeros)
        np.copyto(self._tkeo_history, 0.0, where=channels)
        np.copyto(self.last_envelope_uv, 0.0, where=channels)

    def band(self, held_uv: np.ndarray) -> np.ndarray:
        """High-pass, notches and band-pass, state kept across blocks."""
        return self._band.process(held_uv)

    def envelope(self, filtered_uv: np.ndarray, runs: list[int] | None) -> np.ndarray:
        """Rectified (or sqrt|TKEO|) and low-passed over the valid samples (``runs``, see
        :meth:`valid_runs`); held across the others."""
        n = filtered_uv.shape[0]
        if self._tkeo:
            rectified = self._teager(filtered_uv)
        else:
            rectified = self._rectified(n)
            np.abs(filtered_uv, out=rectified)
        if runs is None:
            self._lowpass.filter_in_place(rectified)
            if n:
                self.last_envelope_uv[:] = rectified[-1]
            return rectified
        smoothed = self._valid_only(sum(runs[1::2]) - sum(runs[::2]))  # the valid samples, back to back
        at = 0
        for start, stop in zip(runs[::2], runs[1::2]):
            smoothed[at : at + stop - start] = rectified[start:stop]
            at += stop - start
        self._lowpass.filter_in_place(smoothed)
        envelope = self._envelope(n)
        at, previous = 0, 0  # previous: where the last valid run ended
        for start, stop in zip(runs[::2], runs[1::2]):
            envelope[previous:start] = self.last_envelope_uv  # held across the blanked stretch
            envelope[start:stop] = smoothed[at : at + stop - start]
            at, previous = at + stop - start, stop
            self.last_envelope_uv[:] = envelope[stop - 1]
        envelope[previous:] = self.last_envelope_uv
        return envelope

    def _teager(self, x: np.ndarray) -> np.ndarray:
        """Causal sqrt|TKEO|: sqrt|x[n-1]^2 - x[n] x[n-2]| (one sample late), in uV."""
        n = x.shape[0]
        joined, product, square = (terms(n + 2) for terms in self._teager_terms)
        joined[:2] = self._tkeo_history  # rows 0, 1: the last two samples of the previous block
        joined[2:] = x
        self._tkeo_history[:] = joined[n:]
        # On the channels laid end to end (contiguous, so numpy needs no buffer): entry i of a
        # channel is sample i - 2. The two entries that straddle channels are never read.
        flat, flat_product, flat_square = (np.reshape(a.T, -1, copy=False) for a in (joined, product, square))
        np.multiply(flat[2:], flat[:-2], out=flat_product[:-2])
        np.square(flat[1:-1], out=flat_square[:-2])
        used = flat_square[:-2]
        np.subtract(used, flat_product[:-2], out=used)
        np.abs(used, out=used)
        np.sqrt(used, out=used)
        out = self._rectified(n)
        np.copyto(out, square[:n])
        return out

    def process(self, emg_uv: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Envelope (uV) for a block; ``valid`` is (n_samples,) bool."""
        runs = self.valid_runs(valid)
        return self.envelope(self.band(self.hold(emg_uv, runs)), runs)


class Normalization:
    """Activation 0..1 from a calibration: 0 at the rest level, 1 at MVC."""

    def __init__(self, rest_uv: np.ndarray, mvc_uv: np.ndarray) -> None:
        self.rest_uv = np.asarray(rest_uv, dtype=np.float64)
        self._span_uv = np.asarray(mvc_uv, dtype=np.float64) - self.rest_uv

    def __call__(self, envelope_uv: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.subtract(envelope_uv, self.rest_uv, out=out)
        np.divide(out, self._span_uv, out=out)
        return np.clip(out, 0.0, 1.0, out=out)
