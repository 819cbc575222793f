"""Control sockets over real ZeroMQ on loopback: every request gets an answer."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
import zmq

from fesloop import protocol
from fesloop.sockets import ControlClient, ControlRefused, ControlServer, Link, Sequencer, control_server, publisher
from tests.conftest import free_ports
from tests.netfaults import OutageProxy


@pytest.fixture
def server_and_client():
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    server = ControlServer(control_server(ctx, endpoint))
    client = ControlClient(ctx, endpoint)
    try:
        yield server, client
    finally:
        client.close()
        ctx.destroy(linger=0)


def _serve_once(server: ControlServer) -> tuple[list[BaseException], threading.Thread]:
    errors: list[BaseException] = []

    def run() -> None:
        server.sock.poll(5000)
        try:
            server.serve_pending()
        except Exception as exc:  # what the process loop would see
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return errors, thread


@pytest.mark.timeout(20)
def test_a_failing_handler_still_answers_and_the_error_reaches_the_process(server_and_client) -> None:
    server, client = server_and_client

    def broken(_request: dict) -> dict:
        raise ZeroDivisionError("boom")

    server.handlers["status"] = lambda _r: {"state": "ARMED"}
    server.handlers["arm"] = broken
    errors, thread = _serve_once(server)
    reply = client.request("arm", timeout_s=5.0)
    thread.join(5)
    assert reply["ok"] is False and "ZeroDivisionError" in reply["error"]
    assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)
    errors, thread = _serve_once(server)
    assert client.request("status", timeout_s=5.0) == {"ok": True, "state": "ARMED"}
    thread.join(5)


@pytest.mark.timeout(20)
def test_refusals_and_bad_requests_are_answered(server_and_client) -> None:
    server, client = server_and_client

    def refuse(_request: dict) -> dict:
        raise ControlRefused("no fresh command")

    server.handlers["arm"] = refuse
    for cmd, expected in (("arm", "no fresh command"), ("fly", "bad request")):
        errors, thread = _serve_once(server)
        reply = client.request(cmd, timeout_s=5.0)
        thread.join(5)
        assert reply["ok"] is False and expected in reply["error"] and not errors
    assert server.rejected == 1


DEEP = 5000  # beyond the recursion limit of Python's JSON parser, within CONTROL_MAX_BYTES
MALFORMED = [
    b"[" * 60000,
    b'{"cmd": "stop", "reason": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"cmd": "stop", "reason": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
    b"\xff\xfe{",
    b"stop",
    b'["stop"]',
    b'"stop"',
    b'{"cmd": ["stop"]}',
    b'{"cmd": null}',
    b'{"command": "stop"}',
]


def _raw_request(server: ControlServer, frames: list[bytes]) -> tuple[dict, list[BaseException]]:
    """Send ``frames`` as one request on a raw REQ; the reply and what serving it raised."""
    sock = server.sock.context.socket(zmq.REQ)
    sock.linger = 0
    sock.connect(server.sock.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        errors, thread = _serve_once(server)
        sock.send_multipart(frames)
        thread.join(5)
        assert sock.poll(5000), f"no reply to {frames[0][:30]!r}..."
        return json.loads(sock.recv()), errors
    finally:
        sock.close()


@pytest.mark.timeout(30)
def test_malformed_requests_are_counted_answered_and_never_acted_on(server_and_client) -> None:
    """Nested too deeply to parse, not JSON, not an object, no cmd string: each one a bad request."""
    server, _ = server_and_client
    acted: list[dict] = []
    server.handlers["stop"] = lambda request: acted.append(request) or {}
    server.handlers["status"] = lambda _r: {"state": "ARMED"}
    for body in MALFORMED:
        reply, errors = _raw_request(server, [body])
        assert not errors, f"{body[:30]!r}...: {errors}"
        assert reply["ok"] is False and reply["error"].startswith("bad request ("), reply
    assert server.rejected == len(MALFORMED) and acted == []
    assert _raw_request(server, [b'{"cmd": "status"}']) == ({"ok": True, "state": "ARMED"}, [])


@pytest.mark.timeout(30)
def test_a_request_of_several_frames_is_a_bad_request_and_never_acted_on(server_and_client) -> None:
    """Acting on the first frame and then failing to reply (REP still holds the rest) was the old way."""
    server, _ = server_and_client
    acted: list[dict] = []
    server.handlers["stop"] = lambda request: acted.append(request) or {}
    for frames in ([b'{"cmd": "stop"}', b"extra"], [b'{"cmd": "stop"}'] * 3):
        reply, errors = _raw_request(server, frames)
        assert not errors
        assert reply == {"ok": False, "error": f"bad request ({len(frames)} frames, expected 1); commands: ['stop']"}
    assert server.rejected == 2 and acted == []
    assert _raw_request(server, [b'{"cmd": "stop"}']) == ({"ok": True}, [])
    assert len(acted) == 1


def test_a_link_cut_by_an_outage_reconnects_after_its_timeout_and_the_stream_comes_back(caplog) -> None:
    """Through a relay that turns every open connection into a black hole: the link hears
    nothing, reconnects after timeout_s (logged, counted), and once the network is back the
    new connection carries the stream. Status messages count as heartbeats, not data."""
    ctx = zmq.Context()
    upstream, = free_ports(1)
    pub = publisher(ctx, f"tcp://127.0.0.1:{upstream}")
    proxy = OutageProxy(upstream)
    log = logging.getLogger("test-link")
    caplog.set_level(logging.WARNING, logger="test-link")
    link = Link(ctx, f"tcp://127.0.0.1:{proxy.port}", [b"pulses"], 0.5, log, server="stimulator")
    seq = Sequencer()

    def publish_for(seconds: float) -> list[protocol.Message]:
        """Status at 5 Hz and a pulse every 20 ms; everything the link handed over."""
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            now = time.monotonic()
            pub.send_multipart(protocol.encode(seq.next(), now, protocol.Pulses(
                np.zeros(1, np.uint16), np.array([now]), np.ones(1, np.float32), np.ones(1, np.float32))))
            if seq.seq % 10 == 0:
                pub.send_multipart(protocol.encode(seq.next(), now, protocol.Status({"state": "RUNNING"})))
            time.sleep(0.02)
            got += link.drain(time.monotonic())
            link.keep(time.monotonic())
        return got

    try:
        before = publish_for(1.0)
        assert before and all(isinstance(m.body, protocol.Pulses) for m in before)
        assert link.counters.heartbeats >= 3 and link.relinks == 0
        proxy.cut()
        during = publish_for(1.2)
        assert during == [] and link.relinks >= 1  # reconnected after 0.5 s of silence (refused while cut)
        proxy.heal()
        after = publish_for(1.5)
        assert len(after) > 20  # the new connection carries the stream
        logged = [r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage()]
        assert logged and "nothing from stimulator" in logged[0] and "(1 in this silence)" in logged[0]
        assert len(logged) <= link.relinks  # the 1st, 2nd, 4th ... reconnect of a silence
    finally:
        proxy.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(20)
def test_a_link_counts_messages_missing_from_each_senders_sequence_as_dropped() -> None:
    """Per kind, a gap in the sequence numbers is that many messages dropped; a replayed or
    reordered number counts nothing; a sender with a new pid (from its heartbeat) starts over."""
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    pub = publisher(ctx, endpoint)
    link = Link(ctx, endpoint, [b"pulses", b"crank"], 5.0, logging.getLogger("test-link"))

    def pulses(seq: int) -> list[bytes]:
        return protocol.encode(seq, 0.0, protocol.Pulses(
            np.zeros(1, np.uint16), np.zeros(1), np.ones(1, np.float32), np.ones(1, np.float32)))

    def crank(seq: int) -> list[bytes]:
        return protocol.encode(seq, 0.0, protocol.Crank(
            np.zeros(1), np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32)))

    def heartbeat(pid: int) -> list[bytes]:
        return protocol.encode(1, 0.0, protocol.Status({"pid": pid}))

    def deliver(messages: list[list[bytes]]) -> None:
        received = link.counters.received + link.counters.heartbeats
        for frames in messages:
            pub.send_multipart(frames)
        deadline = time.monotonic() + 5
        while link.counters.received + link.counters.heartbeats < received + len(messages):
            assert time.monotonic() < deadline, "messages lost on loopback"
            link.sock.poll(100)
            link.drain(time.monotonic())

    try:
        deadline = time.monotonic() + 5
        while link.counters.heartbeats == 0:  # until the subscription is through
            assert time.monotonic() < deadline
            pub.send_multipart(heartbeat(100))
            link.sock.poll(50)
            link.drain(time.monotonic())
        deliver([pulses(1), pulses(2), pulses(3), pulses(6), pulses(7)])
        assert link.counters.dropped == 2  # 4 and 5
        deliver([pulses(3), pulses(7), crank(1), crank(2), crank(4)])
        assert link.counters.dropped == 3  # replays count nothing; crank 3 is missing
        deliver([heartbeat(100), pulses(8)])
        assert link.counters.dropped == 3
        deliver([heartbeat(200), pulses(1), pulses(2), pulses(5), crank(1)])  # the sender restarted
        assert link.counters.dropped == 5 and link.status()["dropped"] == 5
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(20)
def test_malformed_messages_do_not_make_a_link_heard() -> None:
    """Frames that do not decode (counted, dropped) came from anything on the port: they kept a silent
    stimulator "heard", so the controller's NO_PULSE_REPORTS gate stayed open on them."""
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    pub = publisher(ctx, endpoint)
    link = Link(ctx, endpoint, [b"pulses"], 5.0, logging.getLogger("test-link"))
    status = protocol.encode(1, 0.0, protocol.Status({"pid": 1}))
    try:
        deadline = time.monotonic() + 5
        while link.counters.rejected < 20:
            assert time.monotonic() < deadline, "no malformed frame came through"
            pub.send_multipart([status[0], b"\x00" + status[1][1:]])  # the status topic, its magic broken
            link.sock.poll(20)
            link.drain(time.monotonic())
        assert link.last_heard_s is None and link.counters.heartbeats == 0
        assert link.status()["rejected"] >= 20 and "magic" in link.status()["last_error"]
        while link.counters.heartbeats == 0:
            assert time.monotonic() < deadline, "no status came through"
            pub.send_multipart(status)
            link.sock.poll(20)
            link.drain(time.monotonic())
        assert link.last_heard_s is not None
    finally:
        ctx.destroy(linger=0)
