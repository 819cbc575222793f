"""PI controller with output limits and anti-windup by conditional integration."""

from __future__ import annotations


class PI:
    """u = kp * e + ki * integral(e dt), clipped to [lo, hi].

    The integral is frozen while the output is saturated and the error would push it
    further (clamping anti-windup), so leaving saturation is immediate when the error
    changes sign.
    """

    def __init__(self, kp: float, ki: float, lo: float, hi: float) -> None:
        self.kp, self.ki, self.lo, self.hi = kp, ki, lo, hi
        self.integral = 0.0

    def step(self, error: float, dt_s: float) -> float:
        candidate = self.integral + error * dt_s
        u = self.kp * error + self.ki * candidate
        if (u > self.hi and error > 0) or (u < self.lo and error < 0):
            u = self.kp * error + self.ki * self.integral
        else:
            self.integral = candidate
        return min(max(u, self.lo), self.hi)

    def preset(self, output: float, error: float) -> None:
        """Set the integral so the next step at ``error`` gives ``output`` (bumpless start, within limits)."""
        u = min(max(output, self.lo), self.hi)
        self.integral = (u - self.kp * error) / self.ki if self.ki else 0.0

    def reset(self) -> None:
        self.integral = 0.0
