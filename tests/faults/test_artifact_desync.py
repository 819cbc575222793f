"""Stimulation artifacts reaching the estimate (fault matrix row 20), in real processes.

The blanking is turned off (no window from pulses, none detected), the worst case of a
window shifted off its artifacts: every pulse's artifact (60 uV/mA in the simulated
patient) reaches the envelope of its muscle, and the loop can feed itself. Pass: the
activation stays within 0..1, no pulse exceeds the channel's ceiling, and the amplitude
rises no faster than the ramp (0 to the ceiling in no less than ramp_s).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from fesloop.config import load_config
from fesloop.sockets import ControlClient, ControlTimeout
from stimulator.limits import DEVICES
from stimulator.mapping import clamp_ma
from tests.conftest import long_contraction
from tests.streams import Recorder, pulses_array

RUN_S = 4.0
LATE_S = 0.020


@pytest.mark.timeout(60)
def test_unblanked_artifacts_keep_activation_ceiling_and_ramp(write_config, processes) -> None:
    edits = {**long_contraction(start_s=1.0), "pre_ms = 1.0\npost_ms = 20.0": "pre_ms = 0.0\npost_ms = 0.0\nfrom_pulses = false"}
    path = write_config("demo.toml", edits)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    ctx = zmq.Context()
    controller = ControlClient(ctx, config.endpoints.controller_control)
    activations: list[dict[str, float]] = []
    try:
        processes.start_loop(path)
        end = time.monotonic() + 30
        while time.monotonic() < end and len(pulses_array(recorder.get(b"pulses"))[1]) == 0:
            time.sleep(0.05)
        end = time.monotonic() + RUN_S
        while time.monotonic() < end:
            try:
                activations.append(controller.request("status", timeout_s=1.0)["activation"])
            except ControlTimeout:
                pass
            time.sleep(0.05)
        channel, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    finally:
        recorder.close()
        controller.close()
        ctx.destroy(linger=0)
    assert activations and all(0.0 <= a <= 1.0 for status in activations for a in status.values())
    # The artifacts did reach the estimate: the second muscle is at rest, yet its activation rose
    # (median ~0.24 measured; with the demo's blanking it stays at 0, p90 0.0005).
    resting = config.muscles[1].name
    assert np.median([status[resting] for status in activations]) > 0.05
    assert len(times) > 50, "the loop did not stimulate"
    device = DEVICES[config.stimulator.driver]
    for stim in config.stimulation:
        mine = channel == stim.device_channel
        if not mine.any():
            continue
        t, a = times[mine], amplitudes[mine]
        ceiling_ma = clamp_ma(stim, device)
        assert a.max() <= ceiling_ma
        rise_ma_per_s = ceiling_ma / config.stimulator.ramp_s
        # A pulse carries its scheduled time and the output of the loop step that delivered it, up to
        # LATE_S after on a loaded machine; and one device step of rounding.
        # Over any span, not only pulse to pulse (slack per pair added up along a ramp let 1.9x pass).
        b = a - rise_ma_per_s * t
        rise_over_any_span = b[1:] - np.minimum.accumulate(b[:-1])
        assert (rise_over_any_span <= rise_ma_per_s * LATE_S + device.amplitude_step_ma).all(), (
            f"{stim.name}: rose faster than the ramp"
        )
        # The first pulse comes within a period of the output leaving 0, so within a period's rise.
        assert a[0] <= rise_ma_per_s * (1.0 / stim.frequency_hz + LATE_S) + device.amplitude_step_ma
