"""Normalized intensity (0..1) to milliamps, and the hard amplitude ceiling of a channel.

Pure functions over numpy arrays; the safety kernel calls them on every update.
"""

from __future__ import annotations

import numpy as np

from fesloop.config import StimulationChannel
from stimulator.limits import DeviceLimits, electrode_limit_ma

# A value within this fraction of a device step below a grid point counts as on it,
# so float division noise (0.3 / 0.1 = 2.9999...) does not cost a whole step.
_GRID_TOLERANCE_STEPS = 1e-9


def clamp_ma(channel: StimulationChannel, device: DeviceLimits) -> float:
    """The most a channel may ever deliver (mA): the smallest of the device's maximum,
    the channel's comfort maximum and the electrode limit (2 mA/cm^2 rms)."""
    electrode_ma = electrode_limit_ma(channel.electrode_area_cm2, channel.pulse_width_us, channel.frequency_hz)
    return min(device.amplitude_ma[1], channel.max_ma, electrode_ma)


def intensity_to_ma(
    intensity: np.ndarray, threshold_ma: np.ndarray, max_ma: np.ndarray, step_ma: float
) -> np.ndarray:
    """Per channel: 0 -> 0 mA; u > 0 -> threshold + u * (max - threshold), quantized down
    to the device step and never above max (float64).

    Anything not > 0 (including NaN) maps to 0 mA, so a bad value can only switch off.
    """
    u = np.asarray(intensity, dtype=np.float64)
    threshold = np.asarray(threshold_ma, dtype=np.float64)
    ceiling = np.asarray(max_ma, dtype=np.float64)
    linear_ma = threshold + u * (ceiling - threshold)
    quantized_ma = np.floor(linear_ma / step_ma + _GRID_TOLERANCE_STEPS) * step_ma
    return np.where(u > 0, np.minimum(quantized_ma, ceiling), 0.0)


def modulate(
    output_ma: np.ndarray,
    ceiling_ma: np.ndarray,
    pulse_width_us: np.ndarray,
    pulse_width_modulated: np.ndarray,
    device: DeviceLimits,
) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's output per channel (mA) to (amplitude mA, pulse width us) for the driver.

    Amplitude channels: the output at the configured pulse width. Pulse-width channels:
    the current is the ceiling (on the device step) and the pulse width is scaled so the
    charge per pulse matches output x configured width, floored to 1 us; below the
    device's minimum width the channel is off (raising it to the minimum would give
    more charge than the kernel's ramp allows). The width never exceeds the configured
    one, so peak current and rms density stay within the limits the config was checked
    against, and the charge per pulse never exceeds output x configured width.
    """
    output = np.asarray(output_ma, dtype=np.float64)
    step = device.amplitude_step_ma
    ceiling = np.floor(np.asarray(ceiling_ma, dtype=np.float64) / step + _GRID_TOLERANCE_STEPS) * step
    width = np.asarray(pulse_width_us, dtype=np.float64)
    scaled_us = np.floor(width * np.minimum(output / np.where(ceiling > 0, ceiling, 1.0), 1.0) + 1e-9)
    on = np.where(pulse_width_modulated, scaled_us >= device.pulse_width_us[0], output > 0)
    amplitude = np.where(pulse_width_modulated, np.where(on, ceiling, 0.0), output)
    return amplitude, np.where(pulse_width_modulated & on, np.minimum(scaled_us, width), width)
