"""The simulated stimulator: delivers pulses at each channel's frequency.

It stands where a device would: it is handed the amplitude per channel and emits a
pulse on each channel with a non-zero amplitude every 1/frequency, on the shared
clock: on its own grid, as a device's timer does, each pulse stamped with its grid
time (a call late by a period or more starts the grid again from then, so pulses are
never closer than 1/frequency). A channel going from zero to non-zero pulses at once,
unless its last pulse was less than a period ago; zero stops it at once.
It implements :class:`stimulator.drivers.base.Driver`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fesloop import protocol
from fesloop.config import StimulationChannel


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
        """Fire every pulse that is due, stamped with its time on the grid."""
        due = self.next_pulse_s <= now_s
        if not due.any():
            return None
        times_s = self.next_pulse_s[due]
        self.last_pulse_s[due] = times_s
        late = due & (now_s - self.next_pulse_s >= self.period_s)
        self.next_pulse_s[due] += self.period_s[due]
        self.next_pulse_s[late] = now_s + self.period_s[late]
        self.pulses_delivered += int(due.sum())
        return protocol.Pulses(
            self.device_channel[due],
            times_s,
            self.amplitude_ma[due].astype(np.float32),
            self.pulse_width_us[due],
        )
