"""What every control law shares: its inputs, its events and its interface.

A law is a small stateful object stepped at the control rate with the time passed in
(no clock, no I/O), so tests drive it with scripted inputs and exact times. It only
ever produces an intensity 0..1; the stimulator enforces every limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CrankState:
    """Ergometer crank: angle (0 = left crank at top dead centre, forward positive) and cadence."""

    angle_deg: float
    cadence_rpm: float


@dataclass(frozen=True, slots=True)
class LawInputs:
    """What a law may read each step: its muscle's activation, when cycling the crank, and its
    muscle's normalized M-wave amplitude (None until one is measured and normalized)."""

    activation: float
    crank: CrankState | None = None
    mwave: float | None = None


@dataclass(frozen=True, slots=True)
class LawEvent:
    """A marker from a law (trigger, train_start, train_end, train_aborted, max_repetitions)."""

    time_s: float
    kind: str


class Law(Protocol):
    events: list[LawEvent]

    def step(self, now_s: float, inputs: LawInputs) -> float:
        """Intensity 0..1 for this control tick (the gate is open)."""

    def hold(self, now_s: float) -> None:
        """The gate is closed (output 0): drop state that must not carry over (integrals, trains)."""


@dataclass
class Events:
    """A law's event list (mixin): appended by the law, drained by whoever publishes them."""

    events: list[LawEvent] = field(default_factory=list)

    def emit(self, time_s: float, kind: str) -> None:
        self.events.append(LawEvent(time_s, kind))
