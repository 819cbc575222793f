"""The law of every stimulation channel, and the crank the cycling laws read.

This is what the controller loop holds: it feeds delivered pulses (to the simulated
ergometer) or external crank readings (LSL, MOTOmed), advances the crank, closes the
gates of cycling channels while the crank is unknown (NO_CRANK), and steps every law
once per control tick; a closed gate holds the law and gives 0. Law events are kept (most recent first out) for the status message and
handed to the loop once each for the LSL markers stream.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from acquisition.patient import recruitment
from controller.crank import CrankTracker
from controller.ergometer import SimulatedErgometer
from controller.laws.base import Law, LawInputs
from controller.laws.cycling import Cycling, window_centre_deg
from controller.laws.proportional import Proportional
from controller.laws.tracking import Tracking
from controller.laws.triggered import Triggered
from fesloop.config import Config, CyclingLaw, ProportionalLaw, TrackingLaw, TriggeredLaw
from fesloop.protocol import GateReason

RECENT_EVENTS = 32


def build_law(law: ProportionalLaw | TriggeredLaw | TrackingLaw | CyclingLaw) -> Law:
    """The stateful law object for a channel's ``law`` table."""
    laws = {ProportionalLaw: Proportional, TriggeredLaw: Triggered, TrackingLaw: Tracking, CyclingLaw: Cycling}
    return laws[type(law)](law)


class ChannelLaws:
    def __init__(self, config: Config) -> None:
        self.names = [s.name for s in config.stimulation]
        self.laws = [build_law(s.law) for s in config.stimulation]
        self._muscle = [config.muscle_index(s.muscle) for s in config.stimulation]
        # A law steered by M-waves needs each chunk's before its command; otherwise they can follow the send.
        self.uses_mwave = any(isinstance(s.law, TrackingLaw) and s.law.measure == "mwave" for s in config.stimulation)
        cycling = [isinstance(s.law, CyclingLaw) for s in config.stimulation]
        self.cycling = np.array(cycling, dtype=bool)
        crank = config.controller.crank
        self.ergometer = (
            SimulatedErgometer(
                config.controller.ergometer,
                np.array([s.device_channel for s in config.stimulation]),
                np.array([window_centre_deg(s.law) if c else 0.0 for s, c in zip(config.stimulation, cycling)]),
                np.array(cycling),
                lambda amplitude_ma: recruitment(amplitude_ma, config.acquisition.simulated),
            )
            if any(cycling) and crank.source == "simulated"
            else None
        )
        self.tracker = CrankTracker(crank.stale_ms * 1e-3) if any(cycling) and crank.source != "simulated" else None
        self.crank = None
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.event_counts: dict[str, int] = {}
        self.unpublished: list[tuple[str, float]] = []  # "kind channel" markers not yet taken by the loop

    def add_pulses(self, time_s: np.ndarray, device_channel: np.ndarray, amplitude_ma: np.ndarray) -> None:
        if self.ergometer is not None:
            self.ergometer.add_pulses(time_s, device_channel, amplitude_ma)

    def add_crank(
        self, time_s: np.ndarray, angle_deg: np.ndarray, cadence_rpm: np.ndarray | None, received_s: float
    ) -> None:
        """External crank readings on this process's clock, received at ``received_s`` (ignored with the
        simulated ergometer)."""
        if self.tracker is not None:
            self.tracker.add(time_s, angle_deg, cadence_rpm, received_s)

    def advance_crank(self, now_s: float) -> None:
        """The crank at ``now_s``, for the gates and the laws of this tick."""
        if self.ergometer is not None:
            self.crank = self.ergometer.advance(now_s)
        elif self.tracker is not None:
            self.crank = self.tracker.state(now_s)

    def crank_gates(self, gate_reason: np.ndarray) -> None:
        """Close the open gates of cycling channels (NO_CRANK) while the crank is unknown."""
        if self.tracker is not None and self.crank is None:
            gate_reason[self.cycling & (gate_reason == GateReason.OPEN)] = GateReason.NO_CRANK

    def step(
        self,
        now_s: float,
        activation: np.ndarray | None,
        gate_open: np.ndarray,
        out: np.ndarray,
        mwave: np.ndarray | None = None,
    ) -> None:
        """Write each channel's intensity into ``out`` (0 where the gate is closed).

        Cycling laws read the crank of the last :meth:`advance_crank`.
        ``mwave``: normalized M-wave amplitude per muscle, NaN where none is known yet.
        """
        for i, law in enumerate(self.laws):
            if gate_open[i] and activation is not None:
                muscle = self._muscle[i]
                evoked = None if mwave is None or not np.isfinite(mwave[muscle]) else float(mwave[muscle])
                out[i] = law.step(now_s, LawInputs(float(activation[muscle]), self.crank, evoked))
                if not math.isfinite(out[i]):  # never sent: the stimulator would drop the whole command
                    out[i] = 0.0
                    self.event_counts["non_finite_output"] = self.event_counts.get("non_finite_output", 0) + 1
            else:
                law.hold(now_s)
                out[i] = 0.0
            for event in law.events:
                self.recent_events.append({"time_s": event.time_s, "channel": self.names[i], "kind": event.kind})
                self.event_counts[event.kind] = self.event_counts.get(event.kind, 0) + 1
                self.unpublished.append((f"{event.kind} {self.names[i]}", event.time_s))
            law.events.clear()

    def take_unpublished(self) -> list[tuple[str, float]]:
        """Law events since the last call, as (marker text, time) for the markers stream."""
        events, self.unpublished = self.unpublished, []
        return events

    def status(self) -> dict[str, Any]:
        crank = (
            {"angle_deg": round(self.crank.angle_deg, 2), "cadence_rpm": round(self.crank.cadence_rpm, 3)}
            if self.crank is not None
            else None
        )
        status: dict[str, Any] = {
            "law_events": list(self.recent_events), "law_event_counts": dict(self.event_counts), "crank": crank
        }
        if self.tracker is not None:
            status["crank_readings"] = self.tracker.readings
            status["crank_out_of_order"] = self.tracker.out_of_order
            status["crank_not_finite"] = self.tracker.not_finite
            status["crank_future"] = self.tracker.future
        return status
