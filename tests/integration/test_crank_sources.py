"""Cycling on a crank from outside the controller, in real processes: an LSL stream pushed by
the test, and a MOTOmed behind the RehaStim2 emulator (ActualValues over the pty, relayed by
the stimulator). The test knows the true crank angle at every instant, so each delivered
pulse is checked against the window at that angle; when the crank readings stop, the
cycling gates close (NO_CRANK) and stimulation stops within the stated bound."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pylsl
import pytest
import zmq

from controller.laws.cycling import DEG_PER_S_PER_RPM, window_profile
from fesloop.config import Config, load_config
from fesloop.lsl import configure_machine_scope
from fesloop.sockets import ControlClient
from tests.conftest import wait_until
from tests.emulator_process import EmulatorProcess
from tests.faults.test_device_errors import _arm_and_stimulate
from tests.integration.test_laws_closed_loop import TOLERANT_DEADLINE
from tests.streams import Recorder, pulses_array

pytestmark = pytest.mark.timeout(90)

CADENCE_RPM = 35.0
# Pulses after the last reading: crank stale_ms (200) + the fault matrix's 250 ms to zero output.
STOP_BOUND_S = 0.2 + 0.25


def angle_at(t_s: np.ndarray, start_s: float, start_deg: float, cadence_rpm: float) -> np.ndarray:
    return (start_deg + cadence_rpm * DEG_PER_S_PER_RPM * (t_s - start_s)) % 360.0


def assert_pulses_in_windows(config: Config, channels: np.ndarray, times: np.ndarray, angle_deg: np.ndarray,
                             cadence_rpm: float, margin_deg: float) -> None:
    """Each channel's pulses fall in its window at the true angle advanced by cadence x emd."""
    for stim in config.stimulation:
        law = stim.law
        mine = channels == stim.device_channel
        assert mine.sum() >= 20, f"{stim.name}: {mine.sum()} pulses"
        advanced = angle_deg[mine] - law.offset_deg + cadence_rpm * DEG_PER_S_PER_RPM * law.emd_s
        start_deg, end_deg = law.window_deg
        inside = np.array([window_profile(a, start_deg - margin_deg, end_deg + margin_deg, 0.0) > 0 for a in advanced])
        assert inside.mean() >= 0.97, f"{stim.name}: outside at {np.sort(advanced[~inside] % 360).round(1)}"


def controller_gates(recorder: Recorder, after_s: float) -> list[list[str]]:
    return [
        m.body.fields["gate"] for m in recorder.get(b"status")
        if m.body.fields.get("process") == "controller" and m.body.fields["time_s"] > after_s
    ]


def test_cycling_follows_an_lsl_crank_stream_and_stops_when_it_stops(write_config, processes) -> None:
    configure_machine_scope()
    name = f"crank-{uuid.uuid4().hex[:8]}"
    crank_table = f'[controller.crank]\nsource = "lsl"\nname = "{name}"\ncadence_channel = 1\n\n[controller.ergometer]'
    path = write_config("cycling_arm.toml", {**TOLERANT_DEADLINE, "[controller.ergometer]": crank_table})
    config = load_config(path)
    info = pylsl.StreamInfo(name, "Crank", 2, 100.0, pylsl.cf_float32, f"test-{name}")
    outlet = pylsl.StreamOutlet(info)
    start_s, start_deg = pylsl.local_clock(), 90.0
    stop = threading.Event()
    last_pushed_s = [start_s]

    def push() -> None:  # a 100 Hz crank encoder turning at 35 rpm
        deadline = start_s
        while not stop.is_set():
            now_s = pylsl.local_clock()
            outlet.push_sample([float(angle_at(np.array(now_s), start_s, start_deg, CADENCE_RPM)), CADENCE_RPM], now_s)
            last_pushed_s[0] = now_s
            deadline += 0.01
            time.sleep(max(deadline - pylsl.local_clock(), 0.0))

    pusher = threading.Thread(target=push, daemon=True)
    recorder = Recorder({config.endpoints.pulses: [b"pulses", b"status"], config.endpoints.command: [b"status"]})
    try:
        processes.start_loop(path)
        pusher.start()
        wait_until(lambda: len(pulses_array(recorder.get(b"pulses"))[0]) > 400, 40, what="cycling pulses")
        time.sleep(4.0)
        stop.set()
        pusher.join(2)
        stopped_s = last_pushed_s[0]
        time.sleep(1.5)
    finally:
        stop.set()
        recorder.close()
    channels, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    stimulated = amplitudes > 0
    during = stimulated & (times < stopped_s)
    assert_pulses_in_windows(config, channels[during], times[during],
                             angle_at(times[during], start_s, start_deg, CADENCE_RPM), CADENCE_RPM, 10.0)
    after = times[stimulated & (times >= stopped_s)]
    print(f"last pulse {after.max() - stopped_s if len(after) else 0.0:.3f} s after the last crank reading")
    assert len(after) == 0 or after.max() - stopped_s <= STOP_BOUND_S
    gates = controller_gates(recorder, stopped_s + 0.5)
    assert gates and all(g == ["NO_CRANK"] * len(config.stimulation) for g in gates)


def test_cycling_follows_the_motomed_behind_the_rehastim2(write_config, processes) -> None:
    with EmulatorProcess(CADENCE_RPM) as emulator:
        path = write_config("cycling_motomed.toml", {**TOLERANT_DEADLINE, '"/dev/ttyUSB0"': f'"{emulator.path}"'})
        config = load_config(path)
        ctx = zmq.Context()
        stim = ControlClient(ctx, config.endpoints.stimulator_control)
        recorder = Recorder({config.endpoints.pulses: [b"crank", b"status"], config.endpoints.command: [b"status"]})
        try:
            processes.start_loop(path)
            _arm_and_stimulate(stim, lambda: emulator.ask("stimulating"))

            def stimulated() -> bool:
                if emulator.ask("pulse_count") > 300:
                    return True
                status = stim.request("status", timeout_s=2.0)
                assert status["state"] == "ARMED", (status.get("fault_reason"), status, controller_gates(recorder, 0.0)[-3:])
                return False

            try:
                wait_until(stimulated, 30, what="300 pulses on the device")
            except pytest.fail.Exception:
                status = stim.request("status", timeout_s=2.0)
                pytest.fail(f"{emulator.ask('pulse_count')} pulses in 30 s; controller gates "
                            f"{controller_gates(recorder, 0.0)[-3:]}; stimulator {status}")
            time.sleep(3.0)
            stopped_s = emulator.ask("unplug_motomed")  # no more ActualValues
            time.sleep(1.5)
            delivered, readings = emulator.ask("record")
        finally:
            recorder.close()
            stim.close()
            ctx.destroy(linger=0)
    # The emulator stamps with time.monotonic(): CLOCK_MONOTONIC, the shared clock on Linux.
    reading_s = np.array([t for t, _ in readings])
    true_deg = np.degrees(np.unwrap(np.radians([v.angle_deg for _, v in readings])))
    pulse_s = np.array([p.time_s for p in delivered])
    channels = np.array([p.channel for p in delivered])
    during = (pulse_s > reading_s[0]) & (pulse_s < stopped_s)
    angle_deg = np.interp(pulse_s[during], reading_s, true_deg) % 360.0
    # 15 deg margin: the reported angle is whole degrees, 20 ms apart, plus the USB/loop latency.
    assert_pulses_in_windows(config, channels[during], pulse_s[during], angle_deg, CADENCE_RPM, 15.0)
    relayed = np.concatenate([m.body.angle_deg for m in recorder.get(b"crank")]).astype(int)
    sent = np.array([v.angle_deg for _, v in readings])
    assert len(relayed) > 100
    assert any(np.array_equal(sent[j : j + len(relayed)], relayed) for j in range(len(sent) - len(relayed) + 1))
    after = pulse_s[pulse_s >= stopped_s]
    print(f"last device pulse {after.max() - stopped_s if len(after) else 0.0:.3f} s after the last ActualValues")
    assert len(after) == 0 or after.max() - stopped_s <= STOP_BOUND_S
    gates = controller_gates(recorder, stopped_s + 0.5)
    assert gates and all(g == ["NO_CRANK"] * len(config.stimulation) for g in gates)
