"""The simulated stimulator paces each channel like a device: never two pulses closer than 1/frequency."""

from __future__ import annotations

import numpy as np

from fesloop.config import StimulationChannel
from stimulator.drivers.simulated import SimulatedDriver

QUAD = StimulationChannel(
    name="quad", muscle="quad", device_channel=0, electrode_area_cm2=25.0,
    threshold_ma=12.0, max_ma=40.0, pulse_width_us=300.0, frequency_hz=30.0,
)  # fmt: skip
PERIOD_S = 1 / 30
WIDTH_US = np.array([300.0])


def pulse_times(driver: SimulatedDriver, steps: list[tuple[float, float]]) -> list[float]:
    """(time, amplitude) per loop step: set the output, then deliver what is due."""
    times = []
    for now_s, amplitude_ma in steps:
        driver.set_output(np.array([amplitude_ma]), WIDTH_US, now_s)
        pulses = driver.deliver_due(now_s)
        if pulses is not None:
            times.extend(pulses.time_s.tolist())
    return times


def test_a_late_call_delays_the_train_instead_of_shortening_the_next_interval() -> None:
    """Delivered 11.7 ms late at 45 ms, the next pulse was still due at 66.7 ms: 21.7 ms after it."""
    times = pulse_times(SimulatedDriver([QUAD]), [(0.0, 20.0), (0.045, 20.0), (0.07, 20.0), (0.079, 20.0)])
    assert times == [0.0, 0.045, 0.079]
    assert min(np.diff(times)) >= PERIOD_S


def test_a_channel_switched_off_and_on_again_waits_out_its_period() -> None:
    """Zero then non-zero 5 ms after a pulse started a new train at once: 200 Hz from a flickering output."""
    steps = [(k * 0.001, 0.0 if k % 6 == 5 else 20.0) for k in range(1000)]
    times = pulse_times(SimulatedDriver([QUAD]), steps)
    assert len(times) >= 20 and min(np.diff(times)) >= PERIOD_S - 1e-12
