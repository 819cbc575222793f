"""Every start order (fault matrix row 19): nothing depends on a missed PUB message.

The processes start one by one, 0.5 s apart, in each of the six orders. The
stimulator must stay DISARMED with no pulses until an explicit arm, refuse that arm
until the controller's commands are fresh (an arm asked as soon as the stimulator is
up, before the others, is refused), and stimulate once armed.
"""

from __future__ import annotations

import itertools
import time

import pytest
import zmq

from fesloop.config import load_config
from fesloop.sockets import ControlClient, ControlTimeout
from tests.conftest import long_contraction, wait_until
from tests.streams import Recorder, pulses_array

ROLES = ("acquisition", "controller", "stimulator")
LONG_CONTRACTION = long_contraction(start_s=0.0, arm_at_start=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", list(itertools.permutations(ROLES)), ids="-".join)
def test_any_start_order_stays_disarmed_until_armed_then_stimulates(write_config, processes, order) -> None:
    path = write_config("demo.toml", LONG_CONTRACTION)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    ctx = zmq.Context()
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    refusals: list[str] = []
    early_arm = None  # asked while a process the loop needs is not started yet
    try:
        for i, role in enumerate(order):
            processes.start(role, str(path), name=role)
            if role == "stimulator" and i < len(order) - 1:
                early_arm = stim.request("arm", timeout_s=20.0)
            time.sleep(0.5)

        def arm() -> bool:
            try:
                reply = stim.request("arm", timeout_s=1.0)
            except ControlTimeout:
                return False
            if not reply["ok"]:
                refusals.append(reply["error"])
            return reply["ok"] or "already ARMED" in reply.get("error", "")

        time.sleep(1.0)
        disarmed = stim.request("status", timeout_s=5.0)
        pulses_before_arm = len(pulses_array(recorder.get(b"pulses"))[1])
        wait_until(arm, 20, what="arm once commands are fresh")
        wait_until(lambda: len(pulses_array(recorder.get(b"pulses"))[1]) >= 5, 20, what="stimulation after arm")
    finally:
        recorder.close()
        stim.close()
        ctx.destroy(linger=0)
    if order[-1] != "stimulator":
        assert early_arm is not None and not early_arm["ok"], early_arm
        assert "fresh command" in early_arm["error"] or "EMG is not within" in early_arm["error"], early_arm
    assert disarmed["state"] == "DISARMED" and disarmed["output_ma"] == [0.0, 0.0]
    assert pulses_before_arm == 0
    assert all("fresh command" in r or "EMG is not within" in r or "not ready" in r for r in refusals), refusals
