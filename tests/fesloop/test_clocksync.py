"""Peer clock offsets: the probe arithmetic, and the ``clock`` request to a real control server.

Offsets between processes with different clocks are measured end to end in
tests/faults/test_cross_host.py.
"""

from __future__ import annotations

import json
import math

import pytest
import zmq

from fesloop.clock import LslClock
from fesloop.clocksync import ClockSync, PeerOffset, Probe
from fesloop.runtime import ProcessRuntime
from tests.conftest import clock_peer, free_ports, wait_until

LOCAL = "this-pc/boot"


def test_offset_is_unknown_until_a_first_probe() -> None:
    peer = PeerOffset(LOCAL)
    assert not peer.known and math.isnan(peer.to_local(100.0))
    assert peer.status() == {"synchronized": False}


def test_probe_offset_is_the_peer_time_minus_the_round_trip_midpoint() -> None:
    peer = PeerOffset(LOCAL)
    peer.add(Probe(sent_s=10.0, peer_s=1010.004, received_s=10.010), "other-pc/boot")
    assert peer.offset_s == pytest.approx(999.999)
    assert peer.uncertainty_s == pytest.approx(0.005)
    assert peer.to_local(1010.004) == pytest.approx(10.005)
    assert not peer.shared_clock


def test_the_shortest_round_trip_in_the_window_wins() -> None:
    peer = PeerOffset(LOCAL, window=3)
    peer.add(Probe(0.0, 1000.5, 0.2), "other")  # slow: offset 1000.4 +- 0.1
    peer.add(Probe(1.0, 1001.001, 1.002), "other")  # fast: offset 1000.0 +- 0.001
    peer.add(Probe(2.0, 1002.3, 2.1), "other")
    assert peer.offset_s == pytest.approx(1000.0)
    peer.add(Probe(3.0, 1003.3, 3.1), "other")
    peer.add(Probe(4.0, 1004.3, 4.1), "other")  # the fast probe has left the window
    assert peer.offset_s == pytest.approx(1000.25)


def test_a_peer_on_this_host_shares_the_clock_exactly() -> None:
    peer = PeerOffset(LOCAL)
    peer.add(Probe(5.0, 5.3, 5.2), LOCAL)  # a slow reply does not matter: same clock
    assert peer.shared_clock and peer.offset_s == 0.0 and peer.uncertainty_s == 0.0


def test_a_peer_answering_from_another_clock_starts_afresh() -> None:
    peer = PeerOffset(LOCAL)
    peer.add(Probe(0.0, 500.0005, 0.001), "pc-a")  # fast probe, offset 500
    peer.add(Probe(10.0, 2010.05, 10.1), "pc-b")  # restarted elsewhere: only the new probe counts
    assert peer.offset_s == pytest.approx(2000.0)


@pytest.mark.parametrize("probe", [Probe(1.0, 5.0, 0.9), Probe(1.0, math.nan, 1.1), Probe(1.0, math.inf, 1.1)])
def test_impossible_probes_are_ignored(probe: Probe) -> None:
    peer = PeerOffset(LOCAL)
    peer.add(probe, "other")
    assert not peer.known


@pytest.mark.timeout(20)
def test_clock_sync_measures_a_real_control_server() -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    server = ProcessRuntime("acquisition", endpoint)
    ctx = zmq.Context()
    sync = ClockSync(ctx, LslClock(), {"acquisition": endpoint}).start()
    try:
        def answered() -> bool:
            server.control.serve_pending()
            return sync.synchronized

        wait_until(answered, 10, interval_s=0.001, what="a clock reply")
        assert sync.status() == {
            "acquisition": {"synchronized": True, "shared_clock": True, "offset_s": 0.0, "uncertainty_ms": 0.0}
        }
    finally:
        sync.stop()
        ctx.destroy(linger=0)
        server.close()


def test_an_offset_not_refreshed_for_max_age_is_unknown_again() -> None:
    """Clocks drift apart (1e-5 to 1e-4): an offset kept for ever moves pulse times off their artifacts."""
    peer = PeerOffset(LOCAL)
    peer.add(Probe(10.0, 1010.004, 10.010), "other-pc/boot")
    peer.expire(20.0, 10.0)
    assert peer.known
    peer.expire(20.011, 10.0)
    assert not peer.known and math.isnan(peer.to_local(1020.0))
    shared = PeerOffset(LOCAL)
    shared.add(Probe(10.0, 10.005, 10.010), LOCAL)
    shared.expire(1e6, 10.0)
    assert shared.known and shared.offset_s == 0.0  # one clock: nothing to drift


@pytest.mark.timeout(20)
def test_a_peer_that_stops_answering_is_unsynchronized_after_max_age() -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ctx = zmq.Context()
    sync = ClockSync(ctx, LslClock(), {"stimulator": endpoint}, max_age_s=1.0)
    try:
        with clock_peer(endpoint, shift_s=3600.0, host="other-pc/boot"):
            sync.start()
            wait_until(lambda: sync.synchronized, 10, what="a clock reply")
            assert sync.peers["stimulator"].offset_s == pytest.approx(3600.0, abs=0.01)
        gone_s = LslClock().now()
        wait_until(lambda: not sync.synchronized, 5, what="the offset to expire")
        assert LslClock().now() - gone_s >= 1.0 - 0.05
    finally:
        sync.stop()
        ctx.destroy(linger=0)


class FailingClock(LslClock):
    """The local clock, until ``fail`` is set: then reading it raises (an unexpected failure in the thread)."""

    fail = False

    def now(self) -> float:
        if self.fail:
            raise RuntimeError("clock read failed")
        return super().now()


@pytest.mark.timeout(20)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # re-raised for the log
def test_a_probing_thread_that_fails_forgets_every_offset_and_says_why() -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ctx = zmq.Context()
    clock = FailingClock()
    sync = ClockSync(ctx, clock, {"acquisition": endpoint})
    try:
        with clock_peer(endpoint, shift_s=5.0, host="other-pc/boot"):
            sync.start()
            wait_until(lambda: sync.synchronized, 10, what="a clock reply")
            clock.fail = True
            wait_until(lambda: not sync.synchronized, 5, what="the offsets to be forgotten")
    finally:
        sync.stop()
        ctx.destroy(linger=0)
    assert sync.status()["failure"] == "clock probing stopped: RuntimeError: clock read failed"
    assert not sync.peers["acquisition"].known


@pytest.mark.timeout(20)
def test_a_reply_that_is_not_json_is_no_probe_and_probing_goes_on() -> None:
    """A garbled reply raised out of the probe and ended the probing thread for good."""
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.bind(endpoint)
    sync = ClockSync(ctx, LslClock(), {"stimulator": endpoint}).start()
    try:
        for reply in (b"\xff\xfe", b"not json"):
            assert rep.poll(5000)
            rep.recv()
            rep.send(reply)
        assert rep.poll(5000)  # asked again: the thread lives
        rep.recv()
        rep.send(json.dumps({"now_s": LslClock().now() + 7.0, "clock_id": "other-pc/boot"}).encode())
        wait_until(lambda: sync.synchronized, 5, what="the offset")
    finally:
        sync.stop()
        rep.close(linger=0)
        ctx.destroy(linger=0)
    assert sync.peers["stimulator"].offset_s == pytest.approx(7.0, abs=0.01) and "failure" not in sync.status()
