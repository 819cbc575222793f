"""``fesloop replay``: run a recording through the live controller's estimator, as fast as it can.

Chunk by chunk through :class:`controller.estimator.EmgEstimator` (the live code path),
one chunk per control period. Writes ``activation.csv`` (time_s, one column per
muscle, one gate column per stimulation channel: 1 open, 0 closed) and ``events.csv``
(time_s, channel, event). Times are seconds from the file's first sample. Input:
CSV/TXT/.npy with ``--fs``, or fesloop's own XDF recordings (rate, delivered pulses
and lost samples from the file).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fesloop.arguments import require_number
from fesloop.config import Config
from fesloop.protocol import EmgChunk, GateReason
from fesloop.xdf_input import read_xdf

if TYPE_CHECKING:
    from controller.estimator import EmgEstimator


class ReplayError(ValueError):
    """The recording or the pulse file cannot be replayed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--emg", type=Path, required=True, help="recording: .csv/.txt or .npy (need --fs), or a fesloop .xdf recording"
    )
    parser.add_argument("--fs", type=float, default=None, metavar="HZ", help="sampling rate of the recording")
    parser.add_argument(
        "--pulses", type=Path, default=None,
        help="pulse times (s from the first sample), one per line (an .xdf brings its own delivered pulses)",
    )
    parser.add_argument("--stream", default="", help=".xdf: the EMG stream's name (default: the one of type EMG)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")


def read_emg(path: Path) -> np.ndarray:
    """(n_samples, n_channels) float32 from .npy, or CSV/TXT (numbers, optional header, '#' comments)."""
    if path.suffix.lower() == ".npy":
        data = np.load(path, allow_pickle=False)
    else:
        data = _read_table(path)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = data[:, np.newaxis]
    if data.ndim != 2 or len(data) == 0:
        raise ReplayError(f"{path}: expected a non-empty table of samples x channels, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ReplayError(f"{path}: contains non-finite values")
    return data


def _read_table(path: Path) -> np.ndarray:
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ReplayError(f"{path}: no samples")
    delimiter = "," if "," in lines[0] else None
    try:
        [float(v) for v in lines[0].split(delimiter)]
    except ValueError:
        lines = lines[1:]  # a header row
    if not lines:
        return np.zeros((0, 1))
    try:
        return np.loadtxt(lines, delimiter=delimiter, ndmin=2)
    except ValueError as exc:
        raise ReplayError(f"{path}: not a numeric table: {exc}") from None


def read_pulses(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pulse times (s) and device channels: one pulse per row, 'time_s[,channel]', optional header."""
    table = _read_table(path)
    channel = table[:, 1].astype(int) if table.shape[1] > 1 else np.zeros(len(table), dtype=int)
    return table[:, 0], channel


def replay(
    config: Config,
    emg_uv: np.ndarray,
    fs_hz: float,
    pulses: tuple[np.ndarray, ...] | None,
    out_dir: Path,
    sample_index: np.ndarray | None = None,
    sample_time_s: np.ndarray | None = None,
) -> EmgEstimator:
    """Replay ``emg_uv`` and write activation.csv, events.csv and mwave.csv into ``out_dir``.

    ``pulses``: times (s from the first sample) and device channels, optionally
    amplitudes (mA) and pulse widths (us). ``sample_index``: each sample's place on
    the recording's grid when samples were lost (chunks never span a gap, so the
    estimator sees the gap as live; each gap is a contamination window of every muscle
    in ``events.csv``, from the first missing sample to the next one received, and
    closes every gate for ``stale_ms`` after it, as the live controller does).
    ``sample_time_s``: each sample's time from the first (a recording's clock, which
    the pulse times share); without it, ``sample_index / fs_hz``.
    """
    needed = max(m.emg_channel for m in config.muscles) + 1
    if emg_uv.shape[1] < needed:
        raise ReplayError(f"the recording has {emg_uv.shape[1]} channels; the config's muscles need {needed}")
    # Imported here, not at the top: every `fesloop` command builds this module's arguments,
    # and the estimator brings scipy.signal (~0.7 s) that only a replay needs.
    from controller.estimator import EmgEstimator
    from controller.loop import check_calibration_rate, load_calibration

    calibration = load_calibration(config)
    if calibration is not None:
        check_calibration_rate(config, calibration, fs_hz)
    estimator = EmgEstimator(config, fs_hz, emg_uv.shape[1], calibration)
    pulses_due = _PulsesDue(pulses, config.controller.blanking.pre_ms * 1e-3)
    chunk = max(int(round(fs_hz / config.controller.control_rate_hz)), 1)
    n_stim = len(config.stimulation)
    gate = np.zeros(n_stim, dtype=np.uint8)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(out_dir / "activation.csv", "w", newline="") as act_file,
        open(out_dir / "events.csv", "w", newline="") as ev_file,
        open(out_dir / "mwave.csv", "w", newline="") as mwave_file,
    ):
        activation = csv.writer(act_file)
        events = csv.writer(ev_file)
        mwaves = csv.writer(mwave_file)
        activation.writerow(["time_s", *estimator.names, *(f"gate_{s.name}" for s in config.stimulation)])
        events.writerow(["time_s", "channel", "event"])
        mwaves.writerow(["time_s", "muscle", "amplitude_uv", "normalized"])
        index = np.arange(len(emg_uv)) if sample_index is None else sample_index
        times_s = index / fs_hz if sample_time_s is None else sample_time_s
        hold_off_s, held_until_s = config.controller.stale_ms * 1e-3, float("-inf")
        for start, stop in _chunks(index, chunk):
            data = emg_uv[start:stop]
            first, first_s = int(index[start]), float(times_s[start])
            if start and first != index[start - 1] + 1:  # lost samples: a contamination window on every muscle
                for name in estimator.names:
                    events.writerow([f"{times_s[start - 1] + 1 / fs_hz:.6f}", name, "contamination_start"])
                    events.writerow([f"{first_s:.6f}", name, "contamination_end"])
            pulses_due.give(estimator, first_s + len(data) / fs_hz)
            if not estimator.process(EmgChunk(first, first_s, first_s, fs_hz, data)):
                held_until_s = first_s + hold_off_s  # as live: closed for a hold-off after lost samples
            estimator.gate_reasons(gate)
            time_s = first_s + (len(data) - 1 - estimator.delay) / fs_hz
            if time_s < held_until_s:
                gate[:] = GateReason.GAP
            activation.writerow(
                [f"{time_s:.6f}", *(f"{a:.5f}" for a in estimator.activation), *(int(g == GateReason.OPEN) for g in gate)]
            )
            for event in estimator.events:
                events.writerow([f"{event.time_s:.6f}", event.channel, event.kind])
            estimator.events.clear()
            for m in estimator.mwave.take_measurements():
                mwaves.writerow([f"{m.pulse_time_s:.6f}", estimator.names[m.muscle], f"{m.amplitude_uv:.3f}",
                                 f"{m.normalized:.5f}"])
    return estimator


class _PulsesDue:
    """A recording's pulses handed to the estimator chunk by chunk, as the live loop receives them.

    All at once, they overflowed the blanker's memory of recent pulses (sized for
    the live rate) and only the last ones were blanked.
    """

    def __init__(self, pulses: tuple[np.ndarray, ...] | None, pre_s: float) -> None:
        if pulses is None:
            self._pulses: tuple[np.ndarray, ...] = (np.zeros(0),)
        else:
            order = np.argsort(pulses[0], kind="stable")
            self._pulses = tuple(np.asarray(column)[order] for column in pulses)
        self._pre_s = pre_s
        self._given = 0

    def give(self, estimator: EmgEstimator, end_s: float) -> None:
        """Hand over every pulse whose artifact window starts before ``end_s`` (the chunk's end)."""
        due = int(np.searchsorted(self._pulses[0], end_s + self._pre_s))
        if due > self._given:
            estimator.add_pulses(*(column[self._given : due] for column in self._pulses))
            self._given = due


def _chunks(index: np.ndarray, size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most ``size`` rows that never span a gap in ``index``."""
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    edges = np.concatenate(([0], breaks, [len(index)]))
    return [(a, min(a + size, b)) for lo, b in zip(edges[:-1], edges[1:]) for a in range(int(lo), int(b), size)]


def warn_pulses_outside(path: Path, pulse_time_s: np.ndarray, duration_s: float) -> None:
    """A pulse file in ms, or on another clock, puts its pulses outside the recording: nothing is
    blanked and no M-wave measured. Say so on stderr (the replay itself may still be wanted)."""
    outside = int(np.count_nonzero((pulse_time_s < 0) | (pulse_time_s >= duration_s)))
    if not len(pulse_time_s):
        print(f"fesloop replay: warning: {path} holds no pulses", file=sys.stderr)
    elif outside:
        print(
            f"fesloop replay: warning: {outside} of {len(pulse_time_s)} pulses in {path} fall outside the recording "
            f"(0 to {duration_s:.3f} s): pulse times are in seconds from its first sample",
            file=sys.stderr,
        )


def main(config: Config, args: argparse.Namespace) -> int:
    """Entry of ``fesloop replay``; returns the exit code."""
    if args.fs is not None:
        require_number("replay", "--fs", args.fs, 0.0)
    sample_index = sample_time_s = None
    try:
        suffix = args.emg.suffix.lower()
        if suffix == ".xdf":
            recording = read_xdf(args.emg, args.stream, args.fs)
            emg_uv, fs_hz = recording.emg_uv, recording.fs_hz
            sample_index, sample_time_s = recording.sample_index, recording.sample_time_s
            pulses = read_pulses(args.pulses) if args.pulses is not None else (
                recording.pulse_time_s, recording.pulse_channel, recording.pulse_amplitude_ma, recording.pulse_width_us
            )
            for first, missing in recording.gaps:
                print(f"gap: {missing} samples lost from sample {first} ({first / fs_hz:.3f} s); not filled")
        elif suffix in (".csv", ".txt", ".npy"):
            if args.fs is None or args.fs <= 0:
                raise ReplayError("--fs HZ (a positive sampling rate) is required: the file does not carry it")
            emg_uv, fs_hz = read_emg(args.emg), args.fs
            pulses = read_pulses(args.pulses) if args.pulses is not None else None
        else:
            raise ReplayError(f"{args.emg}: unsupported format (use .csv, .txt, .npy or .xdf)")
        if args.pulses is not None:
            n_samples = len(emg_uv) if sample_index is None else int(sample_index[-1]) + 1
            warn_pulses_outside(args.pulses, pulses[0], n_samples / fs_hz)
        estimator = replay(config, emg_uv, fs_hz, pulses, args.out, sample_index, sample_time_s)
    except (OSError, ReplayError, ValueError) as exc:
        raise SystemExit(f"fesloop replay: {exc}") from None
    print(
        f"replayed {len(emg_uv)} samples x {emg_uv.shape[1]} channels ({len(emg_uv) / fs_hz:.1f} s) "
        f"to {args.out}: {estimator.artifacts_detected} artifacts detected"
    )
    return 0
