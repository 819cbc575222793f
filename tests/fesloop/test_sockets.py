"""Control sockets over real ZeroMQ on loopback: every request gets an answer."""

from __future__ import annotations

import threading

import pytest
import zmq

from fesloop.sockets import ControlClient, ControlRefused, ControlServer, control_server
from tests.conftest import free_ports


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
