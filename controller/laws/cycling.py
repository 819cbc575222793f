"""FES cycling: stimulate each muscle while the crank is in its window.

Angles are crank degrees (0 = left crank at top dead centre, forward positive). Each
channel sees the crank in its own frame (minus ``offset_deg``: 180 for the right
side), advanced by cadence x electromechanical delay so the force arrives in the
window, with linear ramps of ``ramp_deg`` at both edges.
"""

from __future__ import annotations

from controller.laws.base import Events, LawInputs
from controller.laws.pi import PI
from fesloop.config import CyclingLaw

DEG_PER_S_PER_RPM = 6.0


def window_profile(angle_deg: float, start_deg: float, end_deg: float, ramp_deg: float) -> float:
    """0..1 at ``angle_deg`` for the window [start, end) (wraps through 0 when start > end)."""
    width_deg = (end_deg - start_deg) % 360.0
    into_deg = (angle_deg - start_deg) % 360.0
    if into_deg >= width_deg:
        return 0.0
    if ramp_deg <= 0:
        return 1.0
    return min(1.0, into_deg / ramp_deg, (width_deg - into_deg) / ramp_deg)


def window_centre_deg(law: CyclingLaw) -> float:
    """Middle of the window in ergometer degrees (the simulated ergometer's best torque angle)."""
    start_deg, end_deg = law.window_deg
    return (start_deg + ((end_deg - start_deg) % 360.0) / 2.0 + law.offset_deg) % 360.0


class Cycling(Events):
    """Window pattern x intensity (fixed, or a cadence PI) x EMG scaling."""

    def __init__(self, law: CyclingLaw) -> None:
        super().__init__()
        self.law = law
        self.pi = (
            PI(law.kp_per_rpm, law.ki_per_rpm_s, law.min_intensity, law.max_intensity)
            if law.target_cadence_rpm > 0
            else None
        )
        self.last_s: float | None = None

    def pattern(self, angle_deg: float, cadence_rpm: float) -> float:
        """Window profile at the angle the crank will reach after the electromechanical delay."""
        law = self.law
        advance_deg = max(cadence_rpm, 0.0) * DEG_PER_S_PER_RPM * law.emd_s
        return window_profile(angle_deg - law.offset_deg + advance_deg, *law.window_deg, law.ramp_deg)

    def step(self, now_s: float, inputs: LawInputs) -> float:
        law = self.law
        dt_s = 0.0 if self.last_s is None else now_s - self.last_s
        self.last_s = now_s
        if inputs.crank is None:
            return 0.0
        cadence_rpm = inputs.crank.cadence_rpm
        level = self.pi.step(law.target_cadence_rpm - cadence_rpm, dt_s) if self.pi else law.max_intensity
        level *= 1.0 - law.emg_weight + law.emg_weight * inputs.activation
        return self.pattern(inputs.crank.angle_deg, cadence_rpm) * level

    def hold(self, now_s: float) -> None:
        if self.pi:
            self.pi.reset()
        self.last_s = now_s
