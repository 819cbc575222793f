"""The safety kernel: DESIGN.md section 5 invariants, example by example and by property."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fesloop.config import DoseLimits, StimulationChannel, StimulatorConfig
from fesloop import protocol
from fesloop.protocol import Command, GateReason
from fesloop.schema import ConfigError, build
from stimulator.limits import REHASTIM2, LimitError, electrode_limit_ma
from stimulator.dose import DoseTracker
from stimulator.mapping import intensity_to_ma
from stimulator.safety import SafetyKernel, SafetyRefused, StimState

CFG = build(StimulatorConfig, {"deadline_ms": 100.0, "ramp_s": 0.5, "max_emg_age_ms": 250.0})
QUAD = StimulationChannel(
    name="quad", muscle="quad", device_channel=0, electrode_area_cm2=25.0,
    threshold_ma=12.0, max_ma=40.0, pulse_width_us=300.0, frequency_hz=30.0,
)  # fmt: skip
TIB = StimulationChannel(
    name="tib", muscle="tib", device_channel=1, electrode_area_cm2=16.0,
    threshold_ma=10.0, max_ma=30.0, pulse_width_us=250.0, frequency_hz=30.0,
)  # fmt: skip
# full-scale rise: 40 mA / 0.5 s and 30 mA / 0.5 s
RISE_MA_PER_S = np.array([80.0, 60.0])


def command(
    intensity: Sequence[float],
    gate_open: Sequence[bool] | None = None,
    emg_time_s: float | None = None,
    now_s: float = 0.0,
) -> Command:
    """A well-formed command; EMG 5 ms old unless told otherwise."""
    gate = np.ones(len(intensity), bool) if gate_open is None else np.array(gate_open, bool)
    reason = np.where(gate, GateReason.OPEN, GateReason.CONTAMINATED).astype(np.uint8)
    emg_time_s = now_s - 0.005 if emg_time_s is None else emg_time_s
    return Command(emg_time_s, np.array(intensity, np.float32), gate, reason)


class Loop:
    """Drives a kernel like the process loop does: a command then an update every tick."""

    def __init__(self) -> None:
        self.kernel = SafetyKernel([QUAD, TIB], REHASTIM2, CFG)
        self.seq = 0
        self.now_s = 0.0

    def send(self, intensity: Sequence[float], **kwargs: object) -> bool:
        self.seq += 1
        cmd = command(intensity, now_s=self.now_s, **kwargs)  # type: ignore[arg-type]
        return self.kernel.accept(self.seq, cmd, self.now_s)

    def tick(self, dt_s: float, intensity: Sequence[float] | None = None, **kwargs: object) -> np.ndarray:
        self.now_s += dt_s
        if intensity is not None:
            self.send(intensity, **kwargs)
        return self.kernel.update(self.now_s)

    def armed_at_full(self) -> None:
        """Arm on a full-intensity command and ramp to the ceiling."""
        self.send([1.0, 1.0])
        self.kernel.arm(self.now_s)
        for _ in range(60):
            out = self.tick(0.01, [1.0, 1.0])
        assert out.tolist() == [40.0, 30.0]


# -- state machine -------------------------------------------------------------------


def test_starts_disarmed_and_outputs_nothing() -> None:
    loop = Loop()
    assert loop.kernel.state is StimState.DISARMED
    assert loop.kernel.fault_reason == ""
    for _ in range(10):
        out = loop.tick(0.01, [1.0, 1.0])
        assert out.dtype == np.float64 and out.tolist() == [0.0, 0.0]
    assert loop.kernel.state is StimState.DISARMED


def test_arm_refused_without_fresh_command() -> None:
    loop = Loop()
    with pytest.raises(SafetyRefused, match="no fresh command"):
        loop.kernel.arm(0.0)
    loop.kernel.accept(1, command([1.0, 1.0, 1.0]), 0.0)  # wrong channel count: not a heartbeat
    with pytest.raises(SafetyRefused, match="no fresh command"):
        loop.kernel.arm(0.0)
    loop.send([0.5, 0.5])
    with pytest.raises(SafetyRefused, match="no fresh command within 100 ms"):
        loop.kernel.arm(0.1001)
    assert loop.kernel.state is StimState.DISARMED
    loop.kernel.arm(0.099)
    assert loop.kernel.state is StimState.ARMED
    with pytest.raises(SafetyRefused, match="already ARMED"):
        loop.kernel.arm(0.099)


@pytest.mark.parametrize("emg_age_s, offset_s", [(0.3, 0.0), (0.005, math.nan)])
def test_arm_refused_while_the_emg_behind_the_commands_is_not_fresh(emg_age_s: float, offset_s: float) -> None:
    loop = Loop()
    loop.seq += 1
    assert loop.kernel.accept(loop.seq, command([0.5, 0.5], emg_time_s=-emg_age_s), 0.0, emg_clock_offset_s=offset_s)
    assert "EMG is not within 250 ms" in loop.kernel.arm_refusal(0.0)
    with pytest.raises(SafetyRefused, match="acquisition stalled, or its clock offset not known"):
        loop.kernel.arm(0.0)
    loop.send([0.5, 0.5])  # fresh EMG, known clock
    assert loop.kernel.arm_refusal(0.0) == ""
    loop.kernel.arm(0.0)
    assert loop.kernel.state is StimState.ARMED


def test_output_ramps_from_zero_after_arm() -> None:
    loop = Loop()
    loop.send([1.0, 1.0])
    loop.kernel.arm(0.0)
    assert loop.kernel.update(0.0).tolist() == [0.0, 0.0]
    out = loop.tick(0.01, [1.0, 1.0])
    np.testing.assert_allclose(out, RISE_MA_PER_S * 0.01)
    for _ in range(24):
        out = loop.tick(0.01, [1.0, 1.0])
    np.testing.assert_allclose(out, [20.0, 15.0])  # half way after ramp_s / 2
    for _ in range(30):
        out = loop.tick(0.01, [1.0, 1.0])
    assert out.tolist() == [40.0, 30.0]  # and no further


def test_drop_to_lower_target_is_immediate_then_rise_ramps_again() -> None:
    loop = Loop()
    loop.armed_at_full()
    out = loop.tick(0.001, [0.5, 0.0])
    assert out.tolist() == [26.0, 0.0]  # 12 + 0.5 * 28; zero intensity is 0 mA, not threshold
    out = loop.tick(0.01, [1.0, 1.0])
    np.testing.assert_allclose(out, [26.0 + 0.8, 0.0])  # the channel cut to 0 rests a period (33.3 ms)
    out = loop.tick(0.03, [1.0, 1.0])
    np.testing.assert_allclose(out, [26.0 + 0.8 + 2.4, 1.8])


def test_a_channel_cut_to_zero_rests_one_period_however_its_gate_flickers() -> None:
    """Each reopening ramps from 0, but a device starts a new train at once: a gate open 5 ms, closed
    1 ms, pulsed a 30 Hz channel every 6 ms (rms density above the electrode limit, which is computed
    at the configured frequency). Now a cut channel rests one period (33.3 ms) before it rises."""
    loop = Loop()
    loop.armed_at_full()
    cuts_s, starts_s, on = [], [], True
    for k in range(1000):  # 1 s in 1 ms steps; the gate closed 1 ms of every 6
        out = loop.tick(0.001, [1.0, 1.0], gate_open=[k % 6 != 0, True])
        if on and out[0] == 0:
            cuts_s.append(loop.now_s)
        elif not on and out[0] > 0:
            starts_s.append(loop.now_s)
        on = out[0] > 0
        assert out[1] == 30.0  # the other channel goes on
    assert len(starts_s) >= 20  # it does stimulate between the cuts
    assert all(start_s - cut_s >= 1 / 30 for cut_s, start_s in zip(cuts_s, starts_s))


def test_gate_closed_cuts_that_channel_at_once_and_reopening_ramps() -> None:
    loop = Loop()
    loop.armed_at_full()
    out = loop.tick(0.001, [1.0, 1.0], gate_open=[True, False])
    assert out.tolist() == [40.0, 0.0]
    assert loop.kernel.state is StimState.ARMED
    out = loop.tick(0.03, [1.0, 1.0])
    assert out.tolist() == [40.0, 0.0]  # resting a period (33.3 ms) after the cut
    out = loop.tick(0.01, [1.0, 1.0])
    np.testing.assert_allclose(out, [40.0, 0.6])  # then it ramps


@pytest.mark.parametrize("emg_age_s", [0.251, 10.0, -0.251])
def test_stale_or_future_emg_closes_every_gate(emg_age_s: float) -> None:
    loop = Loop()
    loop.armed_at_full()
    out = loop.tick(0.001, [1.0, 1.0], emg_time_s=loop.now_s + 0.001 - emg_age_s)
    assert out.tolist() == [0.0, 0.0]
    assert loop.kernel.state is StimState.ARMED  # a closed gate is not a fault
    out = loop.tick(0.04, [1.0, 1.0], emg_time_s=loop.now_s + 0.04 - 0.249)
    np.testing.assert_allclose(out, RISE_MA_PER_S * 0.04)  # after resting a period (33.3 ms)


def test_emg_age_is_judged_on_this_clock_through_the_acquisition_offset() -> None:
    loop = Loop()
    loop.armed_at_full()
    offset_s = 7200.0  # the acquisition host's clock runs two hours ahead of this one
    loop.now_s += 0.01
    fresh = command([1.0, 1.0], emg_time_s=loop.now_s - 0.005 + offset_s)
    loop.seq += 1
    assert loop.kernel.accept(loop.seq, fresh, loop.now_s, emg_clock_offset_s=offset_s)
    assert loop.kernel.update(loop.now_s).tolist() == [40.0, 30.0]
    for wrong_offset_s in (0.0, math.nan):  # unknown (NaN) or ignored offset: gates closed, not a rejection
        loop.now_s += 0.01
        loop.seq += 1
        stamped = command([1.0, 1.0], emg_time_s=loop.now_s - 0.005 + offset_s)
        assert loop.kernel.accept(loop.seq, stamped, loop.now_s, emg_clock_offset_s=wrong_offset_s)
        assert loop.kernel.update(loop.now_s).tolist() == [0.0, 0.0]
        assert loop.kernel.state is StimState.ARMED
    assert loop.kernel.rejected == 0


def test_deadline_fault_is_latched() -> None:
    loop = Loop()
    loop.armed_at_full()
    last_command_s = loop.now_s
    assert loop.kernel.update(last_command_s + 0.0999).tolist() == [40.0, 30.0]
    assert loop.kernel.update(last_command_s + 0.1001).tolist() == [0.0, 0.0]
    assert loop.kernel.state is StimState.FAULT
    assert loop.kernel.fault_reason == "no fresh command within 100 ms"
    loop.now_s += 0.2
    for _ in range(20):  # the controller comes back: nothing restarts
        assert loop.tick(0.01, [1.0, 1.0]).tolist() == [0.0, 0.0]
    assert loop.kernel.state is StimState.FAULT
    with pytest.raises(SafetyRefused, match="reset first"):
        loop.kernel.arm(loop.now_s)


def test_the_deadline_is_judged_before_a_queued_backlog_is_read() -> None:
    """A stimulator frozen past its deadline wakes to commands that queued meanwhile: judged on the
    time now, before they are accepted, it latches FAULT, and the backlog (stamped with the time it
    is read) cannot bring the output back."""
    loop = Loop()
    loop.armed_at_full()
    woke_s = loop.now_s + 0.3
    loop.kernel.check_deadline(woke_s - 0.25)
    assert loop.kernel.state is StimState.ARMED  # within the deadline: nothing happens
    loop.kernel.check_deadline(woke_s)
    assert loop.kernel.state is StimState.FAULT and loop.kernel.fault_reason == "no fresh command within 100 ms"
    loop.now_s = woke_s
    for _ in range(5):
        loop.send([1.0, 1.0])
    assert loop.kernel.update(woke_s).tolist() == [0.0, 0.0]


def test_rejected_commands_do_not_feed_the_watchdog() -> None:
    loop = Loop()
    loop.armed_at_full()
    replay = command([1.0, 1.0], now_s=loop.now_s)
    for _ in range(10):
        loop.now_s += 0.011
        assert not loop.kernel.accept(loop.seq, replay, loop.now_s)
        loop.kernel.update(loop.now_s)
    assert loop.kernel.state is StimState.FAULT
    assert loop.kernel.output_ma.tolist() == [0.0, 0.0]


def test_stop_latches_until_reset_and_reset_never_restarts_output() -> None:
    loop = Loop()
    loop.armed_at_full()
    loop.kernel.stop("e-stop button")
    assert loop.kernel.state is StimState.STOPPED
    assert loop.kernel.output_ma.tolist() == [0.0, 0.0]  # at once, before any update
    for _ in range(20):
        assert loop.tick(0.01, [1.0, 1.0]).tolist() == [0.0, 0.0]
    with pytest.raises(SafetyRefused, match="STOPPED"):
        loop.kernel.arm(loop.now_s)
    loop.kernel.fault("driver error")
    loop.kernel.disarm()
    assert loop.kernel.state is StimState.STOPPED
    assert loop.kernel.fault_reason == "e-stop button"

    loop.kernel.reset()
    assert loop.kernel.state is StimState.DISARMED and loop.kernel.fault_reason == ""
    assert loop.kernel.output_ma.tolist() == [0.0, 0.0]
    with pytest.raises(SafetyRefused, match="no fresh command"):  # the last command was forgotten
        loop.kernel.arm(loop.now_s)
    for _ in range(20):
        assert loop.tick(0.01, [1.0, 1.0]).tolist() == [0.0, 0.0]  # still disarmed
    loop.kernel.arm(loop.now_s)
    np.testing.assert_allclose(loop.tick(0.01, [1.0, 1.0]), RISE_MA_PER_S * 0.01)


def test_reset_after_fault_needs_a_fresh_command_to_arm() -> None:
    loop = Loop()
    loop.armed_at_full()
    loop.tick(0.2)
    assert loop.kernel.state is StimState.FAULT
    loop.send([1.0, 1.0])
    loop.kernel.reset()
    assert loop.kernel.state is StimState.DISARMED
    with pytest.raises(SafetyRefused):
        loop.kernel.arm(loop.now_s)
    loop.send([1.0, 1.0])
    loop.kernel.arm(loop.now_s)
    assert loop.kernel.update(loop.now_s).tolist() == [0.0, 0.0]


def test_reset_accepts_a_restarted_controller_counting_from_one() -> None:
    loop = Loop()
    loop.armed_at_full()
    loop.tick(0.2)  # controller gone: FAULT
    loop.kernel.reset()
    assert loop.kernel.accept(1, command([1.0, 1.0], now_s=loop.now_s), loop.now_s)
    loop.kernel.arm(loop.now_s)
    assert loop.tick(0.04, [1.0, 1.0]).tolist() == pytest.approx([3.2, 2.4])  # the fault cut them 40 ms ago


def test_a_backlog_replayed_after_reset_cannot_stimulate() -> None:
    loop = Loop()
    loop.armed_at_full()
    stale_emg_s = loop.now_s
    loop.tick(0.3)  # controller frozen for longer than max_emg_age_ms: FAULT
    loop.kernel.reset()
    # Accepted (the sequence was forgotten) but its EMG is too old: every gate closed, no arming.
    assert loop.kernel.accept(loop.seq, command([1.0, 1.0], emg_time_s=stale_emg_s), loop.now_s)
    with pytest.raises(SafetyRefused, match="EMG is not within"):
        loop.kernel.arm(loop.now_s)
    assert loop.tick(0.05).tolist() == [0.0, 0.0]


def test_disarm_zeroes_at_once() -> None:
    loop = Loop()
    loop.armed_at_full()
    loop.kernel.disarm()
    assert loop.kernel.state is StimState.DISARMED
    assert loop.kernel.output_ma.tolist() == [0.0, 0.0]
    assert loop.tick(0.01, [1.0, 1.0]).tolist() == [0.0, 0.0]


def test_nan_time_faults_instead_of_stimulating() -> None:
    loop = Loop()
    loop.armed_at_full()
    assert loop.kernel.update(math.nan).tolist() == [0.0, 0.0]
    assert loop.kernel.state is StimState.FAULT


def test_replayed_and_older_sequence_numbers_rejected_and_counted() -> None:
    kernel = SafetyKernel([QUAD, TIB], REHASTIM2, CFG)
    assert kernel.accept(5, command([0.5, 0.5]), 0.0)
    assert not kernel.accept(5, command([1.0, 1.0]), 0.0)
    assert not kernel.accept(3, command([1.0, 1.0]), 0.0)
    assert (kernel.accepted, kernel.rejected, kernel.last_seq) == (1, 2, 5)


def test_replayed_command_is_never_acted_on() -> None:
    loop = Loop()
    loop.send([0.5, 0.5])
    loop.kernel.arm(0.0)
    for _ in range(50):
        out = loop.tick(0.01, [0.5, 0.5])
    assert out.tolist() == [26.0, 20.0]
    for seq in (loop.seq, loop.seq - 1, 0):  # a frozen peer replaying full intensity
        assert not loop.kernel.accept(seq, command([1.0, 1.0], now_s=loop.now_s), loop.now_s)
    assert loop.kernel.update(loop.now_s + 0.01).tolist() == [26.0, 20.0]


BAD_COMMANDS = {
    "too many channels": command([0.5, 0.5, 0.5]),
    "too few channels": command([0.5]),
    "no channels": command([]),
    "NaN intensity": command([math.nan, 0.5]),
    "infinite intensity": command([math.inf, 0.5]),
    "negative intensity": command([-0.1, 0.5]),
    "intensity above 1": command([1.1, 0.5]),
    "2-D intensity": Command(-0.005, np.full((1, 2), 0.5, np.float32), np.ones(2, bool), np.zeros(2, np.uint8)),
    "gate and reason disagree": Command(-0.005, np.full(2, 0.5, np.float32), np.ones(2, bool), np.full(2, 4, np.uint8)),
    "gate not bool": Command(-0.005, np.full(2, 0.5, np.float32), np.ones(2, np.uint8), np.zeros(2, np.uint8)),
    "gate wrong length": Command(-0.005, np.full(2, 0.5, np.float32), np.ones(3, bool), np.zeros(2, np.uint8)),
    "NaN EMG time": command([0.5, 0.5], emg_time_s=math.nan),
    "no intensity": Command(-0.005, None, np.ones(2, bool), np.zeros(2, np.uint8)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("bad", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_invalid_command_rejected_counted_and_not_used(bad: Command) -> None:
    kernel = SafetyKernel([QUAD, TIB], REHASTIM2, CFG)
    assert not kernel.accept(7, bad, 0.0)
    assert (kernel.accepted, kernel.rejected, kernel.last_seq) == (0, 1, -1)
    with pytest.raises(SafetyRefused):
        kernel.arm(0.0)
    assert kernel.accept(1, command([0.5, 0.5]), 0.0)  # a bad message does not advance the sequence


def test_channel_beyond_electrode_limit_refused() -> None:
    too_small = StimulationChannel(
        name="x", muscle="x", device_channel=0, electrode_area_cm2=2.0,
        threshold_ma=5.0, max_ma=40.0, pulse_width_us=500.0, frequency_hz=50.0,
    )  # fmt: skip
    with pytest.raises(LimitError, match="electrode limit"):
        SafetyKernel([too_small], REHASTIM2, CFG)


@pytest.mark.parametrize("area_cm2", [math.nan, math.inf, 0.0])
def test_channel_with_an_area_that_is_not_a_positive_finite_number_refused(area_cm2: float) -> None:
    """NaN compared False with every limit: the electrode term dropped out of the clamp (100 mA on 1 cm2)."""
    channel = StimulationChannel(
        name="x", muscle="x", device_channel=0, electrode_area_cm2=area_cm2,
        threshold_ma=5.0, max_ma=100.0, pulse_width_us=300.0, frequency_hz=30.0,
    )  # fmt: skip
    with pytest.raises(LimitError, match="electrode_area_cm2 .*positive finite"):
        SafetyKernel([channel], REHASTIM2, CFG)


@pytest.mark.parametrize(("key", "value"), [("ramp_s", 0.0), ("deadline_ms", math.inf), ("max_emg_age_ms", math.nan)])
def test_a_stimulator_config_built_in_code_is_checked_too(key: str, value: float) -> None:
    """The kernel refuses what the config loader would: ramp_s 0 built in code meant no ramp."""
    cfg = StimulatorConfig(**{"deadline_ms": 100.0, "ramp_s": 0.5, "max_emg_age_ms": 250.0, key: value})
    with pytest.raises(ConfigError, match=f"stimulator.{key} = "):
        SafetyKernel([QUAD, TIB], REHASTIM2, cfg)


@pytest.mark.parametrize(("key", "value"), [("max_charge_mc", math.nan), ("max_session_s", -1.0), ("max_stimulation_s", math.inf)])
def test_dose_limits_built_in_code_are_checked_too(key: str, value: float) -> None:
    """A nested table was not checked: a NaN charge limit built in code was never reached (every
    comparison with NaN is false), and the kernel and the dose tracker took it."""
    dose = DoseLimits(**{key: value})
    cfg = StimulatorConfig(deadline_ms=100.0, ramp_s=0.5, max_emg_age_ms=250.0, dose=dose)
    with pytest.raises(ConfigError, match=rf"stimulator\.dose\.{key} = "):
        SafetyKernel([QUAD, TIB], REHASTIM2, cfg)
    with pytest.raises(ConfigError, match=rf"stimulator\.dose\.{key} = "):
        DoseTracker([QUAD, TIB], dose)


def test_every_state_change_is_reported_once() -> None:
    loop = Loop()
    loop.send([1.0, 1.0])
    loop.kernel.arm(0.0)
    loop.kernel.disarm()
    loop.kernel.arm(0.0)
    loop.kernel.update(0.5)
    loop.kernel.stop()
    loop.kernel.reset()
    assert loop.kernel.pop_events() == [
        "DISARMED -> ARMED: armed",
        "ARMED -> DISARMED: disarm requested",
        "DISARMED -> ARMED: armed",
        "ARMED -> FAULT: no fresh command within 100 ms",
        "FAULT -> STOPPED: stop requested",
        "STOPPED -> DISARMED: reset",
    ]
    assert loop.kernel.pop_events() == []


def test_snapshot_is_json() -> None:
    loop = Loop()
    loop.armed_at_full()
    loop.kernel.accept(1, command([1.0, 1.0]), loop.now_s)
    snap = json.loads(json.dumps(loop.kernel.snapshot()))
    assert snap == {
        "state": "ARMED",
        "fault_reason": "",
        "fault_count": 0,
        "recent_faults": [],
        "output_ma": [40.0, 30.0],
        "accepted": 61,
        "rejected": 1,
        "last_seq": 61,
    }


def test_every_fault_is_counted_and_kept_even_after_a_reset() -> None:
    """A FAULT latched and reset between two looks at the state must still be seen (the supervisor
    polls at 5 Hz and reports what the count says)."""
    loop = Loop()
    loop.armed_at_full()
    loop.tick(0.2)  # no command within the deadline
    loop.kernel.reset()
    loop.kernel.fault("device error")
    loop.kernel.fault("a second cause while latched: not a new fault")
    snap = loop.kernel.snapshot()
    assert snap["fault_count"] == 2
    assert snap["recent_faults"] == ["no fresh command within 100 ms", "device error"]


# -- property: arbitrary command streams and control requests ---------------------------


def electrode_ma(area_cm2: float, pulse_width_us: float, frequency_hz: float) -> float:
    """I_peak <= 2 * A / sqrt(2 * PW * f), PW in s: written out apart from the code under test."""
    return 2.0 * area_cm2 / math.sqrt(2.0 * (pulse_width_us / 1e6) * frequency_hz)


@st.composite
def channel_sets(draw: st.DrawFn) -> list[StimulationChannel]:
    """1..4 channels anywhere within the device and electrode limits."""
    channels = []
    for i in range(draw(st.integers(1, 4))):
        pulse_width_us = draw(st.floats(*REHASTIM2.pulse_width_us))
        frequency_hz = draw(st.floats(*REHASTIM2.frequency_hz))
        area_cm2 = draw(st.floats(1.0, 100.0))
        ceiling_ma = min(REHASTIM2.amplitude_ma[1], electrode_limit_ma(area_cm2, pulse_width_us, frequency_hz))
        max_ma = draw(st.floats(0.0, ceiling_ma))
        threshold_ma = draw(st.floats(0.0, max_ma))
        channels.append(
            StimulationChannel(
                name=f"ch{i}", muscle=f"m{i}", device_channel=i, electrode_area_cm2=area_cm2,
                threshold_ma=threshold_ma, max_ma=max_ma, pulse_width_us=pulse_width_us, frequency_hz=frequency_hz,
            )  # fmt: skip
        )
    return channels


stimulator_configs = st.builds(
    lambda deadline_ms, ramp_s, age_ms: build(
        StimulatorConfig, {"deadline_ms": deadline_ms, "ramp_s": ramp_s, "max_emg_age_ms": age_ms}
    ),
    st.floats(10.0, 1000.0),
    st.one_of(st.floats(0.1, 2.0), st.floats(2.0, 60.0)),
    st.floats(10.0, 5000.0),
)


@dataclass(frozen=True)
class Step:
    dt_deadlines: float  # time step as a fraction of the deadline
    action: str
    seq_delta: int
    intensity: list[float]
    gate_open: list[bool]
    emg_age_max_ages: float  # EMG age as a fraction of max_emg_age
    variant: str
    update: bool


steps = st.builds(
    Step,
    st.one_of(st.just(0.0), st.floats(0.0, 0.2), st.floats(0.0, 0.2), st.floats(0.2, 1.3)),
    st.sampled_from(["command"] * 8 + ["arm"] * 3 + ["disarm", "stop", "fault", "reset", "none"]),
    st.integers(-2, 3),
    st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    st.lists(st.sampled_from([True, True, True, False]), min_size=4, max_size=4),
    st.one_of(st.floats(-0.5, 1.0), st.floats(-1.5, 1.5)),
    st.sampled_from(["ok"] * 8 + ["count", "nan", "range", "disagree"]),
    st.sampled_from([True, True, True, False]),
)


def make_command(step: Step, n: int, now_s: float, max_emg_age_s: float) -> Command:
    size = {"count": n + 1 if n < 4 else n - 1}.get(step.variant, n)
    intensity = np.array((step.intensity * 2)[:size], np.float32)
    if step.variant == "nan":
        intensity[0] = np.nan
    if step.variant == "range":
        intensity[0] = 1.5
    gate = np.array((step.gate_open * 2)[:size], bool)
    reason = np.where(gate, GateReason.OPEN, GateReason.STALE_EMG).astype(np.uint8)
    if step.variant == "disagree":
        reason[0] = GateReason.OPEN if not gate[0] else GateReason.GAP
    return Command(now_s - step.emg_age_max_ages * max_emg_age_s, intensity, gate, reason)


# A valid full-intensity command, then arm: most scripts start from here so that they
# spend their steps on an armed kernel rather than on getting there.
ARMING_PRELUDE = [
    Step(0.0, "command", 1, [1.0] * 4, [True] * 4, 0.0, "ok", False),
    Step(0.0, "arm", 0, [1.0] * 4, [True] * 4, 0.0, "ok", True),
]


@settings(deadline=None, max_examples=150)
@given(
    channels=channel_sets(),
    cfg=stimulator_configs,
    script=st.lists(steps, min_size=1, max_size=60),
    start_armed=st.sampled_from([True, True, True, False]),
)
def test_output_invariants_hold_for_any_command_stream(
    channels: list[StimulationChannel], cfg: StimulatorConfig, script: list[Step], start_armed: bool
) -> None:
    """Against a small reference model: the state matches it and the output never exceeds
    the ceiling, never rises faster than the ramp, drops at once, and is zero when not ARMED,
    gate closed, EMG stale or the newest accepted command is older than the deadline."""
    n = len(channels)
    kernel = SafetyKernel(channels, REHASTIM2, cfg)
    deadline_s, max_emg_age_s = cfg.deadline_ms / 1e3, cfg.max_emg_age_ms / 1e3
    electrode_limits_ma = [electrode_ma(ch.electrode_area_cm2, ch.pulse_width_us, ch.frequency_hz) for ch in channels]
    ceiling_ma = np.array(
        [min(REHASTIM2.amplitude_ma[1], ch.max_ma, limit) for ch, limit in zip(channels, electrode_limits_ma)]
    )
    rise_ma_per_s = ceiling_ma / cfg.ramp_s
    threshold_ma = np.array([ch.threshold_ma for ch in channels])
    max_ma = np.array([ch.max_ma for ch in channels])
    period_s = np.array([1.0 / ch.frequency_hz for ch in channels])
    was_on, cut_s = np.zeros(n, dtype=bool), np.full(n, -math.inf)  # a channel back at 0 rests one period

    state, last_seq, highest_seq_sent, n_commands = "DISARMED", -1, 0, 0
    latest: tuple[np.ndarray, np.ndarray, float, bool] | None = None  # intensity, effective gate, received_s, EMG fresh
    now_s, ramp_base_s, last_update_s = 0.0, 0.0, 0.0

    def fresh() -> bool:
        return latest is not None and now_s - latest[2] <= deadline_s

    for step in ARMING_PRELUDE * start_armed + script:
        now_s += step.dt_deadlines * deadline_s
        if step.action == "command":
            n_commands += 1
            seq = max(0, highest_seq_sent + step.seq_delta)
            highest_seq_sent = max(highest_seq_sent, seq)
            cmd = make_command(step, n, now_s, max_emg_age_s)
            valid = step.variant == "ok" and seq > last_seq
            assert kernel.accept(seq, cmd, now_s) == valid
            if valid:
                emg_fresh = abs(now_s - cmd.newest_emg_time_s) <= max_emg_age_s
                latest, last_seq = (cmd.intensity.astype(np.float64), cmd.gate_open & emg_fresh, now_s, emg_fresh), seq
        elif step.action == "arm":
            if state == "DISARMED" and fresh() and latest[3]:  # arming also needs the EMG behind it fresh
                kernel.arm(now_s)
                state, ramp_base_s = "ARMED", now_s
            else:
                with pytest.raises(SafetyRefused):
                    kernel.arm(now_s)
        elif step.action == "disarm":
            kernel.disarm()
            state = "DISARMED" if state == "ARMED" else state
        elif step.action == "stop":
            kernel.stop("test stop")
            state = "STOPPED"
        elif step.action == "fault":
            kernel.fault("test fault")
            state = state if state == "STOPPED" else "FAULT"
        elif step.action == "reset":
            kernel.reset()
            state, latest, last_seq = "DISARMED", None, -1
        assert kernel.state.value == state
        assert kernel.accepted + kernel.rejected == n_commands
        if state != "ARMED":
            assert not kernel.output_ma.any()  # at once, without waiting for an update
        if not step.update:
            continue

        before_ma = kernel.output_ma.copy()
        out = kernel.update(now_s)
        if state == "ARMED" and not fresh():
            state = "FAULT"
        assert kernel.state.value == state
        assert out.shape == (n,) and out.dtype == np.float64
        assert (out >= 0).all() and (out <= ceiling_ma + 1e-9).all()
        assert (out - before_ma <= rise_ma_per_s * (now_s - last_update_s) + 1e-9).all()
        if state != "ARMED" or latest is None or now_s - latest[2] > deadline_s:
            assert not out.any()
        else:
            intensity, gate_open, _, _ = latest
            level_ma = intensity_to_ma(intensity, threshold_ma, max_ma, REHASTIM2.amplitude_step_ma)
            resting = ~was_on & (now_s < cut_s + period_s)
            target_ma = np.where(gate_open & ~resting, np.minimum(level_ma, ceiling_ma), 0.0)
            assert not out[~gate_open].any()
            assert (out <= target_ma + 1e-9).all()
            dropping = target_ma <= before_ma
            np.testing.assert_allclose(out[dropping], target_ma[dropping], rtol=0, atol=1e-9)
            expected = np.minimum(target_ma, before_ma + rise_ma_per_s * (now_s - ramp_base_s))
            np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)  # not slower than the ramp
            ramp_base_s = now_s
            event("ARMED update with output" if out.any() else "ARMED update, output zero")
            if resting.any() and (intensity > 0).any():
                event("a cut channel resting")
        cut_s[was_on & ~(out > 0)] = now_s
        was_on = out > 0
        last_update_s = now_s


def test_a_dose_locked_channel_ramps_down_and_stays_down_while_others_go_on() -> None:
    loop = Loop()
    loop.armed_at_full()
    loop.kernel.dose_locked[0] = True
    levels = [loop.tick(0.05, [1.0, 1.0])[0] for _ in range(12)]
    assert levels[0] == pytest.approx(40.0 - 80.0 * 0.05)  # down at the ramp rate, not at once
    assert all(b <= a for a, b in zip(levels, levels[1:])) and levels[-1] == 0.0
    assert loop.tick(0.05, [1.0, 1.0]).tolist() == [0.0, 30.0]
    loop.kernel.disarm()
    loop.send([1.0, 1.0])
    loop.kernel.arm(loop.now_s)
    for _ in range(20):
        out = loop.tick(0.05, [1.0, 1.0])
    assert out.tolist() == [0.0, 30.0]  # re-arming does not lift the lock


def test_a_dose_locked_channel_still_drops_at_once_when_its_gate_closes() -> None:
    loop = Loop()
    loop.armed_at_full()
    loop.kernel.dose_locked[0] = True
    assert loop.tick(0.01, [1.0, 1.0], gate_open=[False, True]).tolist() == [0.0, 30.0]


FUZZ_MESSAGES = 100_000  # fault matrix row 12: >= 1e5 malformed messages, no crash


@pytest.mark.timeout(120)
def test_a_hundred_thousand_mutated_command_messages_through_decode_and_kernel() -> None:
    """Valid command messages with bytes flipped, cut or added, or replaced by noise, through
    protocol.decode and, when they still decode, the kernel. Decode raises nothing but
    MalformedMessage; every output stays finite, within 0..ceiling, and rises no faster than
    the ramp. A mutated sequence number may lock the real controller out: the kernel then
    faults (output 0) and, as an operator would, the test resets and re-arms."""
    rng = np.random.default_rng(12)
    kernel = SafetyKernel([QUAD, TIB], REHASTIM2, CFG)
    seq, now_s, last_ma = 0, 0.0, np.zeros(2)
    decoded = rejected = faults = 0

    def valid(intensity: float) -> list[bytes]:
        nonlocal seq
        seq += 1
        return protocol.encode(seq, now_s, command([intensity, intensity], now_s=now_s))

    for i in range(FUZZ_MESSAGES):
        now_s += 0.001
        if kernel.state is not StimState.ARMED:
            faults += kernel.state is StimState.FAULT
            kernel.reset()
            seq = max(seq, kernel.last_seq)
            kernel.accept(seq + 1, command([0.5, 0.5], now_s=now_s), now_s)
            seq += 1
            kernel.arm(now_s)
            last_ma = kernel.output_ma.copy()
        topic, payload = valid(float(rng.uniform(0.0, 1.0)))
        if i % 4:  # one message in four stays valid, keeping the kernel fed
            payload = bytearray(payload)
            match rng.integers(4):
                case 0:
                    view = np.frombuffer(payload, dtype=np.uint8)
                    at = rng.integers(len(view), size=rng.integers(1, 4))
                    view[at] ^= rng.integers(1, 256, size=len(at), dtype=np.uint8)
                case 1:
                    payload = payload[: rng.integers(len(payload))]
                case 2:
                    payload += rng.bytes(int(rng.integers(1, 16)))
                case _:
                    payload = bytearray(rng.bytes(int(rng.integers(0, 64))))
            payload = bytes(payload)
        try:
            message = protocol.decode([topic, payload])
        except protocol.MalformedMessage:
            rejected += 1
        else:
            decoded += 1
            kernel.accept(message.header.seq, message.body, now_s)
        output_ma = kernel.update(now_s)
        assert np.isfinite(output_ma).all() and (output_ma >= 0).all() and (output_ma <= kernel.clamp_ma).all()
        assert (output_ma - last_ma <= RISE_MA_PER_S * 0.001 + 1e-9).all()
        last_ma = output_ma
    assert rejected > FUZZ_MESSAGES // 2 and decoded > FUZZ_MESSAGES // 4  # both paths taken, many times
    print(f"{rejected} rejected by decode, {decoded} decoded, {faults} faults (mutated sequence numbers)")
