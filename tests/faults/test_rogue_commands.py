"""Bad commands at the real stimulator's input (fault matrix rows 12-15).

The test plays the controller: it binds the command endpoint and sends, between
valid commands at half intensity, malformed, truncated, NaN-carrying, replayed and
reordered full-intensity commands, then a 10x flood, then an oversized message.
Pass: every bad message is counted and dropped, the output never exceeds what the
valid commands ask for, the state stays ARMED until the oversized message makes
libzmq drop the peer, after which the deadline latches FAULT.
"""

from __future__ import annotations

import struct
import time

import numpy as np
import pylsl
import pytest
import zmq

from fesloop import protocol
from fesloop.config import load_config
from fesloop.protocol import GateReason
from fesloop.sockets import MAX_MESSAGE_BYTES, ControlClient, ControlTimeout
from stimulator.mapping import intensity_to_ma
from tests.conftest import clock_peer, wait_until
from tests.streams import Recorder, pulses_array

pytestmark = pytest.mark.timeout(90)


def _command(seq: int, intensity: float) -> list[bytes]:
    now_s = pylsl.local_clock()
    body = protocol.Command(
        now_s - 0.005, np.full(2, intensity, np.float32), np.ones(2, bool), np.full(2, GateReason.OPEN, np.uint8)
    )
    return protocol.encode(seq, now_s, body)


def test_bad_commands_are_counted_and_dropped_and_never_raise_the_output(write_config, processes) -> None:
    path = write_config("demo.toml")
    config = load_config(path)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(config.endpoints.command)
    recorder = Recorder({config.endpoints.pulses: [b"pulses"]})
    stim = ControlClient(ctx, config.endpoints.stimulator_control)
    bad_sent = 0
    with clock_peer(config.endpoints.acquisition_control):  # the acquisition host's clock
        try:
            processes.start("stimulator", str(path), name="stimulator")
            seq = 0

            def send_valid(n: int, period_s: float = 0.005) -> None:
                nonlocal seq
                for _ in range(n):
                    seq += 1
                    pub.send_multipart(_command(seq, 0.5))
                    time.sleep(period_s)

            def armed() -> bool:
                send_valid(20)
                try:
                    return stim.request("status", timeout_s=1.0).get("state") == "ARMED"
                except ControlTimeout:
                    return False

            wait_until(armed, 30, interval_s=0.0, what="the stimulator armed by valid commands")
            send_valid(150)  # ramp to the half-intensity level
            full = _command(seq + 1, 1.0)[1]
            bad = [
                [b"command", b"garbage" * 5],
                [b"command", full[:-3]],  # truncated
                [b"command", full[:4] + bytes([99]) + full[5:]],  # wrong protocol version
                [b"command", full.replace(struct.pack("<f", 1.0), struct.pack("<f", float("nan")))],  # NaN intensity
                [b"command"],  # one frame
                [b"command", full, b"extra"],  # three frames: the whole message is dropped, the next one read whole
            ]
            for frames in bad:
                pub.send_multipart(frames)
                bad_sent += 1
                send_valid(3)
            for old_seq in (seq, seq - 1, 1):  # replayed and reordered, at full intensity
                pub.send_multipart(_command(old_seq, 1.0))
                bad_sent += 1
                send_valid(3)
            before_flood = stim.request("status", timeout_s=2.0)
            send_valid(2000, period_s=0.0005)  # 10x the control rate for 1 s
            send_valid(40)
            after_flood = stim.request("status", timeout_s=2.0)
            t_oversized = pylsl.local_clock()
            pub.send_multipart([b"command", bytes(MAX_MESSAGE_BYTES + 1)])
            time.sleep(0.1)
            send_valid(60)  # the peer was dropped: these no longer arrive
            final = wait_until(
                lambda: (s := stim.request("status", timeout_s=2.0))["state"] == "FAULT" and s, 10, what="FAULT"
            )
            _, times, amplitudes = pulses_array(recorder.get(b"pulses"))
        finally:
            recorder.close()
            stim.close()
            ctx.destroy(linger=0)
    half_ma = intensity_to_ma(
        np.array([0.5, 0.5]),
        np.array([c.threshold_ma for c in config.stimulation]),
        np.array([c.max_ma for c in config.stimulation]),
        1.0,
    )
    assert len(amplitudes) > 50
    assert amplitudes.max() <= half_ma.max()  # full-intensity replays never acted on
    assert before_flood["state"] == "ARMED" and after_flood["state"] == "ARMED"
    assert before_flood["rejected"] >= bad_sent
    assert after_flood["rejected"] == before_flood["rejected"]  # the flood was valid: nothing rejected
    assert after_flood["last_seq"] > before_flood["last_seq"] + 1500  # acted on the newest
    assert "no fresh command" in final["fault_reason"]
    assert times.max() - t_oversized <= 0.250  # fault matrix: output 0 within 250 ms
