"""fesloop's own XDF recordings as input: the raw EMG stream and the delivered pulses.

Used by ``fesloop replay`` and ``fesloop convert``. The EMG stream is the one of type
``EMG`` (or the one named); its nominal rate is the sampling rate. Lost samples are
never filled: they are reported as gaps, with each sample's index on the recording's
own grid. In fesloop's own recordings the acquisition marked every gap (``gap N
samples``, from the amplifier's package counter); in another app's they are found from
the timestamps.

Timestamps are late by a varying delay (a chunk is stamped when it reaches a host)
and drift (the amplifier's clock against the host's). Their lower envelope, the
least lead of the timestamps over the sample count within ``LEVEL_WINDOW_S``, is
the least-delayed estimate of the true sample times: across a gap it rises by the
samples lost, and sample times follow it (drift kept, delay jitter gone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import minimum_filter1d

from fesloop.xdf_session import Session, Stream, load_session

GAP_MARKER = re.compile(r"gap (\d+) samples")  # the acquisition's marker at the first sample after a gap
LEVEL_WINDOW_S = 0.25  # the lower envelope of the timestamps is taken over this long (many chunks)
RISE_SAMPLES = 0.75  # an envelope rise this large (in samples) across a step is a gap; drift adds ~fs x window x ppm
RISE_MIN_S = 0.3e-3  # ... and at least this long: at 4 kHz and above, timestamp corrections alone move it a sample


class XdfInputError(ValueError):
    """The XDF file has no usable EMG stream (the message names what it has)."""


@dataclass(frozen=True)
class XdfEmg:
    """The raw EMG of a recording, and the pulses delivered during it (times from its first sample)."""

    emg_uv: np.ndarray  # float32 (n_samples, n_channels)
    fs_hz: float
    sample_index: np.ndarray  # int64 (n_samples,): position on the recording's sample grid (gaps skip)
    sample_time_s: np.ndarray  # (n_samples,) from the first sample, on the recording's clock (drift kept, jitter not)
    labels: list[str]
    pulse_time_s: np.ndarray
    pulse_channel: np.ndarray
    pulse_amplitude_ma: np.ndarray
    pulse_width_us: np.ndarray

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """(first missing sample index, number missing) of every gap."""
        steps = np.diff(self.sample_index)
        at = np.flatnonzero(steps > 1)
        return [(int(self.sample_index[i] + 1), int(steps[i] - 1)) for i in at]


def sample_indices(times_s: np.ndarray, fs_hz: float) -> np.ndarray:
    """Each sample's index on the grid of the first one: consecutive unless the timestamps show a gap.

    Across a gap of n samples the lower envelope of the timestamps' lead over the
    sample count (before the boundary vs after it) rises by n; a late chunk followed
    by an early one does not move it. The gap is put where the rise first reaches its
    top (within a chunk or two when the delay jitters by more than the gap); gaps
    closer together than ``LEVEL_WINDOW_S`` are reported as one, with all their samples;
    in the last ``LEVEL_WINDOW_S`` of a recording samples are taken as consecutive.
    """
    if not len(times_s):
        return np.zeros(0, dtype=np.int64)
    lead = _lead_samples(times_s, fs_hz, np.arange(len(times_s)))
    window = _window(fs_hz)
    rise = (_leading_min(lead, window) - _trailing_min(lead, window))[:-1]  # per boundary i | i + 1
    rise[max(len(rise) - window, 0) :] = 0.0  # too few samples after these to judge the envelope
    jumps = np.ones(len(rise), dtype=np.int64)
    threshold = max(RISE_SAMPLES, RISE_MIN_S * fs_hz)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], rise > threshold, [0])).astype(np.int8)))
    for start, stop in zip(edges[::2], edges[1::2]):
        top = rise[start:stop].max()
        at = start + int(np.argmax(rise[start:stop] >= top - 0.5))
        jumps[at] += max(int(np.rint(top)), 1)
    return np.concatenate(([0], np.cumsum(jumps))).astype(np.int64)


def sample_times(times_s: np.ndarray, sample_index: np.ndarray, fs_hz: float) -> np.ndarray:
    """Each sample's time from the first timestamp: the timestamps' lower envelope (drift kept, jitter not)."""
    if not len(times_s):
        return np.zeros(0)
    lead = _lead_samples(times_s, fs_hz, sample_index)
    return (sample_index + minimum_filter1d(lead, _window(fs_hz), mode="nearest")) / fs_hz


def _lead_samples(times_s: np.ndarray, fs_hz: float, sample_index: np.ndarray) -> np.ndarray:
    """How far (in samples) each timestamp is ahead of its place on the grid."""
    return (np.asarray(times_s, dtype=np.float64) - times_s[0]) * fs_hz - sample_index


def _window(fs_hz: float) -> int:
    return max(int(LEVEL_WINDOW_S * fs_hz), 1)


def _trailing_min(x: np.ndarray, size: int) -> np.ndarray:
    """``out[i] = min(x[i - size + 1 : i + 1])`` (fewer at the start)."""
    return minimum_filter1d(x, size, mode="nearest", origin=(size - 1) // 2)


def _leading_min(x: np.ndarray, size: int) -> np.ndarray:
    """``out[i] = min(x[i + 1 : i + 1 + size])`` (fewer at the end; the last one is x[-1])."""
    out = np.empty_like(x)
    out[:-1] = minimum_filter1d(x, size, mode="nearest", origin=-(size // 2))[1:]
    out[-1:] = x[-1:]
    return out


def _emg_stream(session: Session, name: str) -> Stream:
    available = ", ".join(f"{s.name} ({s.type})" for s in session.streams.values()) or "none"
    if name:
        chosen = [s for s in session.streams.values() if s.name == name]
        if not chosen:
            raise XdfInputError(f"no stream named {name!r}; the file has: {available}")
        return chosen[0]
    emg = [s for s in session.streams.values() if s.type == "EMG"]
    if len(emg) != 1:
        what = "no stream" if not emg else "several streams"
        raise XdfInputError(f"{what} of type EMG (choose one by name); the file has: {available}")
    return emg[0]


def marked_gaps(session: Session, emg: Stream) -> list[tuple[float, int]] | None:
    """The gaps fesloop's acquisition marked in its own recording: (time of the first sample after
    the gap, samples lost) from its ``gap N samples`` markers; None for another app's EMG stream."""
    markers = session.get("acquisition-markers")
    if emg.description.get("process") != "acquisition" or markers is None:
        return None
    found = ((float(t), GAP_MARKER.fullmatch(str(row[0]))) for t, row in zip(markers.times_s, markers.data))
    return [(time_s, int(match.group(1))) for time_s, match in found if match]


def marked_indices(times_s: np.ndarray, fs_hz: float, gaps: list[tuple[float, int]]) -> np.ndarray:
    """Each sample's index on the grid of the first one, from gaps known by the time of the sample after each."""
    jumps = np.ones(max(len(times_s) - 1, 0), dtype=np.int64)
    for time_s, lost in gaps:
        after = int(np.searchsorted(times_s, time_s - 0.5 / fs_hz))
        if 0 < after < len(times_s):  # (a gap before the recording started is not in it)
            jumps[after - 1] += lost
    return np.concatenate(([0], np.cumsum(jumps))).astype(np.int64)


def read_xdf(path: Path, stream_name: str = "", fs_hz: float | None = None) -> XdfEmg:
    """The EMG stream of ``path`` (type EMG, or ``stream_name``) and the stimulator's pulses.

    ``fs_hz`` (a rate the user gave) must agree with the stream's nominal rate. Gaps in
    fesloop's own EMG stream are the ones its acquisition marked (it counted them from the
    amplifier's package counter); in another app's, they are found from the timestamps.
    """
    return emg_of_session(load_session(path), stream_name, fs_hz)


def emg_of_session(session: Session, stream_name: str = "", fs_hz: float | None = None) -> XdfEmg:
    """What :func:`read_xdf` returns, from a loaded session."""
    emg = _emg_stream(session, stream_name)
    if emg.rate_hz <= 0 or not len(emg.times_s):
        raise XdfInputError(f"stream {emg.name!r} has no samples at a nominal rate")
    if fs_hz is not None and fs_hz != emg.rate_hz:
        raise XdfInputError(f"--fs {fs_hz:g} disagrees with the recording's {emg.rate_hz:g} Hz")
    data = np.asarray(emg.data, dtype=np.float32)
    pulses = next((s for s in session.streams.values() if s.type == "StimulationPulses"), None)
    rows = np.asarray(pulses.data, dtype=np.float64).reshape(-1, 3) if pulses is not None else np.zeros((0, 3))
    times = (pulses.times_s - emg.times_s[0]) if pulses is not None else np.zeros(0)
    gaps = marked_gaps(session, emg)
    if gaps is None:
        sample_index = sample_indices(emg.times_s, emg.rate_hz)
    else:
        sample_index = marked_indices(emg.times_s, emg.rate_hz, gaps)
    return XdfEmg(
        data,
        emg.rate_hz,
        sample_index,
        sample_times(emg.times_s, sample_index, emg.rate_hz),
        emg.labels,
        times,
        rows[:, 0].astype(np.int64),
        rows[:, 1].astype(np.float32),
        rows[:, 2].astype(np.float32),
    )
