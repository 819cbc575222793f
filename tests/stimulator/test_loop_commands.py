"""The stimulator loop's command input: every queued command read, the newest acted on, losses counted.

The real Stimulator in this process with real sockets on loopback; the test plays the
controller (a PUB bound on the command endpoint). A flood is where this matters: after a
stall or a burst, what queued is read in one step and only the newest command counts, and
what the high-water marks dropped shows as gaps in the sequence.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pylsl
import pytest
import zmq

from fesloop import protocol
from fesloop.config import load_config
from fesloop.protocol import GateReason
from fesloop.sockets import publisher
from stimulator.loop import Stimulator


class Controller:
    """Plays the controller: sends commands with increasing sequence numbers."""

    def __init__(self, pub: zmq.Socket) -> None:
        self.pub = pub
        self.seq = 0

    def send(self, intensity: float) -> None:
        self.seq += 1
        now_s = pylsl.local_clock()
        body = protocol.Command(
            now_s - 0.005, np.full(2, intensity, np.float32), np.ones(2, bool), np.full(2, GateReason.OPEN, np.uint8)
        )
        self.pub.send_multipart(protocol.encode(self.seq, now_s, body))


@pytest.fixture
def connected(write_config) -> Iterator[tuple[Stimulator, zmq.Poller, Controller]]:
    """A stimulator (DISARMED) and a controller whose commands reach it, nothing left queued."""
    config = load_config(write_config("demo.toml", {"arm_at_start = true": "arm_at_start = false"}))
    ctx = zmq.Context()
    pub = publisher(ctx, config.endpoints.command)  # the controller's own: its high-water mark too
    stim = Stimulator(config)
    poller = stim.poller()
    controller = Controller(pub)
    try:
        deadline = time.monotonic() + 10
        while stim.command_link.counters.received == 0:  # until the subscription is through
            assert time.monotonic() < deadline, "no command reached the stimulator"
            controller.send(0.1)
            stim.step(poller)
        time.sleep(0.05)
        stim.step(poller)  # anything still queued from the warm-up
        yield stim, poller, controller
    finally:
        stim.rt.close()
        stim.driver.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(30)
def test_a_step_reads_every_queued_command_and_acts_on_the_newest(connected) -> None:
    stim, poller, controller = connected
    accepted = stim.kernel.accepted
    burst = [0.9, 0.7, 0.5, 0.3, 0.2]  # neither the first, the largest nor the mean is the newest
    for intensity in burst:
        controller.send(intensity)
    deadline = time.monotonic() + 5
    while stim.command_link.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0:
        assert time.monotonic() < deadline, "the burst did not arrive"
        time.sleep(0.001)
    time.sleep(0.05)  # the whole burst in the socket's queue
    stim.step(poller)
    assert stim.kernel.accepted - accepted == len(burst)  # every one read and checked in the one step
    assert stim.kernel.last_seq == controller.seq
    np.testing.assert_allclose(stim.commanded_intensity, [0.2, 0.2], rtol=1e-6)


@pytest.mark.timeout(30)
def test_commands_lost_to_a_flood_are_counted_as_dropped(connected) -> None:
    """Fault matrix row 15: a burst far beyond the command socket's high-water mark while the
    loop is not reading. What is lost shows as gaps in the sequence: received + dropped equals
    what was sent (a last command after the burst makes a loss at its end visible)."""
    stim, poller, controller = connected
    counters = stim.command_link.counters
    before = counters.received + counters.dropped
    burst = 100_000
    for _ in range(burst):
        controller.send(0.1)
    for _ in range(200):  # read what got through
        stim.step(poller)
    controller.send(0.1)
    deadline = time.monotonic() + 5
    while stim.kernel.last_seq != controller.seq:
        assert time.monotonic() < deadline, "the last command did not arrive"
        stim.step(poller)
    status = stim.rt.status()
    print(f"{counters.dropped} of {burst + 1} commands dropped")
    assert counters.received + counters.dropped - before == burst + 1
    assert counters.dropped > 0  # the high-water marks did drop some
    assert status["dropped"] == counters.dropped and status["links"]["controller"]["dropped"] == counters.dropped
