"""Device and electrode limits: pure functions, used at config load and per command.

Electrode limit (DESIGN.md 5.2): current density at most 2 mA/cm^2 rms. For a
biphasic pulse train of peak current I, phase width PW (s) and rate f (Hz), the rms
current is I * sqrt(2 * PW * f), so I_peak <= 2 * A / sqrt(2 * PW * f).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_RMS_DENSITY_MA_PER_CM2 = 2.0


@dataclass(frozen=True)
class DeviceLimits:
    """What a stimulator can deliver; every channel setting must lie within."""

    name: str
    amplitude_ma: tuple[float, float]
    pulse_width_us: tuple[float, float]
    frequency_hz: tuple[float, float]
    amplitude_step_ma: float
    n_channels: int


REHASTIM2 = DeviceLimits(
    name="RehaStim2",
    amplitude_ma=(0.0, 130.0),
    pulse_width_us=(20.0, 500.0),
    frequency_hz=(1.0, 50.0),
    amplitude_step_ma=1.0,
    n_channels=8,
)

DEVICES = {"simulated": REHASTIM2, "rehastim2": REHASTIM2}


def electrode_limit_ma(area_cm2: float, pulse_width_us: float, frequency_hz: float) -> float:
    """Largest peak current (mA) that keeps the electrode at 2 mA/cm^2 rms."""
    duty = 2.0 * pulse_width_us * 1e-6 * frequency_hz
    return MAX_RMS_DENSITY_MA_PER_CM2 * area_cm2 / math.sqrt(duty)


class LimitError(ValueError):
    """A channel setting breaks a device or electrode limit."""

    def __init__(self, key: str, value: float, limit: str) -> None:
        self.key = key
        self.value = value
        self.limit = limit
        super().__init__(f"{key} = {value!r}: {limit}")


def check_channel(
    device: DeviceLimits,
    device_channel: int,
    max_ma: float,
    threshold_ma: float,
    pulse_width_us: float,
    frequency_hz: float,
    electrode_area_cm2: float,
) -> None:
    """Raise LimitError naming the first limit the channel settings break."""
    if not 0 <= device_channel < device.n_channels:
        raise LimitError("device_channel", device_channel, f"{device.name} has channels 0..{device.n_channels - 1}")
    lo, hi = device.pulse_width_us
    if not lo <= pulse_width_us <= hi:
        raise LimitError("pulse_width_us", pulse_width_us, f"{device.name} pulse width range is {lo:g}-{hi:g} us")
    lo, hi = device.frequency_hz
    if not lo <= frequency_hz <= hi:
        raise LimitError("frequency_hz", frequency_hz, f"{device.name} frequency range is {lo:g}-{hi:g} Hz")
    lo, hi = device.amplitude_ma
    if not lo <= max_ma <= hi:
        raise LimitError("max_ma", max_ma, f"{device.name} amplitude range is {lo:g}-{hi:g} mA")
    if not 0 <= threshold_ma <= max_ma:
        raise LimitError("threshold_ma", threshold_ma, f"motor threshold must be within 0..max_ma ({max_ma:g} mA)")
    if not 0 < electrode_area_cm2 < math.inf:  # NaN too: the electrode limit would drop out of the clamp
        raise LimitError("electrode_area_cm2", electrode_area_cm2, "electrode area must be a positive finite number")
    limit = electrode_limit_ma(electrode_area_cm2, pulse_width_us, frequency_hz)
    if max_ma > limit:
        raise LimitError(
            "max_ma",
            max_ma,
            f"electrode limit 2 mA/cm^2 rms: {electrode_area_cm2:g} cm^2 at {pulse_width_us:g} us, "
            f"{frequency_hz:g} Hz allows at most {limit:.1f} mA",
        )
