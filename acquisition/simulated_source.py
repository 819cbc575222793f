"""The simulated patient as an amplifier: transport delay and a fault schedule.

Sample k exists at ``start + k / fs`` and is handed over once ``transport_delay_ms``
has passed, as a real amplifier's USB/Bluetooth link would, which also gives a
pulse message time to arrive before the samples that carry its artifact. Faults
(``acquisition.simulated.faults``) act on the amplifier's output, not on the
patient: lift-off (flat or railed), motion spikes, dropped samples.
"""

from __future__ import annotations

import numpy as np

from acquisition.gaps import GapScan, segments
from acquisition.patient import SimulatedPatient
from acquisition.sources import Block, SourceError, SourceEvent
from fesloop import protocol
from fesloop.config import Config, SimulatedFault


class FaultSchedule:
    """The configured faults in sample indices, applied to each rendered block."""

    def __init__(self, faults: tuple[SimulatedFault, ...], muscles: list[str], fs_hz: float) -> None:
        self._faults: list[tuple[str, int, int, slice, float]] = []
        for i, fault in enumerate(faults):
            if fault.muscle and fault.muscle not in muscles:
                raise SourceError(
                    f"acquisition.simulated.faults[{i}].muscle = {fault.muscle!r}: must be one of {muscles} or empty"
                )
            start = int(round(fault.start_s * fs_hz))
            stop = start + max(int(round(fault.duration_s * fs_hz)), 1)
            columns = slice(None)
            if fault.muscle and fault.kind != "drop":
                channel = muscles.index(fault.muscle)
                columns = slice(channel, channel + 1)
            self._faults.append((fault.kind, start, stop, columns, fault.amplitude_uv))
        # Motion adds to the signal; lift-off then replaces it; drop acts last.
        order = {"motion": 0, "flat": 1, "railed": 1, "drop": 2}
        self._faults.sort(key=lambda f: order[f[0]])

    def apply(self, first_index: int, emg_uv: np.ndarray, dc_uv: float, rail_uv: float) -> np.ndarray | None:
        """Alter ``emg_uv`` (samples from ``first_index``) in place; the rows still delivered
        (None = all)."""
        n = emg_uv.shape[0]
        keep = None
        for kind, start, stop, columns, amplitude_uv in self._faults:
            lo, hi = max(start, first_index), min(stop, first_index + n)
            if lo >= hi:
                continue
            rows = slice(lo - first_index, hi - first_index)
            if kind == "motion":
                phase = (np.arange(lo, hi) - start) / (stop - start)
                emg_uv[rows, columns] += (amplitude_uv * np.sin(np.pi * phase)).astype(np.float32)[:, None]
            elif kind == "flat":
                emg_uv[rows, columns] = dc_uv
            elif kind == "railed":
                emg_uv[rows, columns] = rail_uv
            else:
                if keep is None:
                    keep = np.ones(n, dtype=bool)
                keep[rows] = False
        return keep


class SimulatedSource:
    """The simulated patient behind a simulated amplifier link."""

    MAX_BLOCK = 1 << 14

    def __init__(self, config: Config) -> None:
        self._config = config
        sim = config.acquisition.simulated
        self.sampling_rate_hz = sim.sampling_rate_hz
        self.n_channels = len(config.muscles)
        self.source_id = f"simulated-patient-seed{sim.seed}"
        self.duplicate_samples = 0
        self.non_finite_samples = 0  # the patient renders finite values only
        self.timestamps_back = 0  # its times come from its index
        self._delay_s = sim.transport_delay_ms * 1e-3
        self._faults = FaultSchedule(sim.faults, [m.name for m in config.muscles], sim.sampling_rate_hz)
        self._patient: SimulatedPatient | None = None
        self._next_index = 0
        self._last_delivered = -1
        self._start_s = 0.0

    def start(self, now_s: float) -> None:
        channel_to_muscle = {s.device_channel: self._config.muscle_index(s.muscle) for s in self._config.stimulation}
        muscles = [m.name for m in self._config.muscles]
        self._start_s = now_s
        self._patient = SimulatedPatient(self._config.acquisition.simulated, muscles, channel_to_muscle, now_s)

    def read(self, now_s: float) -> list[Block]:
        assert self._patient is not None, "start() first"
        due = int(np.floor((now_s - self._delay_s - self._start_s) * self.sampling_rate_hz)) + 1
        n = min(due - self._next_index, self.MAX_BLOCK)
        if n <= 0:
            return []
        first = self._next_index
        emg_uv = np.empty((n, self.n_channels), dtype=np.float32)
        truth = np.empty((n, self.n_channels), dtype=np.float32)
        self._patient.render(first, emg_uv, truth)
        self._next_index += n
        sim = self._config.acquisition.simulated
        keep = self._faults.apply(first, emg_uv, sim.dc_offset_uv, sim.rail_uv)
        if keep is None:
            lost = first - self._last_delivered - 1  # after a drop that ended with the previous read
            self._last_delivered = first + n - 1
            return [Block(first, self._time_s(first), emg_uv, lost, truth)]
        delivered = first + np.flatnonzero(keep)
        if delivered.size == 0:
            return []
        steps = np.diff(delivered, prepend=self._last_delivered)
        gap_rows = np.flatnonzero(steps > 1)
        scan = GapScan(keep, gap_rows, steps[gap_rows] - 1, 0)
        emg_uv, truth = emg_uv[keep], truth[keep]
        blocks = [
            Block(index, self._time_s(index), emg_uv[start:stop], lost, truth[start:stop])
            for start, stop, index, lost in segments(delivered.size, scan, self._last_delivered + 1)
        ]
        self._last_delivered = int(delivered[-1])
        return blocks

    def _time_s(self, index: int) -> float:
        return self._start_s + index / self.sampling_rate_hz

    def restart(self, now_s: float) -> None:
        """Nothing to reopen: the simulated link only pauses when a fault says so."""

    def take_events(self) -> list[SourceEvent]:
        """Its times come from its own index: nothing to report."""
        return []

    def on_pulses(self, pulses: protocol.Pulses) -> None:
        if self._patient is not None:
            self._patient.add_pulses(pulses.channel, pulses.time_s, pulses.amplitude_ma, pulses.pulse_width_us)

    def stop(self) -> None:
        self._patient = None
