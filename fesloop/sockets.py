"""ZeroMQ socket helpers: LINGER=0, small high-water marks, CurveZMQ, poller-based receive.

Stream sockets are PUB/SUB carrying ``[topic, payload]`` frames from
:mod:`fesloop.protocol`. Control is REQ/REP with JSON objects: a request
``{"cmd": "arm"}`` gets ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.

With a :class:`~fesloop.security.Security`, servers (PUB, REP) are CURVE servers behind
ZAP and clients (SUB, REQ) are CURVE clients of a named process; without one, every
endpoint must be loopback or ipc://.

Links: every server publishes ``status`` at 5 Hz, and every SUB (a :class:`Link`)
subscribes to it besides its data topics, as the heartbeat. A link silent for
``endpoints.link_timeout_ms`` disconnects and connects again: after a network
outage both ends of a TCP connection may stay "established" with nothing flowing
(a half-open connection that TCP notices only after minutes), and without a new
connection the stream would never come back. Freshness of the data itself is each
process's business (command deadline, EMG staleness): those close the gates within
their own bounds, long before a link is rebuilt.

No ZMTP heartbeats: with them (100/300 ms, on every socket or on bound sockets only)
the controller, frozen by SIGSTOP and resumed, aborted inside libzmq 4.3.5 in about
half the runs (``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``).
This is libzmq's known bug: a heartbeat timeout on a connection whose input is
stopped by backpressure (a full receive queue, as in a frozen process) errors the
engine, and the next read asserts (zeromq/libzmq#4364, #3937, #4767; fix proposed in
PR #4830, not released). The application heartbeat above does the same job.
"""

from __future__ import annotations

import json
import logging
import math
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
    if parsed.scheme == "ipc" and parsed.netloc + parsed.path:
        return
    try:
        port = parsed.port
    except ValueError:  # not a number, or beyond 0-65535
        port = None
    if parsed.scheme != "tcp" or not parsed.hostname or not port:
        raise EndpointError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT (port 1-65535) or ipc://PATH")
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
    received: int = 0  # data messages (heartbeats counted apart)
    heartbeats: int = 0
    rejected: int = 0
    dropped: int = 0  # data messages that never came: gaps in their sender's sequence numbers
    last_error: str = ""
    _last_seq: dict[protocol.Kind, int] = field(default_factory=dict, repr=False)
    _sender_pid: object = field(default=None, repr=False)

    def count_sequence(self, kind: protocol.Kind, seq: int) -> None:
        """A gap in a sender's sequence (per kind) is that many messages dropped on the way
        (a high-water mark, a lossy link). A number at or below the last is a replay or
        reordering and counts nothing (whoever acts on messages judges those)."""
        last = self._last_seq.get(kind)
        if last is None or seq > last:
            if last is not None:
                self.dropped += seq - last - 1
            self._last_seq[kind] = seq

    def count_heartbeat(self, status: protocol.Status) -> None:
        """A sender with a new pid restarted: its sequences start again."""
        pid = status.fields.get("pid")
        if pid != self._sender_pid:
            self._sender_pid = pid
            self._last_seq.clear()


@dataclass
class Sequencer:
    """Sequence numbers for one publisher, starting at 1."""

    seq: int = 0

    def next(self) -> int:
        self.seq += 1
        return self.seq


def receive_message(sock: zmq.Socket) -> list[memoryview]:
    """Every frame of the next message without blocking (``zmq.Again`` if none is waiting).

    The frames are views of libzmq's buffers: the payload is not copied. ``Frame.more``
    says whether another frame follows.
    """
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    frames = [frame.buffer]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        frames.append(frame.buffer)
    return frames


def drain(
    sock: zmq.Socket, counters: StreamCounters, heartbeat: protocol.Kind | None = None
) -> list[protocol.Message]:
    """Read every message waiting on ``sock`` without blocking; drop malformed ones.

    Messages of kind ``heartbeat`` are counted in ``counters.heartbeats`` and not returned.
    """
    messages: list[protocol.Message] = []
    while True:
        try:
            frames = receive_message(sock)
        except zmq.Again:
            return messages
        try:
            message = protocol.decode(frames)
        except protocol.MalformedMessage as exc:
            counters.received += 1
            counters.rejected += 1
            counters.last_error = exc.reason
            continue
        if message.header.kind is heartbeat:
            counters.heartbeats += 1
            counters.count_heartbeat(message.body)
        else:
            counters.received += 1
            counters.count_sequence(message.header.kind, message.header.seq)
            messages.append(message)


class Link:
    """A SUB socket to one server that reconnects when the server falls silent (see module doc)."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        topics: list[bytes],
        timeout_s: float,
        log: logging.Logger,
        hwm: int = STREAM_HWM,
        security: Security | None = None,
        server: str = "",
    ) -> None:
        status = protocol.TOPICS[protocol.Kind.STATUS]
        self.sock = subscriber(ctx, endpoint, [*topics, status], hwm, security, server)
        self.endpoint = endpoint
        self.server = server or endpoint
        self.timeout_s = timeout_s
        self.counters = StreamCounters()
        self.relinks = 0
        self._log = log
        self._heard_s: float | None = None  # last message, else the first check: a silence counts from there
        self.last_heard_s: float | None = None  # last message (None before the first)
        self._relinked_s = -math.inf  # last reconnect
        self._ever_heard = False
        self._silent_relinks = 0  # reconnects since the server was last heard

    def drain(self, now_s: float) -> list[protocol.Message]:
        """The data messages waiting (the server's status heartbeats are counted, not returned).

        Only a message that decodes is the server heard: malformed ones (counted, dropped) could
        come from anything on the port and keep a dead link looking alive.
        """
        before = self._valid()
        messages = drain(self.sock, self.counters, heartbeat=protocol.Kind.STATUS)
        if self._valid() != before:
            self._heard_s, self._ever_heard, self._silent_relinks = now_s, True, 0
            self.last_heard_s = now_s
        return messages

    def _valid(self) -> int:
        return self.counters.received - self.counters.rejected + self.counters.heartbeats

    def keep(self, now_s: float) -> None:
        """Reconnect if nothing came for ``timeout_s``.

        Logged once the server had been heard, on the 1st, 2nd, 4th, 8th ... reconnect of a
        silence, so a long outage does not flood the log.
        """
        if self._heard_s is None:
            self._heard_s = now_s
        if now_s - max(self._heard_s, self._relinked_s) <= self.timeout_s:
            return
        self._silent_relinks += 1
        if self._ever_heard and self._silent_relinks & (self._silent_relinks - 1) == 0:
            self._log.warning(
                "nothing from %s (%s) for %.1f s: reconnecting (%d in this silence)",
                self.server, self.endpoint, now_s - self._heard_s, self._silent_relinks,
            )
        self.sock.disconnect(self.endpoint)
        self.sock.connect(self.endpoint)
        self.relinks += 1
        self._relinked_s = now_s

    def status(self) -> dict[str, Any]:
        """Counters, and why the last malformed message was rejected (a peer speaking another
        protocol version shows only here: its messages do not make it heard)."""
        counters = self.counters
        return {"heartbeats": counters.heartbeats, "relinks": self.relinks, "dropped": counters.dropped,
                "rejected": counters.rejected, "last_error": counters.last_error}


OPEN_REQUESTS = frozenset({"clock"})  # read-only, harmless: any admitted key may send them
# Requests answered per serve_pending call: the rest wait for the next call, so requests sent
# back to back cannot hold the caller's loop (the stimulator checks its deadline and gates in it).
REQUESTS_PER_CALL = 4


class BadRequest(ValueError):
    """A control request that is not one frame holding a JSON object with a known ``cmd``."""


@dataclass
class ControlServer:
    """Answers JSON control requests on a REP socket, one handler per command.

    A bad request (see :class:`BadRequest`) is counted in ``rejected``, answered with
    the reason and never acted on. With ``security``, each request is authorized by the
    key that sent it (the per-message ``User-Id`` ZAP set); a refusal is counted and
    logged there.
    """

    sock: zmq.Socket
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    rejected: int = 0
    security: Security | None = None

    def serve_pending(self) -> None:
        """Answer the requests waiting, at most ``REQUESTS_PER_CALL``, without blocking.

        REP takes requests from its clients in turn, so during one client's flood
        another client's request (an operator's stop) is among the next few answered.
        """
        for _ in range(REQUESTS_PER_CALL):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._serve(frames)

    def _serve(self, frames: list[zmq.Frame]) -> None:
        """Answer one request (every frame of it is read: REP must reply before the next)."""
        user_id = frames[0].get("User-Id") if self.security is not None else ""
        try:
            answer = self._answer(frames, user_id)
        except Exception as exc:
            # Reply first so the REP socket is not left waiting, then let the process handle it.
            self.sock.send(json.dumps({"ok": False, "error": f"internal error: {exc!r}"}).encode())
            raise
        self.sock.send(json.dumps(answer).encode())

    def _answer(self, frames: list[zmq.Frame], user_id: str) -> dict[str, Any]:
        try:
            request = self._parse(frames)
        except BadRequest as exc:
            self.rejected += 1
            return {"ok": False, "error": f"bad request ({exc}); commands: {sorted(self.handlers)}"}
        cmd = request["cmd"]
        if self.security is not None and cmd not in OPEN_REQUESTS and not self.security.may(user_id, cmd):
            return {"ok": False, "error": f"key {self.security.key_name(user_id)!r} may not send {cmd!r}"}
        try:
            return {"ok": True, **self.handlers[cmd](request)}
        except ControlRefused as exc:
            return {"ok": False, "error": str(exc)}

    def _parse(self, frames: list[zmq.Frame]) -> dict[str, Any]:
        """The request: one frame, a JSON object whose ``cmd`` has a handler (else BadRequest)."""
        if len(frames) != 1:
            raise BadRequest(f"{len(frames)} frames, expected 1")
        try:
            request = json.loads(frames[0].bytes)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise BadRequest(f"not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise BadRequest("not a JSON object")
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            raise BadRequest("no cmd string")
        if cmd not in self.handlers:
            raise BadRequest(f"unknown cmd {cmd[:40]!r}")
        return request


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
        """The reply to ``cmd``; ControlTimeout if none came within ``timeout_s``.

        After a timeout the server may still carry the request out (it was sent, and a busy
        process answers later): ask ``status`` before taking an ``arm`` as failed.
        """
        self._sock.send(json.dumps({"cmd": cmd, **args}).encode())
        if self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return json.loads(self._sock.recv())
        self._sock.close(linger=0)
        self._sock = self._connect()
        raise ControlTimeout(
            f"no reply to {cmd!r} from {self.endpoint} within {timeout_s} s (it may still be carried out: ask status)"
        )

    def close(self) -> None:
        self._sock.close(linger=0)
