"""Clinical session safety in real processes: dose limits, the summary, operator confirmation."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from fesloop.config import load_config
from fesloop.sockets import ControlClient, ControlTimeout
from tests.conftest import long_contraction, wait_until
from tests.streams import Recorder, pulses_array

pytestmark = pytest.mark.timeout(90)

LONG_CONTRACTION = long_contraction()
STIMULATION_LIMIT_S = 1.5
CHARGE_LIMIT_MC = 0.35  # ~1.2 s at the contraction's ~30 mA, 300 us, 30 Hz
SESSION_LIMIT_S = 2.5  # from the first arm, at process start


def _status(client: ControlClient) -> dict:
    try:
        return client.request("status", timeout_s=2.0)
    except ControlTimeout:
        return {}


@pytest.mark.parametrize("limit", ["stimulation_time", "charge", "session"])
def test_a_dose_limit_ramps_the_channel_down_for_the_session_and_the_summary_matches(
    write_config, processes, limit: str
) -> None:
    setting = {
        "stimulation_time": f"max_stimulation_s = {STIMULATION_LIMIT_S}",
        "charge": f"max_stimulation_s = 0.0\nmax_charge_mc = {CHARGE_LIMIT_MC}",
        "session": f"max_stimulation_s = 0.0\nmax_session_s = {SESSION_LIMIT_S}",
    }[limit]
    dose = f"\n[stimulator.dose]\n{setting}\nskin_check_after_s = 1.0\n"
    path = write_config("demo.toml", {**LONG_CONTRACTION, "arm_at_start = true": "arm_at_start = true" + dose})
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    try:
        processes.start_loop(path)

        def limit_reached() -> bool:
            dose_rows = _status(stim).get("dose", [])
            return bool(dose_rows) and bool(dose_rows[0]["limit_reached"])

        wait_until(limit_reached, 40, what="the stimulation time limit")
        time.sleep(1.5)  # the ramp down (<= ramp_s) and then nothing
        # Re-arming does not lift the limit in this session.
        stim.request("disarm", timeout_s=2.0)
        assert wait_until(lambda: stim.request("arm", timeout_s=2.0)["ok"], 10, what="re-arm")
        time.sleep(1.0)
        status = _status(stim)
        channel, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    finally:
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    quad = channel == config.stimulation[0].device_channel
    q_times, q_amps = times[quad], amplitudes[quad]
    row = status["dose"][0]
    assert status["skin_check_due"] is True
    # The channel stimulated until the limit, then ramped down to nothing within ramp_s.
    period_s = 1.0 / config.stimulation[0].frequency_hz
    width_us = config.stimulation[0].pulse_width_us
    if limit == "stimulation_time":
        assert row["limit_reached"] == f"stimulation time limit {STIMULATION_LIMIT_S:g} s reached"
        # Time stimulated so far, pulse by pulse (a pause longer than a period adds one period).
        stimulated_s = np.concatenate(([0.0], np.cumsum(np.minimum(np.diff(q_times), period_s))))
        t_limit = q_times[np.searchsorted(stimulated_s, STIMULATION_LIMIT_S)]
    elif limit == "session":
        assert row["limit_reached"] == f"session duration limit {SESSION_LIMIT_S:g} s reached"
        assert status["dose"][1]["limit_reached"] == row["limit_reached"]  # every channel
        t_limit = status["session_start_s"] + SESSION_LIMIT_S
    else:
        assert row["limit_reached"] == f"charge limit {CHARGE_LIMIT_MC:g} mC reached"
        charge_mc = np.cumsum(q_amps * width_us) * 1e-6
        t_limit = q_times[np.searchsorted(charge_mc, CHARGE_LIMIT_MC)]  # the pulse that reached it
    after = q_times > t_limit + period_s
    just_before = (q_times > t_limit - 3 * period_s) & (q_times <= t_limit)
    assert (q_amps[just_before] >= config.stimulation[0].threshold_ma).any(), "not tripped early"
    assert np.all(np.diff(q_amps[after]) <= 0), "after the limit the amplitude only goes down"
    ramp_ma_per_s = config.stimulation[0].max_ma / config.stimulator.ramp_s
    drops_ma = -np.diff(q_amps[after])
    assert drops_ma.max() <= ramp_ma_per_s * period_s * 1.5 + 1.0, "ramped down, not dropped at once"
    assert q_times[-1] - t_limit <= config.stimulator.ramp_s + period_s
    # Stimulated time is time with output above zero (ramp-down included): it also covers the
    # last pulse period and the loop's update cadence under load; 4 periods of slack.
    stimulated_total_s = np.minimum(np.diff(q_times), period_s).sum()
    assert row["stimulated_s"] == pytest.approx(stimulated_total_s, abs=4 * period_s)
    # The summary matches the pulses that were delivered.
    assert row["pulses"] == quad.sum()
    assert row["peak_ma"] == pytest.approx(q_amps.max())
    assert row["mean_ma"] == pytest.approx(q_amps.mean(), abs=1e-3)
    assert row["charge_mc"] == pytest.approx((q_amps * width_us).sum() * 1e-6, abs=1e-6)


def test_run_refuses_a_real_stimulator_without_the_operator_confirmation(write_config) -> None:
    path = write_config(
        "demo.toml",
        {"arm_at_start = true": "arm_at_start = false", 'driver = "simulated"': 'driver = "rehastim2"\nserial_port = "/dev/null"'},
    )
    result = subprocess.run(
        [sys.executable, "-m", "fesloop", "run", str(path), "--operator", "TS", "--confirm", "no-implant"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "--confirm electrodes-checked" in result.stderr and "--confirm stop-button" in result.stderr
    assert "running" not in result.stdout  # refused before anything started


def test_run_arms_a_real_stimulator_only_with_every_confirmation_and_records_them(write_config) -> None:
    from stimulator.rehastim2_emulator import PtyEmulator

    with PtyEmulator() as emulator:
        path = write_config(
            "demo.toml",
            {
                **LONG_CONTRACTION,
                "arm_at_start = true": "arm_at_start = false",
                'driver = "simulated"': f'driver = "rehastim2"\nserial_port = "{emulator.path}"',
            },
        )
        confirms = [a for item in ("no-implant", "electrodes-checked", "stop-button") for a in ("--confirm", item)]
        result = subprocess.run(
            [sys.executable, "-m", "fesloop", "run", str(path), "--duration", "4", "--operator", "TS", *confirms],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        with emulator.lock:
            device_pulses = len(emulator.device.pulses)
            still_stimulating = emulator.device.stimulating
    assert result.returncode == 0, result.stdout + result.stderr
    confirmed = [line for line in result.stdout.splitlines() if "confirmed by TS" in line]
    assert len(confirmed) == 3 and "pacemaker" in confirmed[0]
    assert result.stderr.count("confirmed by TS") == 3  # the stimulator's session log has them too
    assert device_pulses > 0 and not still_stimulating  # stimulated, and stopped at shutdown
    assert "| quadriceps_l |" in result.stdout  # the session summary


def test_control_arms_a_real_stimulator_with_the_operator_confirmation(write_config, processes) -> None:
    """`fesloop control CONFIG stimulator arm` could never arm a real stimulator (run alone, or again
    after a FAULT and reset): the stimulator asked for --confirm items that `control` did not accept."""
    from stimulator.rehastim2_emulator import PtyEmulator

    with PtyEmulator() as emulator:
        path = write_config(
            "demo.toml",
            {**LONG_CONTRACTION, "arm_at_start = true": "arm_at_start = false",
             'driver = "simulated"': f'driver = "rehastim2"\nserial_port = "{emulator.path}"'},
        )  # fmt: skip
        processes.start_loop(path)
        control = [sys.executable, "-m", "fesloop", "control", str(path), "stimulator", "arm"]
        confirms = [a for item in ("no-implant", "electrodes-checked", "stop-button") for a in ("--confirm", item)]

        def arm(*flags: str) -> subprocess.CompletedProcess:
            return subprocess.run([*control, *flags], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=30)

        refused = arm("--operator", "TS", "--confirm", "no-implant")
        wait_until(lambda: arm("--operator", "TS", *confirms).returncode == 0, 30, what="an arm with confirmation")
        wait_until(lambda: emulator.device.stimulating, 20, what="the device to stimulate")
    assert refused.returncode != 0 and "--confirm electrodes-checked" in refused.stderr
    assert "--confirm stop-button" in refused.stderr and "fesloop control:" in refused.stderr


def test_override_dose_from_the_command_line_gives_the_channel_a_fresh_allowance(write_config, processes) -> None:
    dose = f"\n[stimulator.dose]\nmax_stimulation_s = 0.0\nmax_charge_mc = {CHARGE_LIMIT_MC}\n"
    path = write_config("demo.toml", {**LONG_CONTRACTION, "arm_at_start = true": "arm_at_start = true" + dose})
    config = load_config(path)
    quad = config.stimulation[0]
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)

    def override(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "fesloop", "control", str(path), "stimulator", "override_dose", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    try:
        processes.start_loop(path)
        wait_until(lambda: (_status(stim).get("dose") or [{}])[0].get("limit_reached"), 40, what="the charge limit")
        time.sleep(1.0)  # ramped down
        refused = override("--channel", quad.name, "--operator", "AB")  # no reason
        locked = _status(stim)
        t_override = locked["time_s"]
        accepted = override("--channel", quad.name, "--operator", "AB", "--reason", "therapist at bedside, skin fine")
        wait_until(lambda: (_status(stim).get("dose") or [{}])[0].get("limit_reached"), 20, what="the limit again")
        status = _status(stim)
        channel, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    finally:
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    assert refused.returncode == 1 and "operator's name and a reason" in refused.stdout
    assert locked["dose"][0]["overrides"] == 0
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    mine = channel == quad.device_channel
    resumed = mine & (times > t_override) & (amplitudes >= quad.threshold_ma)
    assert resumed.sum() >= 10, "stimulation resumed on the overridden channel"
    row = status["dose"][0]
    assert row["overrides"] == 1 and row["limit_reached"] == f"charge limit {CHARGE_LIMIT_MC:g} mC reached"
    # A fresh allowance: the charge after the override reached the limit once more.
    assert row["charge_mc"] >= 2 * CHARGE_LIMIT_MC - 0.02
    assert "dose limit overridden for quadriceps_l by AB: therapist at bedside, skin fine" in processes.log("stimulator")
