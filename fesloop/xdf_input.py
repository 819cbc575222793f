"""fesloop's own XDF recordings as input: the raw EMG stream and the delivered pulses.

Used by ``fesloop replay`` and ``fesloop convert``. The EMG stream is the one of type
``EMG`` (or the one named); its nominal rate is the sampling rate. Lost samples are
never filled: they are found from the timestamps (a step of more than 1.5 sample
periods) and reported as gaps, with each sample's index on the recording's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fesloop.xdf_session import Session, Stream, load_session

GAP_PERIODS = 1.5  # a timestamp step above this many sample periods means samples were lost


class XdfInputError(ValueError):
    """The XDF file has no usable EMG stream (the message names what it has)."""


@dataclass(frozen=True)
class XdfEmg:
    """The raw EMG of a recording, and the pulses delivered during it (times from its first sample)."""

    emg_uv: np.ndarray  # float32 (n_samples, n_channels)
    fs_hz: float
    sample_index: np.ndarray  # int64 (n_samples,): position on the recording's sample grid (gaps skip)
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
    """Each sample's index on the grid of the first one: consecutive unless a timestamp step shows a gap."""
    steps = np.diff(times_s) * fs_hz
    jumps = np.where(steps > GAP_PERIODS, np.rint(steps).astype(np.int64), 1)
    return np.concatenate(([0], np.cumsum(jumps))).astype(np.int64)


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


def read_xdf(path: Path, stream_name: str = "", fs_hz: float | None = None) -> XdfEmg:
    """The EMG stream of ``path`` (type EMG, or ``stream_name``) and the stimulator's pulses.

    ``fs_hz`` (a rate the user gave) must agree with the stream's nominal rate.
    """
    session = load_session(path)
    emg = _emg_stream(session, stream_name)
    if emg.rate_hz <= 0 or not len(emg.times_s):
        raise XdfInputError(f"stream {emg.name!r} has no samples at a nominal rate")
    if fs_hz is not None and fs_hz != emg.rate_hz:
        raise XdfInputError(f"--fs {fs_hz:g} disagrees with the recording's {emg.rate_hz:g} Hz")
    data = np.asarray(emg.data, dtype=np.float32)
    pulses = next((s for s in session.streams.values() if s.type == "StimulationPulses"), None)
    rows = np.asarray(pulses.data, dtype=np.float64).reshape(-1, 3) if pulses is not None else np.zeros((0, 3))
    times = (pulses.times_s - emg.times_s[0]) if pulses is not None else np.zeros(0)
    return XdfEmg(
        data,
        emg.rate_hz,
        sample_indices(emg.times_s, emg.rate_hz),
        emg.labels,
        times,
        rows[:, 0].astype(np.int64),
        rows[:, 1].astype(np.float32),
        rows[:, 2].astype(np.float32),
    )
