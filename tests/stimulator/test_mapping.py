"""Intensity-to-mA mapping and the per-channel amplitude ceiling."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fesloop.config import StimulationChannel
from stimulator.limits import REHASTIM2
from stimulator.mapping import clamp_ma, intensity_to_ma


def channel(**overrides: float) -> StimulationChannel:
    settings_ = dict(
        name="quad",
        muscle="quad",
        device_channel=0,
        electrode_area_cm2=25.0,
        threshold_ma=12.0,
        max_ma=40.0,
        pulse_width_us=300.0,
        frequency_hz=30.0,
    )
    settings_.update(overrides)
    return StimulationChannel(**settings_)  # constructor on purpose: no load-time checks


def electrode_ma(area_cm2: float, pulse_width_us: float, frequency_hz: float) -> float:
    """I_peak <= 2 * A / sqrt(2 * PW * f), PW in s (DESIGN.md 5.2), written out independently."""
    return 2.0 * area_cm2 / math.sqrt(2.0 * (pulse_width_us / 1e6) * frequency_hz)


def as_arrays(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_zero_intensity_is_zero_ma_even_above_threshold() -> None:
    out = intensity_to_ma(np.zeros(2, np.float32), as_arrays(12.0, 10.0), as_arrays(40.0, 30.0), 1.0)
    assert out.tolist() == [0.0, 0.0]


def test_linear_between_threshold_and_max() -> None:
    u = np.array([1.0, 0.5, 0.25], dtype=np.float32)
    out = intensity_to_ma(u, as_arrays(12.0, 10.0, 0.0), as_arrays(40.0, 30.0, 8.0), 1.0)
    assert out.tolist() == [40.0, 20.0, 2.0]
    assert out.dtype == np.float64


def test_smallest_positive_intensity_gives_threshold() -> None:
    out = intensity_to_ma(np.array([1e-6], np.float32), as_arrays(12.0), as_arrays(40.0), 1.0)
    assert out.tolist() == [12.0]


def test_quantized_down_to_device_step() -> None:
    u = np.full(3, 0.33, dtype=np.float64)  # 10 + 0.33 * 20 = 16.6 mA
    assert intensity_to_ma(u, np.full(3, 10.0), np.full(3, 30.0), 1.0).tolist() == [16.0] * 3
    assert intensity_to_ma(u, np.full(3, 10.0), np.full(3, 30.0), 0.5).tolist() == [16.5] * 3


def test_quantization_ignores_float_division_noise() -> None:
    # 0.3 / 0.1 is 2.9999999999999996 in floats: still 3 steps, not 2
    out = intensity_to_ma(as_arrays(0.3), as_arrays(0.0), as_arrays(1.0), 0.1)
    assert out[0] == pytest.approx(0.3)


def test_never_above_max_when_max_is_off_grid() -> None:
    out = intensity_to_ma(as_arrays(1.0, 0.999), as_arrays(5.0, 5.0), as_arrays(30.7, 30.7), 1.0)
    assert out.tolist() == [30.0, 30.0]


def test_out_of_range_and_nan_intensity_never_exceed_max() -> None:
    out = intensity_to_ma(as_arrays(-0.5, np.nan, 7.0), np.full(3, 12.0), np.full(3, 40.0), 1.0)
    assert out.tolist() == [0.0, 0.0, 40.0]


@settings(deadline=None, max_examples=300)
@given(
    u=st.floats(0.0, 1.0),
    threshold_frac=st.floats(0.0, 1.0),
    max_ma=st.floats(0.0, 130.0),
    step_ma=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
)
def test_mapping_properties(u: float, threshold_frac: float, max_ma: float, step_ma: float) -> None:
    threshold_ma = threshold_frac * max_ma
    out = intensity_to_ma(as_arrays(u), as_arrays(threshold_ma), as_arrays(max_ma), step_ma)[0]
    if u == 0.0:
        assert out == 0.0
        return
    linear = threshold_ma + u * (max_ma - threshold_ma)
    assert out <= max_ma
    assert linear - step_ma < out <= linear + 1e-9 * step_ma
    steps = out / step_ma
    assert steps == pytest.approx(round(steps), abs=1e-6)
    higher = intensity_to_ma(as_arrays(min(1.0, u + 0.01)), as_arrays(threshold_ma), as_arrays(max_ma), step_ma)
    assert higher[0] >= out


def test_clamp_comfort_limited() -> None:
    assert clamp_ma(channel(max_ma=40.0), REHASTIM2) == 40.0


def test_clamp_device_limited() -> None:
    small_device = dataclasses.replace(REHASTIM2, amplitude_ma=(0.0, 25.0))
    assert clamp_ma(channel(max_ma=40.0), small_device) == 25.0


def test_clamp_electrode_limited_with_exact_formula() -> None:
    # 4 cm^2 at 500 us, 50 Hz allows 2 * 4 / sqrt(0.05) = 35.78 mA; comfort max says 60
    ch = channel(electrode_area_cm2=4.0, pulse_width_us=500.0, frequency_hz=50.0, max_ma=60.0)
    assert clamp_ma(ch, REHASTIM2) == pytest.approx(electrode_ma(4.0, 500.0, 50.0), rel=1e-12)
    assert clamp_ma(ch, REHASTIM2) == pytest.approx(35.777087639996634, rel=1e-12)


@settings(deadline=None, max_examples=200)
@given(
    area_cm2=st.floats(0.5, 200.0),
    pulse_width_us=st.floats(*REHASTIM2.pulse_width_us),
    frequency_hz=st.floats(*REHASTIM2.frequency_hz),
    max_ma=st.floats(0.0, 200.0),
    device_max_ma=st.floats(1.0, 130.0),
)
def test_clamp_is_min_of_device_comfort_electrode(
    area_cm2: float, pulse_width_us: float, frequency_hz: float, max_ma: float, device_max_ma: float
) -> None:
    device = dataclasses.replace(REHASTIM2, amplitude_ma=(0.0, device_max_ma))
    ch = channel(electrode_area_cm2=area_cm2, pulse_width_us=pulse_width_us, frequency_hz=frequency_hz, max_ma=max_ma)
    expected = min(device_max_ma, max_ma, electrode_ma(area_cm2, pulse_width_us, frequency_hz))
    assert clamp_ma(ch, device) == pytest.approx(expected, rel=1e-12)


LOAD_OHM = 1000.0  # the RehaStim2's specified load (fault matrix, row 17)
MAX_POWER_DENSITY_W_PER_CM2 = 0.1


@settings(max_examples=500)
@given(
    area_cm2=st.floats(0.5, 400.0),
    pulse_width_us=st.floats(20.0, 500.0),
    frequency_hz=st.floats(1.0, 50.0),
)
def test_the_ceiling_also_keeps_the_matrix_power_density_limit(
    area_cm2: float, pulse_width_us: float, frequency_hz: float
) -> None:
    """Row 17 names 0.1 W/cm^2 besides 2 mA/cm^2 rms. At the 1 kOhm load the two agree at 25 cm^2;
    above it the power limit is the stricter one, but it stays above the device's 130 mA for any
    pulse width and frequency in range, so the ceiling (device, comfort, 2 mA/cm^2) keeps it too."""
    ceiling_ma = clamp_ma(
        channel(electrode_area_cm2=area_cm2, pulse_width_us=pulse_width_us, frequency_hz=frequency_hz, max_ma=130.0),
        REHASTIM2,
    )
    duty = 2.0 * pulse_width_us * 1e-6 * frequency_hz
    rms_a = ceiling_ma * 1e-3 * math.sqrt(duty)
    assert rms_a**2 * LOAD_OHM / area_cm2 <= MAX_POWER_DENSITY_W_PER_CM2 * (1 + 1e-9)
