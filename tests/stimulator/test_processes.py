"""The stimulator in real processes: a frozen controller, the latched e-stop, state markers,
and the RehaStim2 driver against the emulator. Assertions come from what the processes
publish (pulses, status, LSL markers) and their control replies, never from logs."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pylsl
import pytest
import zmq

from fesloop.config import load_config
from fesloop.lsl import configure_machine_scope
from fesloop.session import CONFIRMATION_ITEMS
from fesloop.sockets import ControlClient, ControlTimeout
from stimulator import sciencemode2 as sm2
from stimulator.rehastim2_emulator import PtyEmulator
from tests.conftest import long_contraction, wait_until
from tests.streams import Recorder, pulses_array

pytestmark = pytest.mark.timeout(90)

LONG_CONTRACTION = long_contraction()


def reply(client: ControlClient, request: str) -> dict:
    """A control reply, or {} while the process is still starting."""
    try:
        return client.request(request, timeout_s=2.0)
    except ControlTimeout:
        return {}


def wait_stimulating(recorder: Recorder, threshold_ma: float) -> None:
    def stimulating() -> bool:
        _, _, amplitudes = pulses_array(recorder.get(b"pulses"))
        return bool((amplitudes > threshold_ma).sum() >= 10)

    wait_until(stimulating, 30, what="stimulation during the scripted contraction")


def test_frozen_controller_zeroes_output_latches_fault_and_never_replays(write_config, processes) -> None:
    path = write_config("demo.toml", LONG_CONTRACTION)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    try:
        processes.start_loop(path)
        controller = processes.started[1]
        wait_stimulating(recorder, config.stimulation[0].threshold_ma)
        t_stop = pylsl.local_clock()
        os.kill(controller.pid, signal.SIGSTOP)
        time.sleep(1.0)
        frozen = stim.request("status", timeout_s=2.0)
        os.kill(controller.pid, signal.SIGCONT)
        t_cont = pylsl.local_clock()
        # The ZMTP heartbeat dropped the frozen peer; wait until the reconnected stream is read.
        wait_until(
            lambda: reply(stim, "status").get("last_seq", 0) > frozen["last_seq"], 10, what="commands after SIGCONT"
        )
        time.sleep(0.5)
        resumed = stim.request("status", timeout_s=2.0)
        print(f"commands read again {pylsl.local_clock() - t_cont - 0.5:.2f} s after SIGCONT")
        _, times, _ = pulses_array(recorder.get(b"pulses"))
    finally:
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    deadline_s = config.stimulator.deadline_ms * 1e-3
    last_after_stop_s = times[times <= t_cont].max() - t_stop
    print(f"last pulse {last_after_stop_s * 1e3:.1f} ms after SIGSTOP (deadline {deadline_s * 1e3:.0f} ms)")
    assert last_after_stop_s <= deadline_s + 0.030
    assert frozen["state"] == "FAULT" and "no fresh command" in frozen["fault_reason"]
    assert frozen["output_ma"] == [0.0, 0.0]
    # After SIGCONT the backlog and the fresh commands are read (last_seq moves on), yet
    # nothing is delivered: FAULT stays latched.
    assert not (times > t_cont).any(), f"{(times > t_cont).sum()} pulses after SIGCONT"
    assert resumed["state"] == "FAULT" and resumed["fault_reason"] == frozen["fault_reason"]
    assert resumed["last_seq"] > frozen["last_seq"] and resumed["output_ma"] == [0.0, 0.0]


def test_stop_latches_until_reset_and_reset_never_restarts_output(write_config, processes) -> None:
    path = write_config("demo.toml", LONG_CONTRACTION)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses", b"status"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    configure_machine_scope()
    try:
        processes.start_loop(path)
        streams = pylsl.resolve_bypred(f"type='Markers' and name='{config.name}-stimulator-markers'", 1, 20)
        assert streams, "no stimulator marker stream"
        markers = pylsl.StreamInlet(streams[0])
        markers.open_stream(timeout=5)
        wait_stimulating(recorder, config.stimulation[0].threshold_ma)
        t_stop = pylsl.local_clock()
        stopped = stim.request("stop", timeout_s=2.0)
        time.sleep(0.5)
        refused = stim.request("arm", timeout_s=2.0)
        still = stim.request("status", timeout_s=2.0)
        t_reset = pylsl.local_clock()
        reset = stim.request("reset", timeout_s=2.0)
        time.sleep(1.0)
        after = stim.request("status", timeout_s=2.0)
        _, times, _ = pulses_array(recorder.get(b"pulses"))
        samples, _ = markers.pull_chunk(timeout=2.0)
        states = [m.body.fields["state"] for m in recorder.get(b"status")]
    finally:
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    assert stopped["ok"] and stopped["state"] == "STOPPED" and stopped["output_ma"] == [0.0, 0.0]
    assert not refused["ok"] and "STOPPED" in refused["error"] and "reset first" in refused["error"]
    assert still["state"] == "STOPPED"
    assert reset["ok"] and reset["state"] == "DISARMED"
    assert after["state"] == "DISARMED" and after["output_ma"] == [0.0, 0.0]
    late = times[times > t_stop]
    assert len(late) == 0 or late.max() - t_stop < 0.005, late - t_stop  # a pulse already on its way
    assert not (times > t_reset).any(), "reset restarted output"
    events = [s[0] for s in samples]
    assert "ARMED -> STOPPED: stop requested" in events and "STOPPED -> DISARMED: reset" in events
    assert "STOPPED" in states and states[-1] == "DISARMED"  # every state change on status too


class Flood:
    """A client sending ``status`` requests back to back from a thread: a DEALER that never
    waits for a reply (it reads those that come), until closed. No key is needed on loopback;
    a key allowed only ``status`` could do the same."""

    def __init__(self, endpoint: str) -> None:
        self.replies = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = [b"", b'{"cmd": "status"}']
        while not self._stop.is_set():
            try:
                self._sock.send_multipart(request, zmq.NOBLOCK)
            except zmq.Again:  # every queue on the way is full
                self._sock.poll(1)
            while self._sock.poll(0):
                self._sock.recv_multipart()
                self.replies += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ctx.destroy(linger=0)


def test_a_flood_of_control_requests_delays_neither_the_deadline_fault_nor_a_stop(write_config, processes) -> None:
    """While a client floods the stimulator's control socket, its loop still runs the safety
    checks between requests: with the controller frozen, FAULT on the deadline is latched within
    the fault matrix's 250 ms (or earlier: on a busy machine the flood can take the controller's
    CPU, so commands come late), and another client's stop and reset get through."""
    path = write_config("demo.toml", LONG_CONTRACTION)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses", b"status"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    flood = None
    try:
        processes.start_loop(path)
        controller = processes.started[1]
        wait_stimulating(recorder, config.stimulation[0].threshold_ma)
        flood = Flood(config.endpoints.stimulator_control)
        wait_until(lambda: flood.replies > 1000, 10, what="the flood being answered")
        answered_before = flood.replies
        t_stop = pylsl.local_clock()
        os.kill(controller.pid, signal.SIGSTOP)

        def fault() -> dict | None:
            return next((m.body.fields for m in recorder.get(b"status") if m.body.fields["state"] == "FAULT"), None)

        faulted = wait_until(fault, 10, what="FAULT with the controller frozen during the flood")
        stopped = stim.request("stop", timeout_s=2.0)
        reset = stim.request("reset", timeout_s=2.0)
        answered_after = flood.replies
    finally:
        if flood is not None:
            flood.close()
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    print(f"FAULT {(faulted['time_s'] - t_stop) * 1e3:.0f} ms after SIGSTOP of the controller")
    assert "no fresh command" in faulted["fault_reason"] and faulted["output_ma"] == [0.0, 0.0]
    assert faulted["time_s"] - t_stop <= 0.250  # fault matrix: output 0 within 250 ms
    assert stopped["ok"] and stopped["state"] == "STOPPED"
    assert reset["ok"] and reset["state"] == "DISARMED"
    assert answered_after > answered_before  # the flood went on all along


def test_stop_and_reset_end_a_pending_arm_at_start(write_config, processes) -> None:
    """arm_at_start waits for fresh EMG. If the operator stops and resets before it comes, the
    stimulator must stay DISARMED when it comes: after a reset only an explicit arm arms."""
    path = write_config("demo.toml", LONG_CONTRACTION)  # demo: arm_at_start = true
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    controller = ControlClient(ctx, config.endpoints.controller_control)
    try:
        processes.start("stimulator", str(path), name="stimulator")
        processes.start("controller", str(path), name="controller")  # commands flow, no EMG yet
        wait_until(lambda: reply(stim, "status").get("commands_received", 0) > 20, 30, what="commands")
        assert reply(stim, "status")["state"] == "DISARMED"
        assert stim.request("stop", timeout_s=2.0)["state"] == "STOPPED"
        assert stim.request("reset", timeout_s=2.0)["state"] == "DISARMED"
        processes.start("acquisition", str(path), name="acquisition")

        def emg_fresh_everywhere() -> bool:
            clocks = reply(stim, "status").get("peer_clocks", {})
            return clocks.get("acquisition", {}).get("synchronized", False) and set(
                reply(controller, "status").get("gate", [])
            ) == {"OPEN"}

        wait_until(emg_fresh_everywhere, 30, what="fresh EMG at the controller and a known clock at the stimulator")
        time.sleep(2.0)  # arm_at_start arms within a few commands of fresh EMG
        final = stim.request("status", timeout_s=2.0)
        _, times, _ = pulses_array(recorder.get(b"pulses"))
    finally:
        recorder.close()
        stim.close()
        controller.close()
        ctx.destroy(linger=0)
    assert final["state"] == "DISARMED" and final["output_ma"] == [0.0, 0.0]
    assert len(times) == 0


def watchdogs(emulator: PtyEmulator) -> int:
    """Watchdog packets the emulated device has received."""
    with emulator.lock:
        return sum(p.command == sm2.Cmd.WATCHDOG for p in emulator.device.commands)


def test_rehastim2_process_against_the_emulator(write_config, processes) -> None:
    with PtyEmulator() as emulator:
        replace = {**LONG_CONTRACTION, "arm_at_start = true": "arm_at_start = false",
                   'driver = "simulated"': f'driver = "rehastim2"\nserial_port = "{emulator.path}"'}  # fmt: skip
        path = write_config("demo.toml", replace)
        config = load_config(path)
        recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
        ctx = zmq.Context()
        stim = ControlClient(ctx, config.endpoints.stimulator_control)
        try:
            processes.start_loop(path)
            controller = processes.started[1]

            def connected() -> bool:
                return reply(stim, "status").get("device", {}).get("device") == "connected"

            wait_until(connected, 20, what="the RehaStim2 handshake")
            time.sleep(1.5)
            with emulator.lock:
                assert not emulator.device.stimulating  # never arms by itself
            # A real device is never armed without the operator's confirmation record.
            refused = stim.request("arm", timeout_s=2.0)
            assert refused["ok"] is False and "--confirm no-implant" in refused["error"]
            assert reply(stim, "status")["state"] == "DISARMED"
            confirmation = {"operator": "TS", "items": list(CONFIRMATION_ITEMS), "time_unix_s": time.time()}

            def arm() -> bool:
                try:
                    return stim.request("arm", timeout_s=2.0, confirmation=confirmation)["ok"]
                except ControlTimeout:
                    return False

            assert wait_until(arm, 10, what="arm")
            wait_until(lambda: emulator.device.stimulating, 20, what="the emulator to stimulate")
            wait_stimulating(recorder, config.stimulation[0].threshold_ma)
            t_stop = time.monotonic()
            os.kill(controller.pid, signal.SIGSTOP)
            time.sleep(0.6)
            status = stim.request("status", timeout_s=2.0)
            with emulator.lock:
                device_pulses = [p.time_s for p in emulator.device.pulses]
                stimulating = emulator.device.stimulating
            fed = watchdogs(emulator)
            time.sleep(1.0)  # the loop runs on, the controller is frozen: no keep-alive at all
            fed_later = watchdogs(emulator)
            os.kill(controller.pid, signal.SIGCONT)
        finally:
            recorder.close()
            stim.close()
            ctx.destroy(linger=0)
    last_s = max(device_pulses) - t_stop
    print(f"emulated device: last pulse {last_s * 1e3:.1f} ms after SIGSTOP of the controller")
    assert not stimulating and last_s <= 0.100 + 0.050
    assert status["state"] == "FAULT" and "no fresh command" in status["fault_reason"]
    assert fed_later == fed  # so a dead controller lets the device's own watchdog fire too
    _, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    assert np.all(amplitudes == np.floor(amplitudes))  # the device's 1 mA grid
