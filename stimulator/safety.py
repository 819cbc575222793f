"""The stimulator's safety kernel: state machine, command checks, watchdog, clamp and ramp.

Pure logic: no I/O, no sockets, no clock. Every time-dependent call takes the time
(``now_s``, ``received_s``) from the stimulator's own monotonic clock, so the process
loop owns time and tests can step it. It enforces DESIGN.md section 5: output only
when ARMED, never above the channel ceiling, rise ramped, drops immediate, gate
closed -> 0, no fresh command within the deadline -> FAULT (latched), STOP latched
until reset, and reset never restarts output. A channel back at 0 stays there for one
period of its frequency, so no device pulses it faster than configured.

The process loop must call :meth:`SafetyKernel.fault` on any exception (zero first,
then report), and send the device keep-alive only after an update that found a fresh
command (state still ARMED).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fesloop.config import StimulationChannel, StimulatorConfig
from fesloop.protocol import Command, GateReason
from fesloop.schema import check_ranges
from stimulator.limits import DeviceLimits, check_channel
from stimulator.mapping import clamp_ma, intensity_to_ma

RECENT_FAULTS = 16  # fault reasons kept for the status (fault_count counts them all)


class StimState(enum.Enum):
    DISARMED = "DISARMED"
    ARMED = "ARMED"
    FAULT = "FAULT"
    STOPPED = "STOPPED"


class SafetyRefused(RuntimeError):
    """A control request the kernel refuses; the message says why."""


@dataclass(frozen=True)
class _Accepted:
    """The latest accepted command, as the kernel uses it."""

    intensity: np.ndarray  # float64 (n_channels,), checked finite and 0..1
    gate_open: np.ndarray  # bool (n_channels,), already closed if the EMG was stale
    received_s: float  # stimulator clock
    emg_fresh: bool  # the EMG it was based on was within max_emg_age_ms on this clock


class SafetyKernel:
    """Decides, from the latest valid command and the time, what each channel delivers."""

    def __init__(self, channels: Sequence[StimulationChannel], device: DeviceLimits, cfg: StimulatorConfig) -> None:
        check_ranges(cfg, "stimulator")  # a ramp_s of 0 built in code would be no ramp at all
        for ch in channels:  # refuse channels built without the config checks
            check_channel(
                device,
                ch.device_channel,
                ch.max_ma,
                ch.threshold_ma,
                ch.pulse_width_us,
                ch.frequency_hz,
                ch.electrode_area_cm2,
            )
        self.n_channels = len(channels)
        self.clamp_ma = np.array([clamp_ma(ch, device) for ch in channels], dtype=np.float64)
        self._threshold_ma = np.array([ch.threshold_ma for ch in channels], dtype=np.float64)
        self._max_ma = np.array([ch.max_ma for ch in channels], dtype=np.float64)
        self._step_ma = device.amplitude_step_ma
        self._rise_ma_per_s = self.clamp_ma / cfg.ramp_s
        self._period_s = np.array([1.0 / ch.frequency_hz for ch in channels], dtype=np.float64)
        self._on = np.zeros(self.n_channels, dtype=bool)  # output above 0 at the last update
        self._cut_s = np.full(self.n_channels, -math.inf)  # the update that found a channel's output back at 0
        self._deadline_ms = cfg.deadline_ms
        self._max_emg_age_s = cfg.max_emg_age_ms / 1e3

        self.state = StimState.DISARMED
        self.fault_reason = ""
        self.fault_count = 0  # FAULTs latched since start: a reset in between does not hide one
        self.recent_faults: deque[str] = deque(maxlen=RECENT_FAULTS)
        self.output_ma = np.zeros(self.n_channels)
        self.last_seq = -1  # no command accepted yet
        self.accepted = 0
        self.rejected = 0
        self._latest: _Accepted | None = None
        self._last_update_s = 0.0  # set on arm; the ramp is measured from here
        self._events: list[str] = []
        self.dose_locked = np.zeros(self.n_channels, dtype=bool)  # set by the session's dose limits

    # -- commands ------------------------------------------------------------------

    def accept(self, seq: int, command: Command, received_s: float, emg_clock_offset_s: float = 0.0) -> bool:
        """Keep ``command`` as the latest if it is newer and valid; else count it as rejected.

        ``emg_clock_offset_s`` is the acquisition host's clock minus this one's (0 on one
        host, where every process reads the same clock; NaN while it is not known, which
        closes every gate of the command without rejecting it).
        """
        checked = self._check(seq, command, received_s, emg_clock_offset_s)
        if checked is None:
            self.rejected += 1
            return False
        self._latest = checked
        self.last_seq = int(seq)
        self.accepted += 1
        return True

    def _check(self, seq: int, command: Command, received_s: float, emg_clock_offset_s: float) -> _Accepted | None:
        """The command as the kernel will use it, or None if anything about it is wrong.

        Re-checks what the decoder checked: the kernel trusts nobody. EMG older (or
        further in the future) than max_emg_age_ms at ``received_s``, judged on this
        clock, closes every gate; so does an unknown acquisition clock offset.
        """
        try:
            if seq <= self.last_seq:
                return None
            intensity = np.array(command.intensity, dtype=np.float64)
            gate_open = np.array(command.gate_open)
            gate_reason = np.array(command.gate_reason)
            emg_age_s = float(received_s) - float(command.newest_emg_time_s)
        except (AttributeError, TypeError, ValueError):
            return None
        shape = (self.n_channels,)
        if intensity.shape != shape or gate_open.shape != shape or gate_reason.shape != shape:
            return None
        if gate_open.dtype != np.bool_ or not math.isfinite(emg_age_s):
            return None
        # Value by value (a few channels: cheaper than numpy's per-call cost); NaN fails the comparison.
        if not all(0.0 <= value <= 1.0 for value in intensity.tolist()):
            return None
        pairs = zip(gate_open.tolist(), gate_reason.tolist())
        if any(is_open != (reason == GateReason.OPEN) for is_open, reason in pairs):
            return None
        emg_fresh = abs(emg_age_s + float(emg_clock_offset_s)) <= self._max_emg_age_s  # False for NaN
        return _Accepted(intensity, gate_open & emg_fresh, float(received_s), emg_fresh)

    def _fresh_command(self, now_s: float) -> _Accepted | None:
        """The latest command if it arrived within the deadline, else None (NaN times: None)."""
        latest = self._latest
        if latest is None or not now_s - latest.received_s <= self._deadline_ms / 1e3:
            return None
        return latest

    # -- output --------------------------------------------------------------------

    def check_deadline(self, now_s: float) -> None:
        """FAULT if ARMED without a command fresh at ``now_s``.

        The loop calls it before reading queued commands: a stimulator that was itself
        frozen must latch FAULT, not take its backlog as fresh.
        """
        if self.state is StimState.ARMED and self._fresh_command(now_s) is None:
            self.fault(f"no fresh command within {self._deadline_ms:g} ms")

    def update(self, now_s: float) -> np.ndarray:
        """The output (mA per channel) to hand the driver at ``now_s``."""
        self.check_deadline(now_s)
        latest = self._fresh_command(now_s)
        if self.state is not StimState.ARMED or latest is None:
            return self._handed(now_s)
        level_ma = intensity_to_ma(latest.intensity, self._threshold_ma, self._max_ma, self._step_ma)
        # A channel cut to 0 stays there one stimulation period: the device starts a new train at once,
        # so a gate flickering open and closed would otherwise pulse it faster than its frequency (and
        # above the electrode's rms limit, which is computed at that frequency).
        resting = ~self._on & (now_s < self._cut_s + self._period_s)
        target_ma = np.where(latest.gate_open & ~resting, np.minimum(level_ma, self.clamp_ma), 0.0)
        rise_ma = self._rise_ma_per_s * max(now_s - self._last_update_s, 0.0)
        following = np.minimum(target_ma, self.output_ma + rise_ma)  # drops are immediate
        # A channel past its dose limit ramps down (no abrupt end of a contraction) and stays at 0.
        ramping_down = np.maximum(self.output_ma - rise_ma, 0.0)
        self.output_ma = np.where(self.dose_locked, np.minimum(following, ramping_down), following)
        self._last_update_s = now_s
        return self._handed(now_s)

    def _handed(self, now_s: float) -> np.ndarray:
        """The output handed to the driver at ``now_s``; a channel found back at 0 (cut by this update,
        or by a state change since the last one) notes the time."""
        on = self.output_ma > 0
        self._cut_s[self._on & ~on] = now_s
        self._on = on
        return self.output_ma.copy()

    # -- control -------------------------------------------------------------------

    def arm_refusal(self, now_s: float) -> str:
        """Why ``arm`` would be refused at ``now_s`` ("" when it would not)."""
        if self.state is StimState.ARMED:
            return "already ARMED"
        if self.state is not StimState.DISARMED:
            return f"cannot arm while {self.state.value} ({self.fault_reason}): reset first"
        latest = self._fresh_command(now_s)
        if latest is None:
            return f"no fresh command within {self._deadline_ms:g} ms: is the controller running?"
        if not latest.emg_fresh:
            return (
                f"the latest command's EMG is not within {self._max_emg_age_s * 1e3:g} ms on this clock "
                "(acquisition stalled, or its clock offset not known yet)"
            )
        return ""

    def arm(self, now_s: float) -> None:
        """DISARMED -> ARMED, only with a fresh controller command based on fresh EMG; output ramps up from 0."""
        refusal = self.arm_refusal(now_s)
        if refusal:
            raise SafetyRefused(refusal)
        self._last_update_s = now_s
        self._enter(StimState.ARMED, "armed")

    def disarm(self) -> None:
        """ARMED -> DISARMED, output zero at once; nothing to do in any other state."""
        if self.state is StimState.ARMED:
            self._enter(StimState.DISARMED, "disarm requested")

    def stop(self, reason: str = "stop requested") -> None:
        """Latched e-stop from any state: output zero until an explicit reset."""
        if self.state is not StimState.STOPPED:
            self.fault_reason = reason
            self._enter(StimState.STOPPED, reason)

    def fault(self, reason: str) -> None:
        """Latched fault, output zero at once. The first cause is kept; STOPPED stays STOPPED."""
        if self.state not in (StimState.FAULT, StimState.STOPPED):
            self.fault_reason = reason
            self.fault_count += 1
            self.recent_faults.append(reason)
            self._enter(StimState.FAULT, reason)

    def reset(self) -> None:
        """Back to DISARMED with zero output; forgets the last command, so arming needs a fresh one.

        The sequence number is forgotten too, so a restarted controller (counting from 1
        again) can be armed after a reset. A backlog replayed after the reset cannot
        stimulate: the state is DISARMED, and its EMG is too old to open a gate.
        """
        self._latest = None
        self.last_seq = -1
        self.fault_reason = ""
        if self.state is not StimState.DISARMED:
            self._enter(StimState.DISARMED, "reset")

    def _enter(self, state: StimState, why: str) -> None:
        self._events.append(f"{self.state.value} -> {state.value}: {why}")
        self.state = state
        self.output_ma = np.zeros(self.n_channels)

    # -- reporting -----------------------------------------------------------------

    def pop_events(self) -> list[str]:
        """State-change messages since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def snapshot(self) -> dict[str, Any]:
        """State and counters as a JSON-able dict, for the status stream."""
        return {
            "state": self.state.value,
            "fault_reason": self.fault_reason,
            "fault_count": self.fault_count,
            "recent_faults": list(self.recent_faults),
            "output_ma": self.output_ma.tolist(),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "last_seq": self.last_seq,
        }
