"""Each control law against scripted inputs: exact outputs at thresholds, hysteresis,
ramp edges, window wrap-around and anti-windup."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.ergometer import SimulatedErgometer
from controller.laws import CrankState, LawInputs
from controller.laws.channels import ChannelLaws, build_law
from controller.laws.cycling import Cycling, window_centre_deg, window_profile
from controller.laws.pi import PI
from controller.laws.proportional import Proportional
from controller.laws.tracking import Tracking
from controller.laws.triggered import Phase, Triggered
from fesloop.config import (
    CyclingLaw,
    ErgometerConfig,
    ProportionalLaw,
    TrackingLaw,
    TriggeredLaw,
    load_config,
    parse_config,
)
from tests.conftest import CONFIGS
from tests.fesloop.test_config import DEMO, edit


def run(law, times_s, activations, crank=None) -> list[float]:
    return [law.step(t, LawInputs(a, crank)) for t, a in zip(times_s, activations)]


# ---------------------------------------------------------------- proportional


def test_proportional_deadband_switches_on_above_offset_plus_deadband_and_off_at_offset() -> None:
    law = Proportional(ProportionalLaw(gain=2.0, offset=0.1, deadband=0.1))
    out = run(law, [0, 1, 2, 3, 4, 5], [0.2, 0.25, 0.15, 0.1, 0.15, 0.2])
    # 0.2 is not above 0.1 + 0.1: off; 0.25 is: on; stays on down to 0.15; off at 0.1; 0.15 and 0.2 not enough again.
    assert out == pytest.approx([0.0, 0.3, 0.1, 0.0, 0.0, 0.0])


def test_proportional_min_and_max_intensity_clip_only_while_on() -> None:
    law = Proportional(ProportionalLaw(gain=1.0, offset=0.1, min_intensity=0.2, max_intensity=0.5))
    assert run(law, [0, 1, 2, 3], [0.1, 0.15, 0.5, 0.9]) == pytest.approx([0.0, 0.2, 0.4, 0.5])


def test_proportional_slew_limits_rise_and_fall_but_off_is_immediate() -> None:
    law = Proportional(ProportionalLaw(gain=1.0, offset=0.0, slew_per_s=2.0))
    out = run(law, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.9, 0.9, 0.9, 0.9, 0.1, 0.0])
    assert out == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.4, 0.0])


def test_proportional_smoothing_is_a_first_order_lag() -> None:
    law = Proportional(ProportionalLaw(gain=1.0, offset=0.0, smoothing_s=0.5))
    out = run(law, [0.0, 0.5, 1.0], [0.8, 0.8, 0.8])
    k = 1 - math.exp(-1)
    assert out == pytest.approx([0.0, 0.8 * k, 0.8 * k + (0.8 - 0.8 * k) * k])


def test_proportional_hold_forgets_state() -> None:
    law = Proportional(ProportionalLaw(gain=1.0, offset=0.0, slew_per_s=1.0))
    run(law, [0.0, 0.5], [1.0, 1.0])
    law.hold(0.6)
    assert run(law, [0.7], [1.0]) == pytest.approx([0.1])


# ---------------------------------------------------------------- triggered

TRAIN = TriggeredLaw(
    kind="triggered", on_threshold=0.3, off_threshold=0.1, min_duration_s=0.25, intensity=0.8,
    ramp_up_s=0.5, plateau_s=1.0, ramp_down_s=0.5, rest_s=1.0,
)


def test_triggered_hysteresis_and_minimum_duration() -> None:
    law = Triggered(TRAIN)
    # 0.29 is below on; 0.3 starts the attempt; 0.15 (above off) keeps it; 0.25 s later it triggers.
    assert run(law, [0.0, 0.125, 0.25, 0.375], [0.29, 0.3, 0.15, 0.15]) == [0.0] * 4
    assert law.phase is Phase.TRAIN
    assert [(e.time_s, e.kind) for e in law.events] == [(0.125, "trigger"), (0.375, "train_start")]


def test_triggered_attempt_reset_at_off_threshold() -> None:
    law = Triggered(TRAIN)
    run(law, [0.0, 0.125, 0.25, 0.375, 0.5], [0.5, 0.5, 0.1, 0.5, 0.5])
    assert law.phase is Phase.ARMED and not law.events  # 0.1 ended the first attempt; the second is 0.125 s old
    run(law, [0.625], [0.5])
    assert law.phase is Phase.TRAIN and law.events[0].time_s == 0.375


def test_triggered_train_shape_ignores_emg_and_rests() -> None:
    law = Triggered(TRAIN)
    run(law, [0.0, 0.25], [0.5, 0.5])  # train starts at 0.25
    times = [0.25, 0.5, 0.75, 1.25, 1.75, 2.0, 2.25, 2.75, 3.125]
    out = run(law, times, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert out == [0.0, 0.4, 0.8, 0.8, 0.8, 0.4, 0.0, 0.0, 0.0]
    assert (law.events[-1].kind, law.events[-1].time_s) == ("train_end", 2.25)
    assert law.phase is Phase.REST
    # Rest ends at 3.25, but the attempt must end (<= off) before a new one counts.
    run(law, [3.25, 3.375, 3.5], [1.0, 1.0, 1.0])
    assert law.phase is Phase.RELAX
    run(law, [3.625, 3.75, 4.0], [0.1, 0.3, 0.3])
    assert law.phase is Phase.TRAIN and law.events[-1].time_s == 4.0


def test_triggered_sets_and_max_repetitions() -> None:
    law = Triggered(TriggeredLaw(
        kind="triggered", on_threshold=0.3, off_threshold=0.1, min_duration_s=0.0, intensity=0.5,
        ramp_up_s=0.0, plateau_s=1.0, ramp_down_s=0.0, rest_s=1.0, reps_per_set=2, set_rest_s=5.0, max_repetitions=3,
    ))

    def attempt_at(t_s: float) -> float:
        law.step(t_s - 0.0625, LawInputs(0.0))
        return law.step(t_s, LawInputs(0.5))

    assert attempt_at(0.0) == 0.5
    assert law.step(1.0, LawInputs(0.0)) == 0.0  # train_end, rest until 2.0
    assert attempt_at(2.0) == 0.0 and law.phase is Phase.RELAX  # relaxed only before the rest ended
    assert attempt_at(2.5) == 0.5
    law.step(3.5, LawInputs(0.0))  # end of the set: rest 1 + set rest 5 -> until 9.5
    assert attempt_at(9.25) == 0.0 and law.phase is Phase.REST
    assert attempt_at(9.75) == 0.5
    law.step(10.75, LawInputs(0.0))
    assert law.phase is Phase.DONE and law.events[-1].kind == "max_repetitions"
    assert attempt_at(20.0) == 0.0
    assert [e.kind for e in law.events].count("train_start") == 3


def test_triggered_gate_closed_aborts_the_train() -> None:
    law = Triggered(TRAIN)
    run(law, [0.0, 0.25, 0.75], [0.5, 0.5, 0.0])
    law.hold(0.8)
    assert law.events[-1].kind == "train_aborted" and law.phase is Phase.REST
    assert run(law, [0.9], [0.0]) == [0.0]


# ---------------------------------------------------------------- PI and tracking


def test_pi_anti_windup_freezes_integral_while_saturated() -> None:
    pi = PI(kp=0.0, ki=1.0, lo=0.0, hi=1.0)
    outs = [pi.step(1.0, 0.25) for _ in range(8)]
    assert outs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert pi.integral == 1.0  # not 2.0: leaving saturation is immediate
    assert pi.step(-1.0, 0.25) == 0.75
    pi.reset()
    assert [pi.step(-1.0, 0.5), pi.integral] == [0.0, 0.0]


def test_pi_proportional_term_can_saturate_without_winding_the_integral() -> None:
    pi = PI(kp=2.0, ki=1.0, lo=0.0, hi=1.0)
    assert pi.step(0.6, 1.0) == 1.0 and pi.integral == 0.0
    assert pi.step(0.1, 1.0) == pytest.approx(0.3) and pi.integral == pytest.approx(0.1)


def test_tracking_target_trajectory_interpolates_repeats_and_rests_at_zero() -> None:
    law = Tracking(TrackingLaw(kind="tracking", target=((0.0, 0.0), (1.0, 0.4), (3.0, 0.4)), period_s=4.0, kp=1.0, ki=0.0))
    out = run(law, [10.0, 10.5, 11.0, 13.5, 14.0, 14.25], [0.0, 0.0, 0.1, 0.1, 0.0, 0.0])
    # t = 0 (target 0: rest), 0.5 (0.2), 1.0 (0.4), 3.5 (0.4 held), 4.0 = 0 again (rest), 0.25 (0.1).
    assert out == pytest.approx([0.0, 0.2, 0.3, 0.3, 0.0, 0.1])


def test_tracking_integrates_error_and_is_reset_by_a_closed_gate() -> None:
    law = Tracking(TrackingLaw(kind="tracking", target=((0.0, 0.5),), kp=0.0, ki=2.0, max_intensity=0.6))
    assert run(law, [0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.5, 0.0, 0.0]) == pytest.approx([0.0, 0.1, 0.1, 0.2, 0.3])
    law.hold(0.5)
    assert run(law, [0.6], [0.0]) == pytest.approx([0.1])


def test_tracking_mwave_probes_until_measured_then_hands_over_without_a_jump() -> None:
    law = Tracking(
        TrackingLaw(kind="tracking", measure="mwave", target=((0.0, 0.6),), probe_intensity=0.9, probe_s=0.15, kp=0.5, ki=2.0)
    )

    def step(t_s: float, mwave: float | None) -> float:
        return law.step(t_s, LawInputs(activation=0.0, mwave=mwave))  # activation is not the measure here

    assert [step(0.0, None), step(0.1, 1.0)] == [0.9, 0.9]  # measured, but still within probe_s
    assert step(0.2, 1.0) == pytest.approx(0.9)  # bumpless: the integral is preset to give the probe intensity
    assert law.pi.integral == pytest.approx((0.9 + 0.5 * 0.4) / 2.0)
    assert step(0.3, 0.8) == pytest.approx(0.5 * -0.2 + 2.0 * (0.55 - 0.02))
    # Fatigue: the M-wave falls below target, the intensity rises to the limit and the integral stops there.
    assert step(0.4, 0.5) == 1.0 and law.pi.integral == pytest.approx(0.53)
    law.hold(0.5)
    assert [step(0.6, 0.5), step(0.7, 0.5)] == [0.9, 0.9]  # after a closed gate: a new probe
    assert step(0.8, 0.5) == pytest.approx(0.9) and law.pi.integral == pytest.approx((0.9 - 0.5 * 0.1) / 2.0)


def test_tracking_activation_ignores_the_mwave() -> None:
    law = Tracking(TrackingLaw(kind="tracking", target=((0.0, 0.5),), kp=1.0, ki=0.0))
    assert law.step(0.0, LawInputs(activation=0.2, mwave=None)) == pytest.approx(0.3)
    assert law.step(0.1, LawInputs(activation=0.2, mwave=5.0)) == pytest.approx(0.3)


def test_channel_laws_feed_each_channel_its_muscles_mwave() -> None:
    config = parse_config((CONFIGS / "tracking_mwave.toml").read_text())
    laws = ChannelLaws(config)
    out = np.zeros(1, dtype=np.float32)
    probe_s = config.stimulation[0].law.probe_s
    laws.step(0.0, np.array([0.0]), np.array([True]), out, np.array([np.nan]))  # no M-wave yet: the probe
    assert out.tolist() == [pytest.approx(0.9)]
    laws.step(probe_s, np.array([0.0]), np.array([True]), out, np.array([0.4]))  # 0.2 below target
    assert out.tolist() == [pytest.approx(0.9)]
    laws.step(probe_s + 0.1, np.array([0.0]), np.array([True]), out, np.array([0.4]))
    assert out[0] == pytest.approx(0.9 + config.stimulation[0].law.ki * 0.2 * 0.1)  # + ki x error x dt


# ---------------------------------------------------------------- cycling


@pytest.mark.parametrize(
    ("angle_deg", "expected"),
    [(299.9, 0.0), (300.0, 0.0), (305.0, 0.5), (310.0, 1.0), (0.0, 1.0), (45.0, 0.5), (50.0, 0.0), (180.0, 0.0)],
)
def test_window_profile_wraps_through_zero_with_edge_ramps(angle_deg: float, expected: float) -> None:
    assert window_profile(angle_deg, 300.0, 50.0, 10.0) == pytest.approx(expected)


def cycling(**overrides) -> CyclingLaw:
    fields = dict(kind="cycling", window_deg=(300.0, 50.0), ramp_deg=0.0, emd_s=0.0, max_intensity=0.8)
    fields.update(overrides)
    return CyclingLaw(**fields)


def test_cycling_right_side_offset_and_window_centre() -> None:
    law = Cycling(cycling(offset_deg=180.0))
    assert law.step(0.0, LawInputs(0.0, CrankState(119.0, 30.0))) == 0.0
    assert law.step(0.0, LawInputs(0.0, CrankState(120.0, 30.0))) == 0.8  # right crank at 300: the window opens
    assert law.step(0.0, LawInputs(0.0, CrankState(229.0, 30.0))) == 0.8
    assert law.step(0.0, LawInputs(0.0, CrankState(230.0, 30.0))) == 0.0
    assert window_centre_deg(cycling(offset_deg=180.0)) == pytest.approx(175.0)


def test_cycling_phase_advance_grows_with_cadence() -> None:
    law = Cycling(cycling(emd_s=0.1))  # 60 rpm = 360 deg/s -> 36 deg earlier
    assert law.step(0.0, LawInputs(0.0, CrankState(263.0, 60.0))) == 0.0  # 263 + 36 = 299: not yet
    assert law.step(0.0, LawInputs(0.0, CrankState(264.0, 60.0))) == 0.8
    assert law.step(0.0, LawInputs(0.0, CrankState(13.0, 60.0))) == 0.8  # 13 + 36 = 49 in, 14 + 36 = 50 out
    assert law.step(0.0, LawInputs(0.0, CrankState(14.0, 60.0))) == 0.0
    assert law.step(0.0, LawInputs(0.0, CrankState(12.0, -20.0))) == 0.8  # backwards: no advance


def test_cycling_cadence_pi_and_emg_scaling() -> None:
    law = Cycling(cycling(target_cadence_rpm=40.0, kp_per_rpm=0.01, ki_per_rpm_s=0.0, emg_weight=0.5))
    crank = CrankState(0.0, 20.0)
    assert law.step(0.0, LawInputs(1.0, crank)) == pytest.approx(0.2)
    assert law.step(0.1, LawInputs(0.0, crank)) == pytest.approx(0.1)
    assert law.step(0.2, LawInputs(1.0, CrankState(0.0, 60.0))) == 0.0  # above target: PI at its minimum
    assert law.step(0.3, LawInputs(1.0, None)) == 0.0  # no crank: no stimulation


# ---------------------------------------------------------------- ergometer and channel laws


def ergometer(**cfg) -> SimulatedErgometer:
    return SimulatedErgometer(
        ErgometerConfig(**cfg), np.array([0, 1]), np.array([90.0, 270.0]), np.array([True, False]), lambda ma: ma / 100.0
    )


def test_ergometer_motor_holds_its_cadence_and_friction_stops_the_crank() -> None:
    erg = ergometer(motor_cadence_rpm=20.0, friction_nm_per_rpm=0.2, motor_max_torque_nm=10.0)
    erg.advance(0.0)
    crank = erg.advance(5.0)
    # Equilibrium: 10 * (20 - c) / 2 = 0.2 c -> c = 19.23 rpm.
    assert crank.cadence_rpm == pytest.approx(100.0 / 5.2, rel=1e-3)
    free = ergometer(friction_nm_per_rpm=0.2)
    free.cadence_rpm = 30.0
    free.advance(0.0)
    assert free.advance(20.0).cadence_rpm == pytest.approx(0.0, abs=1e-3)


def test_ergometer_torque_follows_delivered_pulses_at_the_peak_angle() -> None:
    erg = ergometer(max_torque_nm=10.0, friction_nm_per_rpm=0.0, force_tau_s=0.05)
    erg.angle_deg = 90.0
    erg.advance(0.0)
    erg.add_pulses(np.array([0.0, 0.0]), np.array([0, 1]), np.array([50.0, 50.0]))
    erg.advance(0.01)
    assert erg.torque_nm() > 0.0  # channel 1 does not push the crank
    erg.add_pulses(np.arange(0.02, 1.0, 0.02), np.zeros(49, int), np.full(49, 50.0))
    erg.advance(1.0)
    assert erg.cadence_rpm > 5.0
    erg.advance(3.0)  # pulses stopped at 0.98: force gone, no friction, cadence constant
    fast = erg.cadence_rpm
    erg.advance(4.0)
    assert erg.cadence_rpm == pytest.approx(fast, rel=1e-6)


def test_channel_laws_hold_closed_gates_and_publish_events() -> None:
    text = edit(
        'law = { kind = "proportional", gain = 1.5, offset = 0.1, max_intensity = 1.0 }\n\n[[stimulation]]',
        'law = { kind = "triggered", on_threshold = 0.3, min_duration_s = 0.0, ramp_up_s = 0.0 }\n\n[[stimulation]]',
        DEMO,
    )
    laws = ChannelLaws(parse_config(text))
    out = np.zeros(2, dtype=np.float32)
    laws.step(0.0, np.array([0.5, 0.5]), np.array([True, False]), out)
    assert out.tolist() == [pytest.approx(0.8), 0.0]
    assert [e["kind"] for e in laws.status()["law_events"]] == ["trigger", "train_start"]
    assert laws.status()["crank"] is None and laws.ergometer is None
    laws.step(0.1, np.array([0.5, 0.5]), np.array([False, False]), out)
    assert out.tolist() == [0.0, 0.0] and laws.status()["law_event_counts"]["train_aborted"] == 1


def test_a_non_finite_m_wave_or_law_output_never_reaches_the_command() -> None:
    """An M-wave normalized by a reference of 0 was inf: the PI's output went NaN and the stimulator
    dropped the whole command (all channels). Now it counts as no M-wave known."""
    laws = ChannelLaws(load_config(CONFIGS / "tracking_mwave.toml"))
    n = len(laws.laws)
    out = np.zeros(n, dtype=np.float32)
    for k in range(400):  # 4 s: past the probe, then steered by the (broken) M-wave
        laws.step(0.01 * k, np.zeros(1), np.ones(n, dtype=bool), out, mwave=np.full(1, np.inf))
        assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()


def test_build_law_gives_the_object_for_each_kind() -> None:
    assert isinstance(build_law(ProportionalLaw()), Proportional)
    assert isinstance(build_law(cycling()), Cycling)
