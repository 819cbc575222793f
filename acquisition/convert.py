"""``fesloop convert``: a recording (CSV/TXT, .npy, .mat, fesloop XDF) to a BrainFlow playback file.

The output is what BrainFlow's own file streamer writes: one sample per line, one
tab-separated column per row of the master board (``--board``). The EMG goes into the
board's EMG rows in microvolts (``(value - offset) * scale_uv``), the package counter
counts samples modulo 256 (2 per sample for CYTON_DAISY_BOARD, like its driver), the
timestamps are seconds from the start (+1 s: the playback board paces by their
differences and stamps each sample anew when it replays it), every other row is 0.
Replay it with ``board = "PLAYBACK_FILE_BOARD"``, ``master_board = BOARD`` and
``file = OUTPUT``.

Repeated packets: some recorders fill a lost packet with a copy of the previous one
(BITalino recordings such as BioSPPy's ``emg_1.txt`` have ~5 % of their 20-sample
packets repeated). With ``--drop-repeats N`` every N-sample packet equal to the one
before it is taken out, and the counter and timestamps skip over it, so a replay
reports it as N lost samples instead of feeding the copy to the controller as EMG.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fesloop.xdf_input import XdfInputError, read_xdf

COUNTER_MODULO = 256
FIRST_TIMESTAMP_S = 1.0


class ConvertError(ValueError):
    """The input cannot be converted as asked; the message says why."""


@dataclass(frozen=True)
class Converted:
    samples_written: int
    packets_dropped: int
    board: str
    sampling_rate_hz: float


def load_samples(path: Path, columns: list[int] | None = None, variable: str = "") -> np.ndarray:
    """(n_samples, n_channels) float64 from .npy, .mat (``variable``) or delimited text."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif suffix == ".mat":
        from scipy.io import loadmat

        content = loadmat(path)
        names = [k for k in content if not k.startswith("__")]
        if variable not in content:
            raise ConvertError(f"{path}: --variable {variable!r} not found; the file holds {names}")
        data = np.asarray(content[variable], dtype=np.float64)
        if data.ndim == 2 and data.shape[0] < data.shape[1]:
            data = data.T  # MATLAB vectors are often rows
    else:
        with path.open(encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip() and not line.startswith("#")), "")
        data = np.loadtxt(path, comments="#", delimiter="," if "," in first else None, ndmin=2)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[0] == 0:
        raise ConvertError(f"{path}: expected (samples, channels) values, got shape {data.shape}")
    if columns:
        if max(columns) >= data.shape[1]:
            raise ConvertError(f"{path}: --columns {columns}: the file has columns 0..{data.shape[1] - 1}")
        data = data[:, columns]
    if not np.isfinite(data).all():
        raise ConvertError(f"{path}: holds NaN or infinite values")
    return data


def repeated_packets(samples: np.ndarray, packet: int) -> np.ndarray:
    """Indices of the ``packet``-sample packets (aligned at 0) equal to the packet before."""
    n = samples.shape[0] // packet
    blocks = samples[: n * packet].reshape(n, packet, samples.shape[1])
    return np.flatnonzero(np.all(blocks[1:] == blocks[:-1], axis=(1, 2))) + 1


def board_layout(board: str, n_channels: int, fs_hz: float) -> tuple[int, dict]:
    """The master board's id and description, checked against the recording."""
    from brainflow.board_shim import BoardShim

    from acquisition.brainflow_source import board_name, resolve_board_id

    try:
        board_id = resolve_board_id(board)
        descr = BoardShim.get_board_descr(board_id)
    except Exception as exc:  # SourceError for an unknown name, BrainFlowError or a JSON error for an unknown id
        raise ConvertError(f"--board {board}: {exc}") from None
    if float(descr["sampling_rate"]) != fs_hz:
        raise ConvertError(
            f"--fs {fs_hz:g}: board {board_name(board_id)} samples at {descr['sampling_rate']} Hz and its playback "
            "would run at the file's pace but be read at the board's rate; pick a board with this rate "
            "(e.g. CALLIBRI_EMG_BOARD 1000 Hz, ANT_NEURO_EE_410_BOARD 2000 Hz) or resample first"
        )
    if len(descr.get("emg_channels", [])) < n_channels:
        raise ConvertError(
            f"board {board_name(board_id)} has {len(descr.get('emg_channels', []))} EMG rows, the recording has "
            f"{n_channels} channels"
        )
    return board_id, descr


def convert(
    samples: np.ndarray,
    fs_hz: float,
    board: str,
    out: Path,
    scale_uv: float = 1.0,
    offset: float = 0.0,
    drop_repeats: int = 0,
    sample_index: np.ndarray | None = None,
) -> Converted:
    """Write ``samples`` (n_samples, n_channels, input units) as a BrainFlow playback file.

    ``sample_index``: each row's place on the recording's sample grid when samples were
    already lost (an XDF recording); the counter and timestamps skip the gaps, so a
    replay reports them as lost samples.
    """
    from acquisition.brainflow_source import board_name, counter_step

    board_id, descr = board_layout(board, samples.shape[1], fs_hz)
    rows = np.arange(samples.shape[0])
    grid = rows if sample_index is None else np.asarray(sample_index, dtype=np.int64)
    dropped = np.zeros(0, dtype=np.int64)
    if drop_repeats:
        dropped = repeated_packets(samples, drop_repeats)
        keep = np.ones(samples.shape[0], dtype=bool)
        for packet in dropped:
            keep[packet * drop_repeats : (packet + 1) * drop_repeats] = False
        rows, grid = rows[keep], grid[keep]
    table = np.zeros((rows.size, int(descr["num_rows"])))
    table[:, descr["emg_channels"][: samples.shape[1]]] = (samples[rows] - offset) * scale_uv
    table[:, descr["package_num_channel"]] = grid * counter_step(board_id) % COUNTER_MODULO
    table[:, descr["timestamp_channel"]] = FIRST_TIMESTAMP_S + grid / fs_hz
    formats = ["%.0f"] * table.shape[1]
    for row in descr["emg_channels"][: samples.shape[1]]:
        formats[row] = "%.10g"
    formats[descr["timestamp_channel"]] = "%.6f"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(out, table, fmt=formats, delimiter="\t")
    return Converted(int(rows.size), int(dropped.size), board_name(board_id), fs_hz)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="recording: .csv/.txt (# comments), .npy, .mat, or a fesloop .xdf")
    parser.add_argument("output", type=Path, help="BrainFlow playback file to write")
    parser.add_argument("--fs", type=float, default=None, help="sampling rate of the recording (Hz; an .xdf has its own)")
    parser.add_argument("--stream", default="", help=".xdf: the EMG stream's name (default: the one of type EMG)")
    parser.add_argument("--board", default="CALLIBRI_EMG_BOARD",
                        help="master board whose layout and rate the file takes (default: CALLIBRI_EMG_BOARD, 1000 Hz)")
    parser.add_argument("--columns", type=lambda s: [int(c) for c in s.split(",")], default=None,
                        help="input columns to take, e.g. 0,1,2 (default: all)")
    parser.add_argument("--variable", default="", help=".mat input: the variable holding the samples")
    parser.add_argument("--scale-uv", type=float, default=1.0, help="uV per input unit (default 1)")
    parser.add_argument("--offset", type=float, default=0.0, help="input units subtracted before scaling")
    parser.add_argument("--start-s", type=float, default=0.0, help="skip this much of the recording")
    parser.add_argument("--duration-s", type=float, default=None, help="keep only this much")
    parser.add_argument("--drop-repeats", type=int, default=0, metavar="N",
                        help="take out N-sample packets that repeat the previous one (they replay as lost)")


def main(args: argparse.Namespace) -> int:
    try:
        sample_index = None
        if args.input.suffix.lower() == ".xdf":
            recording = read_xdf(args.input, args.stream, args.fs)
            samples, fs_hz, sample_index = recording.emg_uv, recording.fs_hz, recording.sample_index
            if args.columns is not None:
                samples = samples[:, args.columns]
            for first_missing, missing in recording.gaps:
                print(f"gap: {missing} samples lost from sample {first_missing}; the playback file skips them too")
        elif args.fs is None or args.fs <= 0:
            raise ConvertError("--fs HZ (a positive sampling rate) is required: the file does not carry it")
        else:
            samples, fs_hz = load_samples(args.input, args.columns, args.variable), args.fs
        first = int(round(args.start_s * fs_hz))
        stop = None if args.duration_s is None else first + int(round(args.duration_s * fs_hz))
        samples = samples[first:stop]
        sample_index = None if sample_index is None else sample_index[first:stop]
        if samples.shape[0] == 0:
            raise ConvertError(f"{args.input}: nothing left after --start-s/--duration-s")
        done = convert(
            samples, fs_hz, args.board, args.output, args.scale_uv, args.offset, args.drop_repeats, sample_index
        )
    except (ConvertError, XdfInputError, OSError) as exc:
        raise SystemExit(f"fesloop convert: {exc}") from None
    print(
        f"{args.output}: {done.samples_written} samples of {samples.shape[1]} channel(s) "
        f"at {done.sampling_rate_hz:g} Hz for {done.board}; {done.packets_dropped} repeated packets taken out"
    )
    return 0
