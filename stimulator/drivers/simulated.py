"""The simulated stimulator: delivers pulses at each channel's frequency.

It stands where a device would: it is handed the amplitude per channel and emits a
pulse on each channel with a non-zero amplitude every 1/frequency, on the shared
clock: on its own grid, as a device's timer does, each pulse stamped with its grid
time. A call later than ``MAX_STAMP_LAG_S`` fires the pulse then and starts the grid
again from there: the simulated patient puts a pulse's artifact and M-wave into the
EMG only if the pulse message arrives before the samples at its time are handed over
(``acquisition.simulated.transport_delay_ms``, 5 ms by default), so a stamp further in
the past would be a pulse the body never felt. Pulses are never closer than
1/frequency. A channel going from zero to non-zero pulses at once, unless its last
pulse was less than a period ago; zero stops it at once.
It implements :class:`stimulator.drivers.base.Driver`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fesloop import protocol
from fesloop.config import StimulationChannel

MAX_STAMP_LAG_S = 0.002  # leaves 3 ms of the default 5 ms transport delay for the pulse message


class SimulatedDriver:
    def __init__(self, channels: Sequence[StimulationChannel]) -> None:
        self.device_channel = np.array([c.device_channel for c in channels], dtype=np.uint16)
        self.period_s = np.array([1.0 / c.frequency_hz for c in channels])
        self.pulse_width_us = np.array([c.pulse_width_us for c in channels], dtype=np.float32)
        self.amplitude_ma = np.zeros(len(channels))
        self.next_pulse_s = np.full(len(channels), math.inf)
        self.last_pulse_s = np.full(len(channels), -math.inf)
        self.pulses_delivered = 0

    def ready(self) -> bool:
        return True

    def set_output(self, amplitude_ma: np.ndarray, pulse_width_us: np.ndarray, now_s: float) -> None:
        starting = (self.amplitude_ma == 0) & (amplitude_ma > 0)
        self.next_pulse_s[starting] = np.maximum(now_s, self.last_pulse_s + self.period_s)[starting]
        self.next_pulse_s[amplitude_ma == 0] = math.inf
        self.amplitude_ma[:] = amplitude_ma
        self.pulse_width_us[:] = pulse_width_us

    def keep_alive(self, now_s: float) -> None:
        """Nothing to keep alive: the simulated device has no watchdog."""

    def close(self) -> None:
        self.zero()

    def status(self) -> dict[str, Any]:
        return {"driver": "simulated"}

    def zero(self) -> None:
        self.amplitude_ma[:] = 0.0
        self.next_pulse_s[:] = math.inf

    def take_crank(self) -> protocol.Crank | None:
        """No ergometer behind the simulated stimulator (the controller simulates its own)."""
        return None

    def next_event_s(self) -> float:
        return float(self.next_pulse_s.min()) if len(self.next_pulse_s) else math.inf

    def deliver_due(self, now_s: float) -> protocol.Pulses | None:
        """Fire every pulse that is due, stamped with its time on the grid (or now, if that is too long ago)."""
        due = self.next_pulse_s <= now_s
        if not due.any():
            return None
        fired_s = np.where(now_s - self.next_pulse_s > MAX_STAMP_LAG_S, now_s, self.next_pulse_s)[due]
        self.last_pulse_s[due] = fired_s
        self.next_pulse_s[due] = fired_s + self.period_s[due]
        self.pulses_delivered += int(due.sum())
        return protocol.Pulses(
            self.device_channel[due],
            fired_s,
            self.amplitude_ma[due].astype(np.float32),
            self.pulse_width_us[due],
        )
