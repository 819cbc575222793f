"""EMG-triggered stimulation: a voluntary attempt starts a preset train (stroke therapy).

Phases: ARMED (watching for an attempt) -> TRAIN (ramp up, plateau, ramp down; EMG
ignored) -> REST (refractory, plus the set rest after each set; EMG ignored) -> RELAX
(waits for activation at or below ``off_threshold``, so one attempt gives one train)
-> ARMED. After ``max_repetitions`` trains: DONE, output 0 for the rest of the session.

An attempt starts when activation reaches ``on_threshold`` and lasts while it stays
above ``off_threshold`` (hysteresis); lasting ``min_duration_s`` triggers the train.
"""

from __future__ import annotations

from enum import Enum

from controller.laws.base import Events, LawInputs
from fesloop.config import TriggeredLaw


class Phase(Enum):
    ARMED = "armed"
    TRAIN = "train"
    REST = "rest"
    RELAX = "relax"
    DONE = "done"


def train_intensity(law: TriggeredLaw, t_s: float) -> float | None:
    """Intensity ``t_s`` after the train started; None once it is over."""
    if t_s < law.ramp_up_s:
        return law.intensity * t_s / law.ramp_up_s
    t_s -= law.ramp_up_s
    if t_s < law.plateau_s:
        return law.intensity
    t_s -= law.plateau_s
    if t_s < law.ramp_down_s:
        return law.intensity * (1.0 - t_s / law.ramp_down_s)
    return None


class Triggered(Events):
    """Stateful EMG-triggered train generator; events: trigger, train_start, train_end,
    train_aborted (gate closed during a train), max_repetitions."""

    def __init__(self, law: TriggeredLaw) -> None:
        super().__init__()
        self.law = law
        self.phase = Phase.ARMED
        self.attempt_start_s: float | None = None
        self.train_start_s = 0.0
        self.rest_until_s = 0.0
        self.repetitions = 0

    def step(self, now_s: float, inputs: LawInputs) -> float:
        law = self.law
        activation = inputs.activation
        if self.phase is Phase.REST and now_s >= self.rest_until_s:
            self.phase = Phase.RELAX
        if self.phase is Phase.RELAX and activation <= law.off_threshold:
            self.phase = Phase.ARMED
        if self.phase is Phase.ARMED:
            self._watch(now_s, activation)
        if self.phase is Phase.TRAIN:
            intensity = train_intensity(law, now_s - self.train_start_s)
            if intensity is not None:
                return intensity
            self.emit(now_s, "train_end")
            self._end_train(now_s)
        return 0.0

    def _watch(self, now_s: float, activation: float) -> None:
        law = self.law
        if self.attempt_start_s is None:
            if activation >= law.on_threshold:
                self.attempt_start_s = now_s
        elif activation <= law.off_threshold:
            self.attempt_start_s = None
        if self.attempt_start_s is not None and now_s - self.attempt_start_s >= law.min_duration_s:
            self.emit(self.attempt_start_s, "trigger")
            self.emit(now_s, "train_start")
            self.attempt_start_s = None
            self.phase = Phase.TRAIN
            self.train_start_s = now_s

    def _end_train(self, now_s: float) -> None:
        law = self.law
        self.repetitions += 1
        if law.max_repetitions and self.repetitions >= law.max_repetitions:
            self.emit(now_s, "max_repetitions")
            self.phase = Phase.DONE
            return
        set_done = law.reps_per_set > 0 and self.repetitions % law.reps_per_set == 0
        self.rest_until_s = now_s + law.rest_s + (law.set_rest_s if set_done else 0.0)
        self.phase = Phase.REST

    def hold(self, now_s: float) -> None:
        if self.phase is Phase.TRAIN:
            self.emit(now_s, "train_aborted")
            self._end_train(now_s)
        self.attempt_start_s = None
