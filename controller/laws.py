"""Control laws: activation in, stimulation intensity 0..1 out. Pure functions."""

from __future__ import annotations

from fesloop.config import ProportionalLaw


def proportional(activation: float, law: ProportionalLaw) -> float:
    """Myoelectric proportional control: gain * (activation - offset), 0 below offset."""
    if activation <= law.offset:
        return 0.0
    return min(law.gain * (activation - law.offset), law.max_intensity)
