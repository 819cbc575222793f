"""Any BrainFlow board: real boards by name or id, the synthetic board, the playback-file board.

Samples are converted at the edge: board rows to float32 microvolts (``scale_uv``
per board unit; BrainFlow already delivers EXG rows in uV for the OpenBCI boards
and the synthetic board). Sample times are on the shared clock, from the sample
clock (:mod:`acquisition.sample_clock`): a line index -> local time fitted to the
local time of each read, so they follow the sample indices and never jump with
the wall clock. BrainFlow's own timestamps are wall-clock arrival times; they
only say, within one read, how long after each other the rows arrived. The
wall-clock offset is measured at every read, and a step (NTP, ``date -s``) is
reported as an event: BrainFlow's timestamps and its record file jump there. So is a
re-anchor of the sample clock; a board off its nominal rate by more than the sample
clock can follow raises SourceError. Every read takes all the rows waiting (at most
the ring buffer), so its newest row is the one that arrived by the read.

A row with a NaN, an infinity or a value beyond float32 after scaling is dropped
as lost (the index jumps over it, the counter shows the gap) and counted.

Gaps come from the board's package counter (see :mod:`acquisition.gaps`): repeated
and re-sent rows are dropped and counted, and whole counter periods lost are found
from when the rows arrived by the sample clock. Rows that came whole periods late
are held back up to ``HOLD_AT_MOST_S`` (reads go on, nothing is handed over): a
delivery backlog that the transport catches up over several reads (a Bluetooth
hiccup) looks the same until its fresh rows come, which bound the old ones, and then
nothing was lost; rows still that late after the wait follow the lost periods. The
wait ends early rather than let the acquisition loop take the board for stalled and
reopen it (``recover_after_ms``), and held rows are handed over when it ends even if
nothing more arrives. A backlog still whole periods late after the wait (a 1 kHz board
stalled 500 ms, caught up at twice the rate) is still taken for a loss.
After a restart the counter is no reference, so the gap across it comes from the
sample clock too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from acquisition.gaps import GapScan, scan_package_counter, segments, steps_back
from acquisition.sample_clock import SampleClock, WallClockWatch
from acquisition.sources import (
    Block, HeldRows, SourceError, SourceEvent, advance_sample_clock, joined, n_channels_needed
)
from fesloop import protocol
from fesloop.clock import Clock, LslClock, wall_to_local_offset_s
from fesloop.config import BrainflowConfig, Config

RING_BUFFER_SAMPLES = 45000
ROW_COUNT_MODULO = 1 << 62  # boards without a package counter: the rows read stand in for it
# Package counter steps per sample other than 1: BrainFlow's CYTON_DAISY driver joins two radio
# packets per sample and keeps the odd packet's number (cyton_daisy.cpp).
COUNTER_STEP = {"CYTON_DAISY_BOARD": 2}


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


def counter_step(board_id: int) -> int:
    """How far the board's package counter advances per sample."""
    return COUNTER_STEP.get(board_name(board_id), 1)


def is_file_board(board_id: int) -> bool:
    """Boards whose data format is that of ``master_board`` (playback file, streaming)."""
    from brainflow.board_shim import BoardIds

    return board_id in (int(BoardIds.PLAYBACK_FILE_BOARD), int(BoardIds.STREAMING_BOARD))


class BrainFlowSource:
    """One BrainFlow board session; ``read`` hands over everything new, split at gaps."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
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
        self._counter_modulo = ROW_COUNT_MODULO if self._package_row is None else cfg.package_counter_modulo
        self._counter_step = 1 if self._package_row is None else cfg.package_counter_step or counter_step(layout_id)
        if self._counter_modulo % self._counter_step:
            raise SourceError(
                f"acquisition.brainflow: board {board_name(layout_id)} counts {self._counter_step} per sample, "
                f"which does not divide package_counter_modulo = {self._counter_modulo}"
            )
        self.source_id = _stable_source_id(self.board_id, cfg)
        self._board = BoardShim(self.board_id, _input_params(cfg, BrainFlowInputParams()))
        self.duplicate_samples = 0
        self.non_finite_samples = 0
        self.timestamps_back = 0  # BrainFlow's arrival stamps (unused for sample times)
        self.restarts = 0
        self._clock = clock or LslClock()
        self._sample_clock = SampleClock(self.sampling_rate_hz)
        self._wall_clock = WallClockWatch()
        self._events: list[SourceEvent] = []
        self._next_index = 0
        self._rows_read = 0
        self._last_package: int | None = None
        self._last_stamp_s: float | None = None
        self._buffer = np.empty((0, needed), dtype=np.float32)
        self._held: HeldRows | None = None  # EMG, counter, local arrival time of rows held back
        self._handed_s = -math.inf  # when rows were last handed over
        self._recover_after_s = config.acquisition.recover_after_ms * 1e-3

    def start(self, now_s: float) -> None:
        from brainflow.exit_codes import BrainFlowError

        streamer = ""
        if self._cfg.record_file:
            try:
                Path(self._cfg.record_file).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SourceError(f"acquisition.brainflow.record_file: cannot create its folder ({exc})") from None
            streamer = f"file://{self._cfg.record_file}:{'a' if self.restarts else 'w'}"
        try:
            self._board.prepare_session()
            if is_file_board(self.board_id):
                self._board.config_board("loopback_true" if self._cfg.playback_loop else "loopback_false")
            self._board.start_stream(RING_BUFFER_SAMPLES, streamer)
        except BrainFlowError as exc:
            self.stop()
            raise SourceError(f"BrainFlow board {self._cfg.board}: {exc}") from None

    def read(self, now_s: float) -> list[Block]:
        new = self._new_rows()
        read_s = self._clock.now() if new is None else new.read_s
        if new is None and (self._held is None or read_s < self._hold_until(self._held)):
            return []
        rows = joined(self._held, new)
        emg_uv, counter, arrival_s = rows.arrays
        scan = self._scan(counter, arrival_s)
        if scan.periods_lost and read_s < self._hold_until(rows):
            self._held = rows if self._held is not None else rows.copy()  # joined rows are already owned
            return []
        self._held = None
        kept = counter if scan.keep is None else counter[scan.keep]
        self._last_package = int(kept[-1]) if kept.size else self._last_package
        if scan.keep is not None:
            emg_uv = emg_uv[scan.keep]
            self.duplicate_samples += scan.duplicates
            if emg_uv.shape[0] == 0:
                return []
        n = emg_uv.shape[0]
        parts = segments(n, scan, self._next_index)
        first_row, stop_row, first_index, _ = parts[-1]
        self._next_index = first_index + stop_row - first_row
        line = advance_sample_clock(
            self._sample_clock, self._next_index, rows.read_s, self._events, f"BrainFlow board {self._cfg.board}"
        )
        self._handed_s = read_s
        return [Block(index, line.time_of(index), emg_uv[start:stop], lost) for start, stop, index, lost in parts]

    def _new_rows(self) -> HeldRows | None:
        """Every finite row that arrived since the last read (None: none), each with its local arrival time:
        the read time, less how much earlier than the newest row BrainFlow stamped it."""
        from brainflow.exit_codes import BrainFlowError

        try:
            count = self._board.get_board_data_count()
            if count == 0:
                return None
            data = self._board.get_board_data(count)  # all of it: the newest row is the one that arrived by now
        except BrainFlowError as exc:
            raise SourceError(f"BrainFlow board {self._cfg.board}: {exc}") from None
        read_s = self._clock.now()  # every row read had arrived by then
        self._watch_wall_clock(read_s)
        counter = self._counter(data)
        emg_uv = self._converted(data, data.shape[1])
        finite = np.isfinite(emg_uv).all(axis=1)
        if not finite.all():  # NaN, inf, or beyond float32: the row is lost, the counter shows the gap
            self.non_finite_samples += int(finite.size - finite.sum())
            data, counter, emg_uv = data[:, finite], counter[finite], emg_uv[finite]
            if not finite.any():
                return None
        stamps_s = data[self._timestamp_row]
        self.timestamps_back += steps_back(stamps_s, self._last_stamp_s)
        self._last_stamp_s = float(stamps_s[-1])
        return HeldRows((emg_uv, counter, read_s - (stamps_s[-1] - stamps_s)), read_s, read_s)

    def _hold_until(self, rows: HeldRows) -> float:
        return rows.hold_until(self._handed_s, self._recover_after_s)

    def _watch_wall_clock(self, read_s: float) -> None:
        """Measure the wall -> local offset; a step becomes an event."""
        step_s = self._wall_clock.update(wall_to_local_offset_s(self._clock))
        if step_s:
            marker = f"wall clock stepped {step_s:+.3f} s (BrainFlow timestamps and record file jump; EMG times do not)"
            self._events.append(SourceEvent(read_s, marker))

    def _counter(self, data: np.ndarray) -> np.ndarray:
        """Each row's package counter (boards without one: the number of rows read before it)."""
        n = data.shape[1]
        self._rows_read += n
        if self._package_row is None:
            return self._rows_read - n + np.arange(n)
        return data[self._package_row].astype(np.int64)

    def _scan(self, counter: np.ndarray, arrival_s: np.ndarray) -> GapScan:
        """Repeated rows and gaps from the package counter; whole counter periods (and the gap across
        a restart) from when the rows arrived (local time, per row) by the sample clock. (A wall-clock
        step inside one read only shifts the rows before it, which the last row bounds.)"""
        at = self._sample_clock.index_at(arrival_s)
        by_time = at is not None and (self._cfg.dealias_with_timestamps or self._last_package is None)
        arrived = at - (self._next_index - 1) if by_time else None
        return scan_package_counter(counter, self._last_package, self._counter_modulo, self._counter_step, arrived)

    def take_events(self) -> list[SourceEvent]:
        events, self._events = self._events, []
        return events

    def _converted(self, data: np.ndarray, n: int) -> np.ndarray:
        """The EMG rows as (n, n_channels) float32 uV in the reused buffer."""
        if self._buffer.shape[0] < n:
            self._buffer = np.empty((max(n, 2 * self._buffer.shape[0]), self.n_channels), dtype=np.float32)
        out = self._buffer[:n]
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, and its row is dropped
            for column, row in enumerate(self._rows):
                np.multiply(data[row], self._cfg.scale_uv, out=out[:, column], casting="unsafe")
        return out

    def restart(self, now_s: float) -> None:
        """Release the session and prepare it again (raises SourceError if the board is not back)."""
        self.stop()
        self.restarts += 1
        self._last_package = None
        self._held = None  # rows held back across the restart count in the gap the sample clock finds
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


def _input_params(cfg: BrainflowConfig, params: object) -> object:
    for name in ("serial_port", "ip_address", "ip_port", "mac_address", "serial_number", "other_info", "timeout"):
        setattr(params, name, getattr(cfg, name))
    params.file = cfg.file
    if cfg.master_board:
        params.master_board = resolve_board_id(cfg.master_board)
    return params
