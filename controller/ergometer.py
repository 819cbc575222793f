"""A simulated ergometer whose cadence answers the stimulation actually delivered.

It runs inside the controller, fed by the ``pulses`` stream the controller already
receives, so no new process or message is needed; an LSL or MOTOmed crank source
would take its place behind the same ``advance(now_s) -> CrankState``.

Per stimulation channel, force follows the recruitment of its latest pulse (the
simulated patient's curve) through a first-order lag (the electromechanical delay)
and is 0 once pulses stop; torque = max_torque_nm x force x cos(angle - peak angle).
A motor holds at least ``motor_cadence_rpm`` (MOTOmed-style assist); friction is
viscous. Integrated with sub-steps of at most 1 ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from controller.laws.base import CrankState
from controller.laws.cycling import DEG_PER_S_PER_RPM
from fesloop.config import ErgometerConfig

MAX_SUBSTEP_S = 1e-3
PULSE_GAP_S = 0.1  # no pulse for this long: the muscle is no longer stimulated (stimulation >= 10 Hz)
MOTOR_STIFFNESS_RPM = 2.0  # the motor gives its maximum torque this far below its cadence
RAD_PER_S_PER_RPM = 2.0 * math.pi / 60.0


class SimulatedErgometer:
    def __init__(
        self,
        cfg: ErgometerConfig,
        device_channel: np.ndarray,
        peak_deg: np.ndarray,
        pushes: np.ndarray,
        recruitment: Callable[[float], float],
    ) -> None:
        """``peak_deg``/``pushes`` per stimulation channel: best torque angle, whether it drives the crank."""
        self.cfg = cfg
        self._index = {int(c): i for i, c in enumerate(device_channel)}
        self._peak_rad = np.radians(np.asarray(peak_deg, dtype=np.float64))
        self._pushes = np.asarray(pushes, dtype=bool)
        self._recruitment = recruitment
        n = len(self._peak_rad)
        self.drive = np.zeros(n)
        self.force = np.zeros(n)
        self.last_pulse_s = np.full(n, -math.inf)
        self.angle_deg = 0.0
        self.cadence_rpm = 0.0
        self.time_s: float | None = None

    def add_pulses(self, time_s: np.ndarray, device_channel: np.ndarray, amplitude_ma: np.ndarray) -> None:
        """Delivered pulses: the newest pulse per channel sets its drive."""
        for t_s, channel, amplitude in zip(time_s, device_channel, amplitude_ma):
            i = self._index.get(int(channel))
            if i is not None and t_s >= self.last_pulse_s[i]:
                self.last_pulse_s[i] = t_s
                self.drive[i] = self._recruitment(float(amplitude)) if amplitude > 0 else 0.0

    def torque_nm(self) -> float:
        """Net torque on the crank now (muscles + motor - friction)."""
        cfg = self.cfg
        muscles = cfg.max_torque_nm * float(
            np.sum(self.force * np.cos(math.radians(self.angle_deg) - self._peak_rad), where=self._pushes)
        )
        motor = 0.0
        if cfg.motor_cadence_rpm > 0:
            shortfall_rpm = cfg.motor_cadence_rpm - self.cadence_rpm
            motor = min(max(cfg.motor_max_torque_nm * shortfall_rpm / MOTOR_STIFFNESS_RPM, 0.0), cfg.motor_max_torque_nm)
        return muscles + motor - cfg.friction_nm_per_rpm * self.cadence_rpm

    def advance(self, now_s: float) -> CrankState:
        """Integrate up to ``now_s`` (the first call only sets the time origin)."""
        if self.time_s is None:
            self.time_s = now_s
        n_steps = max(math.ceil((now_s - self.time_s) / MAX_SUBSTEP_S), 0)
        if n_steps:
            dt_s = (now_s - self.time_s) / n_steps
            decay = 1.0 - math.exp(-dt_s / self.cfg.force_tau_s)
            for _ in range(n_steps):
                self.time_s += dt_s
                active = self.time_s - self.last_pulse_s <= PULSE_GAP_S
                self.force += (np.where(active, self.drive, 0.0) - self.force) * decay
                accel_rpm_per_s = self.torque_nm() / self.cfg.inertia_kg_m2 / RAD_PER_S_PER_RPM
                self.cadence_rpm += accel_rpm_per_s * dt_s
                self.angle_deg = (self.angle_deg + self.cadence_rpm * DEG_PER_S_PER_RPM * dt_s) % 360.0
        return CrankState(self.angle_deg, self.cadence_rpm)
