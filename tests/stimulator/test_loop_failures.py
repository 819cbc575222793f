"""Invariant 7 in the real stimulator loop: any exception -> output zero first, then FAULT.

The loop runs in a thread of this process with real sockets on loopback; only the
driver's delivery is made to fail, at the edge where hardware would be.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fesloop.config import load_config
from fesloop.protocol import Command, GateReason
from fesloop.sockets import ControlRefused
from stimulator.loop import Stimulator
from stimulator.safety import StimState
from tests.conftest import wait_until


def _stimulator(write_config) -> tuple[Stimulator, list[str]]:
    """A stimulator (simulated driver) whose driver zeroing and kernel fault note, in order, what they saw."""
    stim = Stimulator(load_config(write_config("demo.toml", {"arm_at_start = true": "arm_at_start = false"})))
    order: list[str] = []
    real_zero, real_fault = stim.driver.zero, stim.kernel.fault

    def zero() -> None:
        order.append(f"zero while {stim.kernel.state.value}")
        real_zero()

    def fault(reason: str) -> None:
        order.append(f"fault while {stim.kernel.state.value}, driver at {stim.driver.amplitude_ma.max():g} mA")
        real_fault(reason)

    stim.driver.zero, stim.kernel.fault = zero, fault
    return stim, order


def _full_command(now_s: float) -> Command:
    return Command(now_s, np.ones(2, np.float32), np.ones(2, bool), np.full(2, GateReason.OPEN, np.uint8))


@pytest.mark.timeout(30)
def test_an_exception_in_the_loop_zeroes_the_driver_before_the_fault_latches(write_config) -> None:
    stim, order = _stimulator(write_config)
    now_s = stim.rt.clock.now()
    stim.kernel.accept(1, _full_command(now_s), now_s)
    stim.kernel.arm(now_s)
    stim._apply(now_s + 0.05)
    assert stim.driver.amplitude_ma.max() > 0  # stimulating

    def broken(_now_s: float) -> None:
        raise OSError("USB transfer failed")

    stim.driver.deliver_due = broken
    thread = threading.Thread(target=stim.run)
    thread.start()
    try:
        wait_until(lambda: stim.kernel.state is StimState.FAULT, 10, what="FAULT")
    finally:
        stim.rt.running = False
        thread.join(10)
    assert order[:2] == ["zero while ARMED", "fault while ARMED, driver at 0 mA"]
    assert "USB transfer failed" in stim.kernel.fault_reason
    assert not stim.kernel.output_ma.any()


@pytest.mark.timeout(30)
def test_a_failure_while_serving_a_control_request_zeroes_first_and_refuses_it(write_config) -> None:
    """Invariant 7 on the control path: while stimulating, an operator's request (a dose
    override) applies the output, and the driver fails right after taking it."""
    stim, order = _stimulator(write_config)
    real_set_output = stim.driver.set_output
    try:
        now_s = stim.rt.clock.now()
        stim.kernel.accept(1, _full_command(now_s), now_s)
        stim.kernel.arm(now_s)
        stim._apply(now_s + 0.05)
        assert stim.driver.amplitude_ma.max() > 0  # stimulating

        def set_output(amplitude_ma: np.ndarray, pulse_width_us: np.ndarray, at_s: float) -> None:
            real_set_output(amplitude_ma, pulse_width_us, at_s)
            raise OSError("USB transfer failed")

        stim.driver.set_output = set_output
        stim.dose.exhausted_reason[0] = "charge limit reached"  # as a dose limit leaves it: the override applies
        request = {"channel": stim.dose.names[0], "operator": "TS", "reason": "test"}
        with pytest.raises(ControlRefused, match="FAULT: internal error: OSError\\('USB transfer failed'\\)"):
            stim.rt.control.handlers["override_dose"](request)
    finally:
        stim.rt.close()
        stim.driver.close()
    assert order[:2] == ["zero while ARMED", "fault while ARMED, driver at 0 mA"]  # then close() zeroes again
    assert stim.kernel.state is StimState.FAULT and not stim.kernel.output_ma.any()


@pytest.mark.timeout(30)
def test_an_override_of_a_channel_without_a_reached_limit_is_refused(write_config) -> None:
    """Each accepted override restarts the channel's allowance: on a channel that reached no limit,
    repeated overrides would put its limit off indefinitely (found in review)."""
    stim, _ = _stimulator(write_config)
    try:
        request = {"channel": stim.dose.names[0], "operator": "TS", "reason": "test"}
        with pytest.raises(ControlRefused, match="has reached no dose limit"):
            stim.rt.control.handlers["override_dose"](request)
    finally:
        stim.rt.close()
        stim.driver.close()
    assert stim.dose.summary()[0]["overrides"] == 0
