"""Per-session dose accounting: what each channel delivered and which limits it reached.

Pure: pulses and output levels in, totals and exhausted channels out. The session
starts at the first arm and lasts as long as the stimulator process. Charge is per
phase of a biphasic pulse (amplitude x pulse width: mA x us = nC).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fesloop.config import DoseLimits, StimulationChannel
from fesloop.schema import check_ranges


class DoseTracker:
    def __init__(self, channels: Sequence[StimulationChannel], limits: DoseLimits) -> None:
        check_ranges(limits, "stimulator.dose")  # built in code: a NaN limit would never be reached
        self.names = [c.name for c in channels]
        self.limits = limits
        n = len(channels)
        self._index_of_device = {c.device_channel: i for i, c in enumerate(channels)}
        self.session_start_s: float | None = None
        self.stimulated_s = np.zeros(n)
        self.charge_nc = np.zeros(n)
        self.pulses = np.zeros(n, dtype=np.int64)
        self.peak_ma = np.zeros(n)
        self.amplitude_sum_ma = np.zeros(n)
        self.exhausted_reason: list[str] = ["" for _ in range(n)]
        # Where each channel's allowance counts from: the session start, or its last override.
        self._allowance_start_s = np.full(n, np.nan)
        self._stimulated_base_s = np.zeros(n)
        self._charge_base_nc = np.zeros(n)
        self.overrides = np.zeros(n, dtype=np.int64)
        self.skin_check_due = False  # becomes True once, after skin_check_after_s of stimulation
        self._last_update_s: float | None = None

    def start_session(self, now_s: float) -> None:
        if self.session_start_s is None:
            self.session_start_s = now_s

    def on_pulses(self, device_channel: np.ndarray, amplitude_ma: np.ndarray, pulse_width_us: np.ndarray) -> None:
        for channel, amplitude, width in zip(device_channel, amplitude_ma, pulse_width_us):
            i = self._index_of_device[int(channel)]
            self.pulses[i] += 1
            self.charge_nc[i] += float(amplitude) * float(width)
            self.amplitude_sum_ma[i] += float(amplitude)
            self.peak_ma[i] = max(self.peak_ma[i], float(amplitude))

    def update(self, now_s: float, output_ma: np.ndarray) -> list[str]:
        """Account stimulated time up to ``now_s``; returns limits newly reached and reminders, as messages."""
        if self._last_update_s is not None:
            self.stimulated_s[output_ma > 0] += max(now_s - self._last_update_s, 0.0)
        self._last_update_s = now_s
        reached = []
        for i, name in enumerate(self.names):
            if self.exhausted_reason[i]:
                continue
            reason = self._limit_reached(i, now_s)
            if reason:
                self.exhausted_reason[i] = reason
                reached.append(f"{name}: {reason}")
        threshold_s = self.limits.skin_check_after_s
        if threshold_s > 0 and not self.skin_check_due and self.stimulated_s.max() >= threshold_s:
            self.skin_check_due = True
            reached.append(f"skin check due after {threshold_s:g} s of stimulation: check the skin under every electrode")
        return reached

    def _limit_reached(self, i: int, now_s: float) -> str:
        limits = self.limits
        start_s = self.session_start_s if np.isnan(self._allowance_start_s[i]) else self._allowance_start_s[i]
        if limits.max_session_s > 0 and start_s is not None:
            if now_s - start_s >= limits.max_session_s:
                return f"session duration limit {limits.max_session_s:g} s reached"
        if limits.max_stimulation_s > 0 and self.stimulated_s[i] - self._stimulated_base_s[i] >= limits.max_stimulation_s:
            return f"stimulation time limit {limits.max_stimulation_s:g} s reached"
        if limits.max_charge_mc > 0 and self.charge_nc[i] - self._charge_base_nc[i] >= limits.max_charge_mc * 1e6:
            return f"charge limit {limits.max_charge_mc:g} mC reached"
        return ""

    @property
    def exhausted(self) -> np.ndarray:
        return np.array([bool(r) for r in self.exhausted_reason])

    def override(self, channel_name: str, now_s: float) -> None:
        """Lift a reached limit for one channel (the caller logs who and why).

        The channel gets a fresh allowance counted from now: another ``max_session_s``,
        ``max_stimulation_s`` and ``max_charge_mc``; totals keep counting.
        """
        i = self.names.index(channel_name)
        self.exhausted_reason[i] = ""
        self._allowance_start_s[i] = now_s
        self._stimulated_base_s[i] = self.stimulated_s[i]
        self._charge_base_nc[i] = self.charge_nc[i]
        self.overrides[i] += 1

    def summary(self) -> list[dict[str, Any]]:
        """Per channel: time stimulated, charge, pulses, peak and mean amplitude, limit reached."""
        return [
            {
                "channel": name,
                "stimulated_s": round(float(self.stimulated_s[i]), 3),
                "charge_mc": round(float(self.charge_nc[i]) * 1e-6, 6),
                "pulses": int(self.pulses[i]),
                "peak_ma": float(self.peak_ma[i]),
                "mean_ma": round(float(self.amplitude_sum_ma[i] / self.pulses[i]), 3) if self.pulses[i] else 0.0,
                "limit_reached": self.exhausted_reason[i],
                "overrides": int(self.overrides[i]),
            }
            for i, name in enumerate(self.names)
        ]
