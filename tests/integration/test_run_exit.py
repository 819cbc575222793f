"""`fesloop run` reports every FAULT the stimulator latched, however close to the stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from fesloop.config import load_config
from fesloop.sockets import ControlClient, ControlTimeout
from tests.conftest import long_contraction, wait_until


@pytest.mark.timeout(90)
def test_a_fault_latched_just_before_ctrl_c_fails_the_run(write_config) -> None:
    """The controller freezes 150 ms (the stimulator's deadline latches FAULT), then Ctrl+C: the
    supervisor looked at the stimulator's state at 5 Hz and left the loop on the signal without
    looking again, so the run said "Faults: none", "stopped cleanly" and exited 0."""
    path = write_config("demo.toml", long_contraction(start_s=0.0))
    config = load_config(path)
    run = subprocess.Popen([sys.executable, "-m", "fesloop", "run", str(path)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    ctx = zmq.Context()
    stimulator = ControlClient(ctx, config.endpoints.stimulator_control)
    controller = ControlClient(ctx, config.endpoints.controller_control)

    def status(client: ControlClient) -> dict:
        try:
            return client.request("status", timeout_s=1.0)
        except ControlTimeout:
            return {}

    try:
        wait_until(lambda: status(stimulator).get("pulses_delivered", 0) > 10, 30, what="stimulation")
        controller_pid = status(controller)["pid"]
        os.kill(controller_pid, signal.SIGSTOP)
        time.sleep(0.15)
        os.kill(controller_pid, signal.SIGCONT)
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=30)
    finally:
        stimulator.close()
        controller.close()
        ctx.destroy(linger=0)
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, output
    assert "fesloop: stimulator FAULT: no fresh command within 100 ms" in output
    assert "Faults: no fresh command within 100 ms" in output and "stopped with failures" in output


@pytest.mark.timeout(90)
def test_a_second_run_on_the_same_ports_leaves_the_first_session_alone(write_config, processes) -> None:
    """A second `fesloop run` on the same config: its children could not bind, but its supervisor took
    the first session's status replies for its own children's and, stopping, sent them disarm and
    shutdown: the first session's stimulator latched FAULT mid-stimulation."""
    path = write_config("demo.toml", long_contraction(start_s=0.0))
    config = load_config(path)
    first = processes.start_loop(path)
    ctx = zmq.Context()
    stimulator = ControlClient(ctx, config.endpoints.stimulator_control)
    try:
        wait_until(lambda: stimulator.request("status", timeout_s=2.0).get("pulses_delivered", 0) > 10, 30,
                   what="the first session stimulating")
        second = subprocess.run([sys.executable, "-m", "fesloop", "run", str(path), "--duration", "3"],
                                capture_output=True, text=True, timeout=60)
        after = stimulator.request("status", timeout_s=2.0)
    finally:
        stimulator.close()
        ctx.destroy(linger=0)
    assert second.returncode != 0
    assert "another process" in second.stdout and "is another session running on these ports?" in second.stdout
    assert after["state"] == "ARMED" and after["fault_count"] == 0 and after["pid"] == first["stimulator"]
    assert all(process.poll() is None for process in processes.started)  # the first session runs on
