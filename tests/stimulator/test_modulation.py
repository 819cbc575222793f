"""Per-channel modulation: amplitude, or pulse width at the ceiling current."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stimulator.limits import REHASTIM2, electrode_limit_ma
from stimulator.mapping import modulate

CEILING = np.array([40.0, 40.5])
WIDTH = np.array([300.0, 300.0])
PWM = np.array([False, True])


def test_amplitude_channel_passes_output_through_at_its_width() -> None:
    amplitude, width = modulate(np.array([25.0, 0.0]), CEILING, WIDTH, PWM, REHASTIM2)
    assert amplitude.tolist() == [25.0, 0.0] and width.tolist() == [300.0, 300.0]


def test_pulse_width_channel_holds_the_ceiling_and_scales_the_width() -> None:
    amplitude, width = modulate(np.array([0.0, 20.0]), CEILING, WIDTH, PWM, REHASTIM2)
    assert amplitude.tolist() == [0.0, 40.0]  # ceiling on the device's 1 mA grid
    assert width.tolist() == [300.0, 150.0]  # 20 mA x 300 us of charge = 40 mA x 150 us


def test_pulse_width_channel_at_zero_and_at_the_device_minimum() -> None:
    amplitude, width = modulate(np.array([0.0, 0.0]), CEILING, WIDTH, PWM, REHASTIM2)
    assert amplitude.tolist() == [0.0, 0.0]
    amplitude, width = modulate(np.array([0.0, 1.0]), CEILING, WIDTH, PWM, REHASTIM2)
    assert amplitude[1] == 40.0 and width[1] == 20.0  # 7.5 us raised to the device minimum


@settings(max_examples=200)
@given(
    area=st.floats(1.0, 100.0),
    width_us=st.floats(20.0, 500.0),
    frequency_hz=st.floats(1.0, 50.0),
    fraction=st.floats(0.0, 1.0),
)
def test_pulse_width_modulation_never_exceeds_current_width_or_electrode_density(
    area: float, width_us: float, frequency_hz: float, fraction: float
) -> None:
    ceiling = min(130.0, electrode_limit_ma(area, width_us, frequency_hz))
    amplitude, width = modulate(
        np.array([fraction * ceiling]), np.array([ceiling]), np.array([width_us]), np.array([True]), REHASTIM2
    )
    assert amplitude[0] <= ceiling and width[0] <= width_us
    assert amplitude[0] <= electrode_limit_ma(area, width[0], frequency_hz) + 1e-9
