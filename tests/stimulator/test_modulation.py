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


def test_pulse_width_channel_is_off_until_its_charge_reaches_the_device_minimum_width() -> None:
    amplitude, width = modulate(np.array([0.0, 0.0]), CEILING, WIDTH, PWM, REHASTIM2)
    assert amplitude.tolist() == [0.0, 0.0]
    amplitude, width = modulate(np.array([0.0, 2.6]), CEILING, WIDTH, PWM, REHASTIM2)
    assert amplitude[1] == 0.0  # 19.5 us: raised to the 20 us minimum it would be more than asked
    amplitude, width = modulate(np.array([0.0, 2.7]), CEILING, WIDTH, PWM, REHASTIM2)
    assert amplitude[1] == 40.0 and width[1] == 20.0  # 20.25 us, floored to the 1 us grid


@settings(max_examples=300)
@given(
    ceiling_ma=st.floats(1.0, 130.0),
    width_us=st.floats(20.0, 500.0),
    ramp_ma=st.lists(st.floats(0.0, 130.0), min_size=1, max_size=20),
)
def test_pulse_width_channel_charge_never_exceeds_what_the_kernel_output_asks(
    ceiling_ma: float, width_us: float, ramp_ma: list[float]
) -> None:
    """The kernel's ramp limits output_ma; the charge per pulse delivered must follow it
    (output x configured width), for every output along any ramp, so it rises no faster."""
    for output_ma in ramp_ma:
        output_ma = min(output_ma, ceiling_ma)
        amplitude, width = modulate(
            np.array([output_ma]), np.array([ceiling_ma]), np.array([width_us]), np.array([True]), REHASTIM2
        )
        assert amplitude[0] * width[0] <= output_ma * width_us + 1e-6


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
