"""Target tracking: a PI drives a measured quantity of the channel's muscle along a target trajectory.

The measure is the estimator's activation of the channel's muscle, or (``measure =
"mwave"``) its evoked M-wave amplitude normalized to the muscle's reference. Holding
the M-wave on target compensates fatigue: as the muscle's response to each pulse
shrinks, the PI raises the intensity (configs/tracking_mwave.toml). An M-wave exists
only once pulses are delivered, so until one is measured, and for at least ``probe_s``,
the law stimulates at ``probe_intensity`` open loop, then hands over to the PI without
a jump.
"""

from __future__ import annotations

import numpy as np

from controller.laws.base import Events, LawInputs
from controller.laws.pi import PI
from fesloop.config import TrackingLaw


class Tracking(Events):
    """PI toward ``target(t)``, t from the first step. A target of 0 is rest: output 0, integral reset."""

    def __init__(self, law: TrackingLaw) -> None:
        super().__init__()
        self.law = law
        self.pi = PI(law.kp, law.ki, law.min_intensity, law.max_intensity)
        self._times_s = np.array([t for t, _ in law.target])
        self._values = np.array([v for _, v in law.target])
        self.start_s: float | None = None
        self.last_s: float | None = None
        self.probing = True  # mwave: open loop at probe_intensity until the PI takes over
        self.probe_start_s: float | None = None

    def target(self, now_s: float) -> float:
        """The target value at ``now_s`` (the trajectory starts at the first step)."""
        t_s = now_s - (now_s if self.start_s is None else self.start_s)
        if self.law.period_s:
            t_s %= self.law.period_s
        return float(np.interp(t_s, self._times_s, self._values))

    def step(self, now_s: float, inputs: LawInputs) -> float:
        if self.start_s is None:
            self.start_s = now_s
        dt_s = 0.0 if self.last_s is None else now_s - self.last_s
        self.last_s = now_s
        target = self.target(now_s)
        if target <= 0.0:
            self.hold(now_s)
            return 0.0
        if self.law.measure == "activation":
            return self.pi.step(target - inputs.activation, dt_s)
        if self.probe_start_s is None:
            self.probe_start_s = now_s
        if inputs.mwave is None or now_s - self.probe_start_s < self.law.probe_s:
            return self.law.probe_intensity
        error = target - inputs.mwave
        if self.probing:
            self.probing = False
            self.pi.preset(self.law.probe_intensity, error)
            dt_s = 0.0
        return self.pi.step(error, dt_s)

    def hold(self, now_s: float) -> None:
        self.pi.reset()
        self.probing = True
        self.probe_start_s = None
        self.last_s = now_s
