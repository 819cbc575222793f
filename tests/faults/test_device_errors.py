"""Stimulator device errors through the whole loop (fault matrix rows 9-11).

The real three processes drive the RehaStim2 driver against the protocol emulator
on a pseudo-terminal; the emulated device reports each StimulationError while
stimulating. Pass: the stimulator latches FAULT naming the cause within 100 ms (the
time of its published FAULT status against the injection, on the shared clock), its
output is zero at once, and it does not stimulate again by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pylsl
import pytest
import zmq

from fesloop.config import load_config
from fesloop.session import CONFIRMATION_ITEMS
from fesloop.sockets import ControlClient, ControlTimeout
from stimulator.rehastim2_emulator import PtyEmulator
from tests.conftest import long_contraction, wait_until
from tests.streams import Recorder

LONG_CONTRACTION = long_contraction(start_s=0.0, arm_at_start=False)
CAUSES = {-1: "emergency", -2: "electrode", -3: "module"}
FAULT_WITHIN_S = 0.100  # fault matrix row 9: FAULT latched <= 100 ms after the error


def _wait_fault(stim: ControlClient) -> dict:
    """The stimulator's status once it reports FAULT (within 5 s)."""
    return wait_until(lambda: (s := stim.request("status", timeout_s=2.0))["state"] == "FAULT" and s, 5, what="FAULT")


def _fault_after(recorder: Recorder, t0: float) -> float:
    """Seconds from ``t0`` to the stimulator's first FAULT status message (published at once on the change)."""
    times = [m.header.send_time_s for m in recorder.get(b"status") if m.body.fields["state"] == "FAULT"]
    return min(times) - t0


def _rehastim2_config(write_config, emulator: PtyEmulator) -> Path:
    """The demo with a long contraction, driving the RehaStim2 emulator's port."""
    return write_config(
        "demo.toml", {**LONG_CONTRACTION, 'driver = "simulated"': f'driver = "rehastim2"\nserial_port = "{emulator.path}"'}
    )


def _confirmation() -> dict:
    return {"operator": "TS", "items": list(CONFIRMATION_ITEMS), "time_unix_s": time.time()}


def _arm_and_stimulate(stim: ControlClient, stimulating: Callable[[], bool]) -> None:
    def armed() -> bool:
        try:
            return stim.request("arm", timeout_s=1.0, confirmation=_confirmation())["ok"]
        except ControlTimeout:
            return False

    wait_until(armed, 30, what="arm")
    wait_until(stimulating, 20, what="the device to stimulate")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", sorted(CAUSES))
def test_device_error_latches_fault_naming_the_cause_and_stays_off(write_config, processes, code: int) -> None:
    with PtyEmulator() as emulator:
        path = _rehastim2_config(write_config, emulator)
        config = load_config(path)
        ctx = zmq.Context()
        stim = ControlClient(ctx, config.endpoints.stimulator_control)
        recorder = Recorder({config.endpoints.pulses: [b"status"]})
        try:
            processes.start_loop(path)
            _arm_and_stimulate(stim, lambda: emulator.device.stimulating)
            with emulator.lock:
                t_error = pylsl.local_clock()
                emulator.device.inject_stimulation_error(code, time.monotonic())
            status = _wait_fault(stim)
            time.sleep(1.0)
            later = stim.request("status", timeout_s=2.0)
            with emulator.lock:
                stimulating_again = emulator.device.stimulating
        finally:
            recorder.close()
            stim.close()
            ctx.destroy(linger=0)
    fault_s = _fault_after(recorder, t_error)
    print(f"StimulationError {code}: FAULT {fault_s * 1e3:.1f} ms after the error")
    assert 0 <= fault_s <= FAULT_WITHIN_S
    assert CAUSES[code] in status["fault_reason"].lower(), status["fault_reason"]
    assert "quadriceps_l (device channel 1)" in status["fault_reason"]  # the matrix: name the channel
    assert "tibialis_l" not in status["fault_reason"]  # at 0 mA: not concerned
    assert status["output_ma"] == [0.0, 0.0]
    assert later["state"] == "FAULT" and not stimulating_again


@pytest.mark.timeout(60)
def test_pulled_usb_cable_latches_fault_naming_the_port_and_the_stimulator_lives_on(write_config, processes) -> None:
    """The serial port vanishes while stimulating (the pty's device side closes, as when
    the USB cable is pulled): FAULT naming the serial failure, output zero, the process
    keeps answering, and arming again is refused."""
    emulator = PtyEmulator()
    path = _rehastim2_config(write_config, emulator)
    config = load_config(path)
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    recorder = Recorder({config.endpoints.pulses: [b"status"]})
    try:
        pids = processes.start_loop(path)
        _arm_and_stimulate(stim, lambda: emulator.device.stimulating)
        t_pulled = pylsl.local_clock()
        emulator.close()  # the cable is pulled
        status = _wait_fault(stim)
        time.sleep(1.0)
        later = stim.request("status", timeout_s=2.0)
        rearm = stim.request("arm", timeout_s=2.0, confirmation=_confirmation())
    finally:
        emulator.close()
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    fault_s = _fault_after(recorder, t_pulled)
    print(f"cable pulled: FAULT {fault_s * 1e3:.1f} ms later")
    assert 0 <= fault_s <= FAULT_WITHIN_S
    assert "serial" in status["fault_reason"], status["fault_reason"]
    assert "quadriceps_l (device channel 1)" in status["fault_reason"]
    assert status["output_ma"] == [0.0, 0.0]
    assert later["state"] == "FAULT" and later["output_ma"] == [0.0, 0.0]
    assert not rearm["ok"]
    assert processes.started[0].poll() is None and pids["stimulator"] == processes.started[0].pid  # no crash
