"""Dose accounting: each limit trips at its boundary; totals match the pulses."""

from __future__ import annotations

import numpy as np
import pytest

from fesloop.config import DoseLimits, StimulationChannel
from stimulator.dose import DoseTracker

CHANNELS = [
    StimulationChannel(name="quad", muscle="quad", device_channel=0, electrode_area_cm2=25.0,
                       threshold_ma=12.0, max_ma=40.0, pulse_width_us=300.0, frequency_hz=30.0),
    StimulationChannel(name="tib", muscle="tib", device_channel=3, electrode_area_cm2=16.0,
                       threshold_ma=10.0, max_ma=30.0, pulse_width_us=250.0, frequency_hz=30.0),
]  # fmt: skip


def tracker(**limits: float) -> DoseTracker:
    base = {"max_session_s": 0.0, "max_stimulation_s": 0.0, "max_charge_mc": 0.0, "skin_check_after_s": 0.0}
    return DoseTracker(CHANNELS, DoseLimits(**{**base, **limits}))


def test_stimulation_time_limit_trips_at_its_boundary_per_channel() -> None:
    dose = tracker(max_stimulation_s=1.0)
    dose.start_session(0.0)
    output = np.array([20.0, 0.0])
    t = 0.0
    dose.update(t, output)
    while t < 0.99:
        t = round(t + 0.01, 10)
        assert dose.update(t, output) == []
    assert not dose.exhausted.any()
    reached = dose.update(1.0, output)
    assert reached == ["quad: stimulation time limit 1 s reached"]
    assert dose.exhausted.tolist() == [True, False]  # the idle channel keeps going
    assert dose.update(2.0, output) == []  # reported once


def test_charge_limit_trips_at_its_boundary() -> None:
    dose = tracker(max_charge_mc=0.024)  # 2 pulses of 40 mA x 300 us = 24,000 nC
    dose.start_session(0.0)
    dose.on_pulses(np.array([0]), np.array([40.0]), np.array([300.0]))
    assert dose.update(0.1, np.zeros(2)) == []
    dose.on_pulses(np.array([0]), np.array([40.0]), np.array([300.0]))
    assert dose.update(0.2, np.zeros(2)) == ["quad: charge limit 0.024 mC reached"]


def test_session_duration_limit_trips_every_channel() -> None:
    dose = tracker(max_session_s=10.0)
    dose.update(5.0, np.zeros(2))
    assert dose.update(500.0, np.zeros(2)) == []  # no session before the first arm
    dose.start_session(500.0)
    assert dose.update(509.999, np.zeros(2)) == []
    assert len(dose.update(510.0, np.zeros(2))) == 2
    assert dose.exhausted.all()


def test_override_gives_one_channel_a_fresh_allowance_after_which_it_trips_again() -> None:
    dose = tracker(max_stimulation_s=0.5)
    dose.start_session(0.0)
    dose.update(0.0, np.array([10.0, 0.0]))
    dose.update(0.5, np.array([10.0, 0.0]))
    dose.override("quad", 0.5)
    assert not dose.exhausted.any()
    assert dose.update(0.99, np.array([10.0, 0.0])) == []  # 0.49 s of the new 0.5 s
    assert dose.update(1.0, np.array([10.0, 0.0])) == ["quad: stimulation time limit 0.5 s reached"]
    assert dose.summary()[0]["stimulated_s"] == 1.0 and dose.summary()[0]["overrides"] == 1


@pytest.mark.parametrize(
    "limits, reason",
    [
        ({"max_charge_mc": 0.003}, "charge limit 0.003 mC reached"),  # 10 mA x 300 us = 3 nC per pulse
        ({"max_session_s": 1.0}, "session duration limit 1 s reached"),
    ],
)
def test_override_of_a_charge_or_session_limit_counts_from_the_override(limits: dict, reason: str) -> None:
    dose = tracker(**limits)
    dose.start_session(0.0)
    for k in range(2000):
        t = k * 0.001
        dose.update(t, np.array([10.0, 0.0]))
        dose.on_pulses(np.array([0]), np.array([10.0]), np.array([0.3]))
        if dose.exhausted[0]:
            break
    tripped_s = t
    dose.override("quad", tripped_s)
    assert dose.update(tripped_s + 0.001, np.array([10.0, 0.0])) == []
    again = []
    for k in range(1, 3000):
        dose.on_pulses(np.array([0]), np.array([10.0]), np.array([0.3]))
        again = dose.update(tripped_s + 0.001 * k, np.array([10.0, 0.0]))
        if again:
            break
    assert again == [f"quad: {reason}"]
    assert 0.8 * tripped_s <= 0.001 * k <= 1.2 * tripped_s + 0.002  # the same allowance again


def test_skin_check_reminder_once_after_the_configured_stimulation_time() -> None:
    dose = tracker(skin_check_after_s=2.0)
    dose.start_session(0.0)
    dose.update(0.0, np.array([10.0, 0.0]))
    dose.update(1.9, np.array([10.0, 0.0]))
    assert not dose.skin_check_due
    assert dose.update(2.0, np.array([10.0, 0.0])) == [
        "skin check due after 2 s of stimulation: check the skin under every electrode"
    ]
    assert dose.skin_check_due
    assert dose.update(3.0, np.array([10.0, 0.0])) == []  # reminded once


def test_summary_matches_the_delivered_pulses() -> None:
    rng = np.random.default_rng(0)
    dose = tracker()
    channel = rng.choice([0, 3], size=200)
    amplitude = rng.uniform(5, 40, size=200).round()
    width = np.where(channel == 0, 300.0, 250.0)
    for start in range(0, 200, 7):
        dose.on_pulses(channel[start : start + 7], amplitude[start : start + 7], width[start : start + 7])
    summary = {row["channel"]: row for row in dose.summary()}
    for name, device in (("quad", 0), ("tib", 3)):
        mine = channel == device
        assert summary[name]["pulses"] == mine.sum()
        assert summary[name]["charge_mc"] == pytest.approx((amplitude[mine] * width[mine]).sum() * 1e-6)
        assert summary[name]["peak_ma"] == amplitude[mine].max()
        assert summary[name]["mean_ma"] == pytest.approx(amplitude[mine].mean(), abs=1e-3)
