"""Target tracking: a PI drives the channel's muscle activation along a target trajectory.

The measured quantity is the estimator's activation of the channel's muscle. With
blanking that covers only the stimulus artifact (not the M-wave), that activation
includes the evoked response, so the PI compensates fatigue (configs/tracking.toml).
The estimator does not expose a separate M-wave amplitude yet; when it does, it can be
fed here as another measured quantity.
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

    def target(self, now_s: float) -> float:
        """The target activation at ``now_s`` (the trajectory starts at the first step)."""
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
            self.pi.reset()
            return 0.0
        return self.pi.step(target - inputs.activation, dt_s)

    def hold(self, now_s: float) -> None:
        self.pi.reset()
        self.last_s = now_s
