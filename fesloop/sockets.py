"""ZeroMQ socket helpers: LINGER=0, small high-water marks, CurveZMQ, poller-based receive.

Stream sockets are PUB/SUB carrying ``[topic, payload]`` frames from
:mod:`fesloop.protocol`. Control is REQ/REP with JSON objects: a request
``{"cmd": "arm"}`` gets ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.

With a :class:`~fesloop.security.Security`, servers (PUB, REP) are CURVE servers behind
ZAP and clients (SUB, REQ) are CURVE clients of a named process; without one, every
endpoint must be loopback or ipc://.

No ZMTP heartbeats: with them (100/300 ms, on every socket or on bound sockets only)
the controller, frozen by SIGSTOP and resumed, aborted inside libzmq 4.3.5 in about
half the runs (``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``, a
heartbeat timeout on a connection that already had an I/O error); the stimulator
then never heard it again. A dead peer is noticed by application freshness instead:
the stimulator's command deadline, the controller's EMG staleness, and every
process's 5 Hz status.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import zmq

from fesloop import protocol

if TYPE_CHECKING:
    from fesloop.security import Security

STREAM_HWM = 100
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CONTROL_MAX_BYTES = 64 * 1024

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class EndpointError(ValueError):
    """An endpoint is malformed or would bind beyond loopback without authentication."""


def check_bind_endpoint(endpoint: str, authenticated: bool = False) -> None:
    """Refuse a malformed endpoint, and anything but loopback or ipc:// without CurveZMQ keys.

    Checked for connects too: without keys, a remote peer could be anyone.
    """
    parsed = urlparse(endpoint)
    if parsed.scheme == "ipc":
        return
    if parsed.scheme != "tcp" or not parsed.hostname or parsed.port is None:
        raise EndpointError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH")
    if parsed.hostname not in LOOPBACK_HOSTS and not authenticated:
        raise EndpointError(
            f"endpoint {endpoint!r}: beyond loopback only with CurveZMQ keys "
            "(set [security] keys_dir, see `fesloop keys generate`); or use 127.0.0.1"
        )


def _base(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


def _server(ctx: zmq.Context, kind: int, endpoint: str, security: Security | None) -> zmq.Socket:
    check_bind_endpoint(endpoint, security is not None)
    sock = _base(ctx, kind)
    if security is not None:
        security.secure_server(sock, f"{security.role} {endpoint}")
    return sock


def publisher(ctx: zmq.Context, endpoint: str, security: Security | None = None) -> zmq.Socket:
    """Bound PUB; with ``security`` a CURVE server admitting only listed keys."""
    sock = _server(ctx, zmq.PUB, endpoint, security)
    sock.setsockopt(zmq.SNDHWM, STREAM_HWM)
    sock.bind(endpoint)
    return sock


def subscriber(
    ctx: zmq.Context,
    endpoint: str,
    topics: list[bytes],
    hwm: int = STREAM_HWM,
    security: Security | None = None,
    server: str = "",
) -> zmq.Socket:
    """Connected SUB; with ``security`` it completes a handshake only with ``server``'s key."""
    check_bind_endpoint(endpoint, security is not None)
    sock = _base(ctx, zmq.SUB)
    if security is not None:
        security.secure_client(sock, server)
    sock.setsockopt(zmq.RCVHWM, hwm)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    return sock


def control_server(ctx: zmq.Context, endpoint: str, security: Security | None = None) -> zmq.Socket:
    """Bound REP for control requests; with ``security`` a CURVE server (see ControlServer)."""
    sock = _server(ctx, zmq.REP, endpoint, security)
    sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_BYTES)
    sock.bind(endpoint)
    return sock


@dataclass
class StreamCounters:
    received: int = 0
    rejected: int = 0
    last_error: str = ""


@dataclass
class Sequencer:
    """Sequence numbers for one publisher, starting at 1."""

    seq: int = 0

    def next(self) -> int:
        self.seq += 1
        return self.seq


def drain(sock: zmq.Socket, counters: StreamCounters) -> list[protocol.Message]:
    """Read every message waiting on ``sock`` without blocking; drop malformed ones."""
    messages: list[protocol.Message] = []
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return messages
        counters.received += 1
        try:
            messages.append(protocol.decode(frames))
        except protocol.MalformedMessage as exc:
            counters.rejected += 1
            counters.last_error = exc.reason


OPEN_REQUESTS = frozenset({"clock"})  # read-only, harmless: any admitted key may send them


@dataclass
class ControlServer:
    """Answers JSON control requests on a REP socket, one handler per command.

    With ``security``, each request is authorized by the key that sent it (the
    per-message ``User-Id`` ZAP set); a refusal is counted and logged there.
    """

    sock: zmq.Socket
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    rejected: int = 0
    security: Security | None = None

    def serve_pending(self) -> None:
        """Answer every request waiting, without blocking."""
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            user_id = frame.get("User-Id") if self.security is not None else ""
            try:
                answer = self._answer(frame.bytes, user_id)
            except Exception as exc:
                # Reply first so the REP socket is not left waiting, then let the process handle it.
                self.sock.send(json.dumps({"ok": False, "error": f"internal error: {exc!r}"}).encode())
                raise
            self.sock.send(json.dumps(answer).encode())

    def _answer(self, raw: bytes, user_id: str) -> dict[str, Any]:
        try:
            request = json.loads(raw)
            cmd = request["cmd"]
            handler = self.handlers[cmd]
        except (ValueError, TypeError, KeyError):
            self.rejected += 1
            return {"ok": False, "error": f"bad request; commands: {sorted(self.handlers)}"}
        if self.security is not None and cmd not in OPEN_REQUESTS and not self.security.may(user_id, cmd):
            return {"ok": False, "error": f"key {self.security.key_name(user_id)!r} may not send {cmd!r}"}
        try:
            return {"ok": True, **handler(request)}
        except ControlRefused as exc:
            return {"ok": False, "error": str(exc)}


class ControlRefused(RuntimeError):
    """A control request was understood but refused (the reason is sent back)."""


class ControlTimeout(TimeoutError):
    """A control request got no reply in time."""


class ControlClient:
    """REQ client that survives a dead server: on timeout the socket is rebuilt."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, security: Security | None = None, server: str = ""
    ) -> None:
        check_bind_endpoint(endpoint, security is not None)
        self._ctx = ctx
        self.endpoint = endpoint
        self._security = security
        self._server = server
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = _base(self._ctx, zmq.REQ)
        if self._security is not None:
            self._security.secure_client(sock, self._server, watch=False)
        sock.connect(self.endpoint)
        return sock

    def request(self, cmd: str, timeout_s: float = 1.0, **args: Any) -> dict[str, Any]:
        self._sock.send(json.dumps({"cmd": cmd, **args}).encode())
        if self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return json.loads(self._sock.recv())
        self._sock.close(linger=0)
        self._sock = self._connect()
        raise ControlTimeout(f"no reply to {cmd!r} from {self.endpoint} within {timeout_s} s")

    def close(self) -> None:
        self._sock.close(linger=0)
