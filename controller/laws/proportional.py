"""Proportional (myoelectric) control: intensity follows the muscle's activation."""

from __future__ import annotations

import math

from controller.laws.base import Events, LawInputs
from fesloop.config import ProportionalLaw


def proportional(activation: float, law: ProportionalLaw) -> float:
    """gain * (activation - offset) clipped to [min_intensity, max_intensity]; 0 at or below offset."""
    if activation <= law.offset:
        return 0.0
    return min(max(law.gain * (activation - law.offset), law.min_intensity), law.max_intensity)


class Proportional(Events):
    """:func:`proportional` with a deadband on switching on, then smoothing and a slew limit.

    Off is always exactly 0 (any intensity > 0 is at least the threshold current), so
    smoothing and slew shape the output only while on.
    """

    def __init__(self, law: ProportionalLaw) -> None:
        super().__init__()
        self.law = law
        self.on = False
        self.output = 0.0
        self.last_s: float | None = None

    def step(self, now_s: float, inputs: LawInputs) -> float:
        law = self.law
        dt_s = 0.0 if self.last_s is None else now_s - self.last_s
        self.last_s = now_s
        threshold = law.offset if self.on else law.offset + law.deadband
        self.on = inputs.activation > threshold
        if not self.on:
            self.output = 0.0
            return 0.0
        target = proportional(inputs.activation, law)
        out = target
        if law.smoothing_s > 0:
            out = self.output + (target - self.output) * (1.0 - math.exp(-dt_s / law.smoothing_s))
        if law.slew_per_s > 0:
            step = law.slew_per_s * dt_s
            out = min(max(out, self.output - step), self.output + step)
        self.output = out
        return out

    def hold(self, now_s: float) -> None:
        self.on = False
        self.output = 0.0
        self.last_s = now_s
