"""Any BrainFlow board: real boards by name or id, the synthetic board, the playback-file board.

Samples are converted at the edge: board rows to float32 microvolts (``scale_uv``
per board unit; BrainFlow already delivers EXG rows in uV for the OpenBCI boards
and the synthetic board), BrainFlow's wall-clock timestamps to the shared clock.
Gaps come from the board's package counter (see :mod:`acquisition.gaps`); a
sample whose counter repeats the previous one is dropped and counted. After a
restart the counter is no reference, so the gap across it is estimated from the
timestamps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from acquisition.gaps import GapScan, samples_missing, scan_package_counter, segments
from acquisition.sources import Block, SourceError, n_channels_needed
from fesloop import protocol
from fesloop.clock import wall_to_local_offset_s
from fesloop.config import DEFAULT_CONFIG, BrainflowConfig, Config

PROJECT_ROOT = DEFAULT_CONFIG.parent.parent
RING_BUFFER_SAMPLES = 45000
MAX_READ_SAMPLES = 1 << 14
_NO_GAPS = GapScan(None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0)


def resolve_board_id(board: str) -> int:
    """A BrainFlow board by name (``SYNTHETIC_BOARD``) or by id (``"-1"``)."""
    from brainflow.board_shim import BoardIds

    try:
        return int(board)
    except ValueError:
        pass
    try:
        return int(BoardIds[board.upper()])
    except KeyError:
        raise SourceError(f"acquisition.brainflow.board = {board!r}: not a BrainFlow board name or id") from None


def board_name(board_id: int) -> str:
    from brainflow.board_shim import BoardIds

    try:
        return BoardIds(board_id).name
    except ValueError:
        return str(board_id)


def is_file_board(board_id: int) -> bool:
    """Boards whose data format is that of ``master_board`` (playback file, streaming)."""
    from brainflow.board_shim import BoardIds

    return board_id in (int(BoardIds.PLAYBACK_FILE_BOARD), int(BoardIds.STREAMING_BOARD))


class BrainFlowSource:
    """One BrainFlow board session; ``read`` hands over everything new, split at gaps."""

    def __init__(self, config: Config) -> None:
        from brainflow.board_shim import BoardShim, BrainFlowInputParams

        cfg = config.acquisition.brainflow
        self._cfg = cfg
        self.board_id = resolve_board_id(cfg.board)
        layout_id = self.board_id
        if is_file_board(self.board_id):
            if not cfg.master_board:
                raise SourceError(
                    f"acquisition.brainflow.master_board is empty: board {cfg.board} needs the board that recorded "
                    "the data (its rows and sampling rate)"
                )
            layout_id = resolve_board_id(cfg.master_board)
        BoardShim.disable_board_logger()
        try:
            descr = BoardShim.get_board_descr(layout_id)
        except Exception as exc:  # brainflow raises BrainFlowError or a JSON error for unknown ids
            raise SourceError(f"BrainFlow board {board_name(layout_id)}: no description ({exc})") from None
        self.sampling_rate_hz = float(descr["sampling_rate"])
        needed = n_channels_needed(config)
        rows = list(cfg.emg_channels) or list(descr.get("emg_channels", []))[:needed]
        if len(rows) < needed:
            raise SourceError(
                f"acquisition.brainflow.emg_channels: board {board_name(layout_id)} offers {len(rows)} EMG rows, "
                f"the muscles need {needed}"
            )
        if max(rows) >= descr["num_rows"]:
            raise SourceError(
                f"acquisition.brainflow.emg_channels = {rows}: board {board_name(layout_id)} "
                f"has rows 0..{descr['num_rows'] - 1}"
            )
        self._rows = [int(r) for r in rows[:needed]]
        self.n_channels = needed
        self._timestamp_row = int(descr["timestamp_channel"])
        self._package_row = descr.get("package_num_channel")
        self.has_package_counter = self._package_row is not None
        self.source_id = _stable_source_id(self.board_id, cfg)
        self._board = BoardShim(self.board_id, _input_params(cfg, BrainFlowInputParams()))
        self.duplicate_samples = 0
        self.restarts = 0
        self._next_index = 0
        self._last_package: int | None = None
        self._last_board_time_s: float | None = None
        self._last_time_s: float | None = None
        self._after_restart = False
        self._offset_s = 0.0
        self._buffer = np.empty((0, needed), dtype=np.float32)

    def start(self, now_s: float) -> None:
        from brainflow.exit_codes import BrainFlowError

        streamer = ""
        if self._cfg.record_file:
            Path(self._cfg.record_file).parent.mkdir(parents=True, exist_ok=True)
            streamer = f"file://{self._cfg.record_file}:{'a' if self.restarts else 'w'}"
        try:
            self._board.prepare_session()
            if is_file_board(self.board_id):
                self._board.config_board("loopback_true" if self._cfg.playback_loop else "loopback_false")
            self._board.start_stream(RING_BUFFER_SAMPLES, streamer)
        except BrainFlowError as exc:
            self.stop()
            raise SourceError(f"BrainFlow board {self._cfg.board}: {exc}") from None
        self._offset_s = wall_to_local_offset_s()

    def read(self, now_s: float) -> list[Block]:
        from brainflow.exit_codes import BrainFlowError

        try:
            count = self._board.get_board_data_count()
            if count == 0:
                return []
            data = self._board.get_board_data(min(count, MAX_READ_SAMPLES))
        except BrainFlowError as exc:
            raise SourceError(f"BrainFlow board {self._cfg.board}: {exc}") from None
        scan = _NO_GAPS
        if self._package_row is not None:
            dealias = None
            if self._cfg.dealias_with_timestamps:
                dealias = (data[self._timestamp_row], self._last_board_time_s, self.sampling_rate_hz)
            scan = scan_package_counter(
                data[self._package_row], self._last_package, self._cfg.package_counter_modulo, dealias
            )
            self._last_package = int(data[self._package_row, -1])
            self._last_board_time_s = float(data[self._timestamp_row, -1])
            if scan.keep is not None:
                data = data[:, scan.keep]
                self.duplicate_samples += scan.duplicates
                if data.shape[1] == 0:
                    return []
        times_s = data[self._timestamp_row]
        if self._after_restart and self._last_time_s is not None:
            lost = samples_missing(times_s[0] + self._offset_s - self._last_time_s, self.sampling_rate_hz)
            scan = GapScan(None, np.concatenate(([0], scan.gap_rows)), np.concatenate(([lost], scan.gap_sizes)), 0)
        self._after_restart = False
        n = data.shape[1]
        emg_uv = self._converted(data, n)
        blocks = [
            Block(index, float(times_s[start]) + self._offset_s, emg_uv[start:stop], lost)
            for start, stop, index, lost in segments(n, scan, self._next_index)
        ]
        last = blocks[-1]
        self._next_index = last.first_sample_index + last.emg_uv.shape[0]
        self._last_time_s = float(times_s[-1]) + self._offset_s
        return blocks

    def _converted(self, data: np.ndarray, n: int) -> np.ndarray:
        """The EMG rows as (n, n_channels) float32 uV in the reused buffer."""
        if self._buffer.shape[0] < n:
            self._buffer = np.empty((max(n, 2 * self._buffer.shape[0]), self.n_channels), dtype=np.float32)
        out = self._buffer[:n]
        for column, row in enumerate(self._rows):
            np.multiply(data[row], self._cfg.scale_uv, out=out[:, column], casting="unsafe")
        return out

    def restart(self, now_s: float) -> None:
        """Release the session and prepare it again (raises SourceError if the board is not back)."""
        self.stop()
        self.restarts += 1
        self._last_package = None
        self._after_restart = True
        self.start(now_s)

    def on_pulses(self, pulses: protocol.Pulses) -> None:
        """A real amplifier does not need the pulses: they reach it through the body."""

    def stop(self) -> None:
        from brainflow.exit_codes import BrainFlowError

        try:
            if self._board.is_prepared():
                self._board.release_session()
        except BrainFlowError:
            pass  # releasing a board that is already gone: nothing left to free


def _stable_source_id(board_id: int, cfg: BrainflowConfig) -> str:
    """The same board and device (serial, port, address or file) give the same id across runs."""
    device = cfg.serial_number or cfg.mac_address or cfg.serial_port or cfg.ip_address
    if not device and cfg.file:
        device = Path(cfg.file).name
    return f"brainflow-{board_name(board_id)}-{device or 'default'}"


def resolve_data_file(path: str) -> str:
    """A relative playback file is looked up in the current directory, then in the project
    root (where ``configs/`` lives), so the shipped configs run from anywhere."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    shipped = PROJECT_ROOT / path
    return str(shipped) if shipped.exists() else path


def _input_params(cfg: BrainflowConfig, params: object) -> object:
    for name in ("serial_port", "ip_address", "ip_port", "mac_address", "serial_number", "other_info", "timeout"):
        setattr(params, name, getattr(cfg, name))
    params.file = resolve_data_file(cfg.file)
    if cfg.master_board:
        params.master_board = resolve_board_id(cfg.master_board)
    return params
