"""The wall clock stepped by seconds and by an hour during a run (fault matrix row 16).

The real clock cannot be stepped here, so every process of the loop starts with a
``sitecustomize`` that makes ``time.time()`` jump +2 s 1.0 s after the process started,
-2 s a second later, +1 h at 3.0 s and -1 h (to an hour behind) at 4.5 s; the controller
is killed at 6 s of the test (every process has made every step by then, with 1.5 s to
spare for a slow start). Deadlines and freshness use the monotonic shared clock
(``pylsl.local_clock``), so there must be no spurious FAULT, no pause in the pulses,
and the killed controller still zeroes the output in time.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import numpy as np
import pylsl
import pytest
import zmq

from fesloop.config import load_config
from fesloop.sockets import ControlClient
from tests.conftest import long_contraction, wait_until
from tests.streams import Recorder, pulses_array

STEPPED_TIME = '''
import time as _time

_wall = _time.time
_start = _wall()


def _stepped() -> float:
    now = _wall()
    elapsed = now - _start
    if elapsed > 4.5:
        return now - 3600.0
    if elapsed > 3.0:
        return now + 3600.0
    if elapsed > 2.0:
        return now - 2.0
    if elapsed > 1.0:
        return now + 2.0
    return now


_time.time = _stepped
'''
LONG_CONTRACTION = long_contraction(start_s=0.0)


def _stamp(log_line: str) -> float:
    return datetime.strptime(log_line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.timeout(60)
def test_wall_clock_steps_cause_no_fault_and_no_missed_deadline(write_config, processes, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STEPPED_TIME)
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    path = write_config("demo.toml", LONG_CONTRACTION)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    try:
        started = time.monotonic()
        pids = processes.start_loop(path)
        wait_until(lambda: len(pulses_array(recorder.get(b"pulses"))[1]) > 0, 20, what="stimulation")
        time.sleep(max(0.0, 6.0 - (time.monotonic() - started)))  # every step has happened
        status = stim.request("status", timeout_s=2.0)
        t_kill = pylsl.local_clock()
        os.kill(pids["controller"], signal.SIGKILL)
        time.sleep(0.6)
        after = stim.request("status", timeout_s=2.0)
        _, times, _ = pulses_array(recorder.get(b"pulses"))
    finally:
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    # The children did run on the stepped wall clock: their log stamps (time.time) jumped back.
    log = processes.log("stimulator").splitlines()
    started_at = _stamp(next(line for line in log if "running:" in line))
    faulted_at = _stamp(next(line for line in log if "-> FAULT" in line))
    assert faulted_at - started_at < -3000
    assert status["state"] == "ARMED", status["fault_reason"]
    running = times[times < t_kill]
    assert np.diff(running).max() < 0.1  # no pause across the steps (30 Hz pulses)
    assert times.max() - t_kill <= 0.250
    assert after["state"] == "FAULT" and "fresh command" in after["fault_reason"]
