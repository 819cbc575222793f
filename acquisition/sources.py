"""EMG sources: the simulated patient and any BrainFlow board.

A source hands over blocks of new samples in microvolts, float32 (n_samples,
n_channels), with the index and shared-clock time of the first sample. Lost samples
are never filled: the index jumps over them and ``lost_samples`` says how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from acquisition.patient import SimulatedPatient
from fesloop import protocol
from fesloop.clock import wall_to_local_offset_s
from fesloop.config import BrainflowConfig, Config


@dataclass
class Block:
    first_sample_index: int
    first_sample_time_s: float
    emg_uv: np.ndarray
    lost_samples: int = 0
    truth: np.ndarray | None = None  # simulated patient: voluntary drive per muscle


class SourceError(RuntimeError):
    """The source cannot be opened or read; the message says which and why."""


class Source(Protocol):
    sampling_rate_hz: float
    n_channels: int
    source_id: str

    def start(self, now_s: float) -> None: ...

    def read(self, now_s: float) -> Block | None: ...

    def on_pulses(self, pulses: protocol.Pulses) -> None: ...

    def stop(self) -> None: ...


def n_channels_needed(config: Config) -> int:
    return max(m.emg_channel for m in config.muscles) + 1


class SimulatedSource:
    """The simulated patient as an amplifier with a transport delay.

    Sample k exists at ``start + k / fs`` and is handed over once ``transport_delay_ms``
    has passed, as a real amplifier's USB/Bluetooth link would, which also gives a
    pulse message time to arrive before the samples that carry its artifact.
    """

    MAX_BLOCK = 1 << 14

    def __init__(self, config: Config) -> None:
        self._config = config
        sim = config.acquisition.simulated
        self.sampling_rate_hz = sim.sampling_rate_hz
        self.n_channels = len(config.muscles)
        self.source_id = f"simulated-patient-seed{sim.seed}"
        self._delay_s = sim.transport_delay_ms * 1e-3
        self._patient: SimulatedPatient | None = None
        self._next_index = 0
        self._start_s = 0.0

    def start(self, now_s: float) -> None:
        channel_to_muscle = {s.device_channel: self._config.muscle_index(s.muscle) for s in self._config.stimulation}
        muscles = [m.name for m in self._config.muscles]
        self._start_s = now_s
        self._patient = SimulatedPatient(self._config.acquisition.simulated, muscles, channel_to_muscle, now_s)

    def read(self, now_s: float) -> Block | None:
        assert self._patient is not None, "start() first"
        due = int(np.floor((now_s - self._delay_s - self._start_s) * self.sampling_rate_hz)) + 1
        n = min(due - self._next_index, self.MAX_BLOCK)
        if n <= 0:
            return None
        emg_uv = np.empty((n, self.n_channels), dtype=np.float32)
        truth = np.empty((n, self.n_channels), dtype=np.float32)
        self._patient.render(self._next_index, emg_uv)
        self._patient.drive(self._next_index, truth)
        block = Block(self._next_index, self._start_s + self._next_index / self.sampling_rate_hz, emg_uv, truth=truth)
        self._next_index += n
        return block

    def on_pulses(self, pulses: protocol.Pulses) -> None:
        if self._patient is not None:
            self._patient.add_pulses(pulses.channel, pulses.time_s, pulses.amplitude_ma, pulses.pulse_width_us)

    def stop(self) -> None:
        self._patient = None


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


class BrainFlowSource:
    """Any BrainFlow board; samples converted to uV and to the shared clock at the edge."""

    PACKAGE_COUNTER_MODULO = 256

    def __init__(self, config: Config) -> None:
        from brainflow.board_shim import BoardShim, BrainFlowInputParams

        cfg = config.acquisition.brainflow
        self._cfg = cfg
        self.board_id = resolve_board_id(cfg.board)
        BoardShim.disable_board_logger()
        descr = BoardShim.get_board_descr(self.board_id)
        self.sampling_rate_hz = float(descr["sampling_rate"])
        needed = n_channels_needed(config)
        rows = list(cfg.emg_channels) or list(descr.get("emg_channels", []))[:needed]
        if len(rows) < needed:
            raise SourceError(
                f"acquisition.brainflow.emg_channels: board {cfg.board} offers {len(rows)} EMG rows, "
                f"the muscles need {needed}"
            )
        self._rows = np.asarray(rows[:needed])
        self.n_channels = needed
        self._timestamp_row = descr["timestamp_channel"]
        self._package_row = descr.get("package_num_channel")
        self.source_id = f"brainflow-{cfg.board}-{cfg.serial_number or cfg.serial_port or cfg.ip_address or 'default'}"
        self._board = BoardShim(self.board_id, _input_params(cfg, BrainFlowInputParams()))
        self._next_index = 0
        self._last_package: int | None = None
        self._offset_s = 0.0

    def start(self, now_s: float) -> None:
        from brainflow.exit_codes import BrainFlowError

        try:
            self._board.prepare_session()
            self._board.start_stream(45000)
        except BrainFlowError as exc:
            raise SourceError(f"BrainFlow board {self._cfg.board}: {exc}") from None
        self._offset_s = wall_to_local_offset_s()

    def read(self, now_s: float) -> Block | None:
        data = self._board.get_board_data()
        if data.shape[1] == 0:
            return None
        lost = self._count_lost(data[self._package_row]) if self._package_row is not None else 0
        self._next_index += lost
        emg_uv = np.ascontiguousarray(data[self._rows].T, dtype=np.float32)
        if self._cfg.scale_uv != 1.0:
            emg_uv *= np.float32(self._cfg.scale_uv)
        first_time_s = float(data[self._timestamp_row, 0]) + self._offset_s
        block = Block(self._next_index, first_time_s, emg_uv, lost_samples=lost)
        self._next_index += emg_uv.shape[0]
        return block

    def _count_lost(self, counter: np.ndarray) -> int:
        """Samples missing according to the board's wrap-around package counter."""
        counter = counter.astype(np.int64)
        previous = np.concatenate(([self._last_package], counter[:-1])) if self._last_package is not None else counter[:-1]
        current = counter if self._last_package is not None else counter[1:]
        self._last_package = int(counter[-1])
        steps = (current - previous) % self.PACKAGE_COUNTER_MODULO
        return int(np.maximum(steps - 1, 0).sum())

    def on_pulses(self, pulses: protocol.Pulses) -> None:
        """A real amplifier does not need the pulses: they reach it through the body."""

    def stop(self) -> None:
        if self._board.is_prepared():
            self._board.release_session()


def _input_params(cfg: BrainflowConfig, params: object) -> object:
    for name in (
        "serial_port", "ip_address", "ip_port", "mac_address", "serial_number", "other_info", "file", "timeout",
    ):
        setattr(params, name, getattr(cfg, name))
    if cfg.master_board:
        params.master_board = resolve_board_id(cfg.master_board)
    return params


def open_source(config: Config) -> Source:
    """The source the config names."""
    if config.acquisition.source == "simulated":
        return SimulatedSource(config)
    return BrainFlowSource(config)
