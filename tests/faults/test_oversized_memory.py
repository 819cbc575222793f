"""Oversized messages never reach the stimulator's memory (fault matrix row 13).

libzmq reads a frame's size before its body: a frame beyond MAXMSGSIZE drops the peer
(documented) and is never allocated. The test sends 64 MiB frames to the real
stimulator's command input (each right after a small malformed command it counted,
so its subscription is live) and to its control socket (the sender's socket monitor
sees the peer dropped), and checks that none was counted as a command and that the
stimulator's peak resident memory (VmHWM) did not grow: a frame taken in raises it
by its size (without the limit: 62 -> 210 MB, and two of them counted as rejected).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from fesloop.config import load_config
from fesloop.sockets import ControlClient, ControlTimeout
from tests.conftest import clock_peer, wait_until

pytestmark = pytest.mark.timeout(90)

OVERSIZED_BYTES = 64 * 1024 * 1024
MAX_PEAK_GROWTH_KB = 8 * 1024


def _peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))


def _dropped_after(sock: zmq.Socket, monitor: zmq.Socket, frames: list[bytes]) -> bool:
    """Send ``frames`` on a connected ``sock``; whether the peer then dropped the connection (within 5 s)."""
    sock.send_multipart(frames)
    poller = zmq.Poller()
    poller.register(monitor, zmq.POLLIN)
    while poller.poll(5000):
        if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return True
    return False


def _connected(monitor: zmq.Socket) -> None:
    poller = zmq.Poller()
    poller.register(monitor, zmq.POLLIN)
    while poller.poll(10000):
        if recv_monitor_message(monitor)["event"] == zmq.EVENT_CONNECTED:
            return
    raise AssertionError("never connected to the stimulator's control socket")


def test_oversized_frames_drop_the_peer_and_never_raise_the_stimulators_memory(write_config, processes) -> None:
    path = write_config("demo.toml")
    config = load_config(path)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(config.endpoints.command)
    stim = ControlClient(ctx, config.endpoints.stimulator_control)

    def rejected() -> int:
        return stim.request("status", timeout_s=2.0)["rejected"]

    def counts_a_malformed_command(before: int) -> bool:
        pub.send_multipart([b"command", b"malformed"])
        time.sleep(0.05)
        return rejected() > before

    counted_oversized = []
    with clock_peer(config.endpoints.acquisition_control):
        try:
            process = processes.start("stimulator", str(path), name="stimulator")
            wait_until(lambda: _answers(stim), 30, interval_s=0.0, what="the stimulator answering")
            before_kb = _peak_rss_kb(process.pid)
            for _ in range(3):  # the command input, each time its subscription is live again
                live = rejected()
                wait_until(lambda: counts_a_malformed_command(live), 10, interval_s=0.0, what="a live subscription")
                time.sleep(0.2)  # every malformed command sent is counted by now
                counted = rejected()
                pub.send_multipart([b"command", bytes(OVERSIZED_BYTES)])
                time.sleep(0.5)
                counted_oversized.append(rejected() - counted)
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req_monitor = req.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            req.connect(config.endpoints.stimulator_control)
            _connected(req_monitor)
            control_dropped = _dropped_after(req, req_monitor, [bytes(OVERSIZED_BYTES)])
            status = stim.request("status", timeout_s=2.0)
            after_kb = _peak_rss_kb(process.pid)
        finally:
            stim.close()
            ctx.destroy(linger=0)

    assert counted_oversized == [0, 0, 0]  # never reached the stimulator as a command
    assert control_dropped  # delivered, and libzmq dropped its sender
    assert after_kb - before_kb < MAX_PEAK_GROWTH_KB, (before_kb, after_kb)
    assert status["state"] in ("DISARMED", "FAULT")  # it runs on, and never armed on garbage


def _answers(client: ControlClient) -> bool:
    try:
        client.request("status", timeout_s=1.0)
    except ControlTimeout:
        return False
    return True
