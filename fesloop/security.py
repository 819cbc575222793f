"""CurveZMQ keys, the ZAP authenticator and per-request authorization of one process.

Each process has a key pair named after its role (``acquisition``, ``controller``,
``stimulator``); other parties (an operator console, a monitor) have their own, listed
in ``[security]`` with the control requests each may send. Every server socket (PUB,
REP) is a CURVE server behind a ZAP handler that admits only the listed public keys;
every client socket (SUB, REQ) is a CURVE client that knows the public key of the
process it connects to, so the handshake proves who is on the other end.

Who may command the stimulator: the controller binds ``command`` and the stimulator
connects to it as a CURVE client with the controller's *public* key as server key.
The handshake succeeds only if the peer holds the controller's *secret* key, and every
message after it is authenticated with the session keys, so each command frame the
stimulator reads was sent by the controller key's holder; the stimulator binds no
command input anyone else could reach. Control requests (REP) carry the client's key
as the per-message ``User-Id`` (set by ZAP), checked against the allowed requests.

Denials are logged and counted: ZAP rejections of unknown keys, handshakes that
fail for any reason (NULL clients, garbage bytes, a peer with the wrong server key),
and allowed keys sending requests they may not send.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from fesloop.config import SecurityConfig

PROCESS_ROLES = ("acquisition", "controller", "stimulator")
DEFAULT_CLIENTS = ("operator", "monitor")
WATCH_POLL_MS = 100
_QUIET_AFTER = 20  # log every denial up to this count, then every 100th (a flood must not flood the log)

log = logging.getLogger("fesloop.security")


class SecurityError(RuntimeError):
    """Keys missing, unreadable or too widely readable; the message names the file."""


def generate_keys(directory: Path, names: tuple[str, ...] = PROCESS_ROLES + DEFAULT_CLIENTS) -> list[Path]:
    """Create ``NAME.key`` (public, mode 0644) and ``NAME.key_secret`` (mode 0600) for each name
    in ``directory`` (made mode 0700); never overwrite, never into a directory others may write."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _refuse_writable_by_others(directory, "key directory")
    existing = [directory / f"{n}{ext}" for n in names for ext in (".key", ".key_secret")]
    clash = [str(p) for p in existing if p.exists()]
    if clash:
        raise SecurityError(f"refusing to overwrite existing keys: {', '.join(clash)}")
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        for name in names:
            public, secret = zmq.auth.create_certificates(directory, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
    finally:
        os.umask(old_umask)
    return existing


def _refuse_writable_by_others(path: Path, what: str) -> None:
    """The key files are the allow-list: whoever may write one, or the directory holding
    them, may list a key of their own (and get the operator's rights). So may its owner,
    if that is another account (the mode bits do not stop an owner)."""
    status = path.stat()
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o022:
        raise SecurityError(f"{what} {path} is writable by group or others (mode {mode:04o}): chmod go-w {path}")
    _refuse_owned_by_others(path, status, what)


def _refuse_owned_by_others(path: Path, status: os.stat_result, what: str) -> None:
    """``path`` must belong to this process's user or to root (POSIX; Windows has no owner ids here)."""
    if hasattr(os, "geteuid") and status.st_uid not in (os.geteuid(), 0):
        raise SecurityError(
            f"{what} {path} belongs to uid {status.st_uid}, not to this user (uid {os.geteuid()}) or root: "
            "its owner could list a key of their own"
        )


def _refuse_replaceable_directory(directory: Path) -> None:
    """No folder above the key directory may let another account swap it (as OpenSSH's StrictModes):
    each belongs to this user or root, and is not writable by others unless sticky (/tmp)."""
    for parent in directory.resolve().parents:
        status = parent.stat()
        _refuse_owned_by_others(parent, status, "folder")
        if stat.S_IMODE(status.st_mode) & 0o022 and not status.st_mode & stat.S_ISVTX:
            raise SecurityError(f"folder {parent} above the keys is writable by group or others: chmod go-w {parent}")


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"key file {path} not found (make keys with `fesloop keys generate DIR`)")
    if secret and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise SecurityError(f"secret key file {path} is readable by others: chmod 600 {path}")
    _refuse_writable_by_others(path, "key file")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"key file {path}: {exc}") from None


@dataclass
class SecurityCounters:
    """Denials since start, reported in status."""

    denied_keys: int = 0  # ZAP: CURVE handshake with a key not listed
    failed_handshakes: int = 0  # any connection that never completed the handshake
    unauthorized_requests: int = 0  # a listed key sending a control request it may not send
    peers_lost: int = 0  # an authenticated connection closed (peer gone, or heartbeat timeout)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, what: str) -> None:
        with self.lock:
            count = getattr(self, name) + 1
            setattr(self, name, count)
        if count <= _QUIET_AFTER or count % 100 == 0:
            log.warning("%s [%s #%d]", what, name, count)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {
                "denied_keys": self.denied_keys,
                "failed_handshakes": self.failed_handshakes,
                "unauthorized_requests": self.unauthorized_requests,
                "peers_lost": self.peers_lost,
            }


@dataclass
class _Connections:
    """The connections of one watched socket, from its monitor events.

    Open and close events carry the connection's fd; handshake outcomes carry none, so
    an outcome is given to the oldest connection still waiting for one. Connections
    whose handshakes overlap may swap categories; every one is still counted once.
    """

    label: str
    waiting: list[int] = field(default_factory=list)
    authenticated: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)

    def on_event(self, event: int, value: int, counters: SecurityCounters) -> None:
        if event in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
            self.waiting.append(value)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.waiting:
                self.authenticated.add(self.waiting.pop(0))
        elif event in (
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        ):
            if self.waiting:
                self.refused.add(self.waiting.pop(0))
            counters.add("failed_handshakes", f"DENIED {self.label}: handshake failed ({zmq.Event(event).name}, {value})")
        elif event == zmq.EVENT_DISCONNECTED:
            if value in self.waiting:  # closed before any outcome: garbage, or a peer that gave up
                self.waiting.remove(value)
                counters.add("failed_handshakes", f"DENIED {self.label}: connection closed without authenticating")
            elif value in self.authenticated:
                self.authenticated.discard(value)
                counters.add("peers_lost", f"{self.label}: authenticated peer gone")
            else:
                self.refused.discard(value)


class Security:
    """One process's keys, ZAP handler, handshake watcher and request permissions."""

    def __init__(self, config: SecurityConfig, role: str) -> None:
        keys_dir = Path(config.keys_dir)
        self.role = role
        self.public, secret = _load(keys_dir / f"{role}.key_secret", secret=True)
        assert secret is not None
        self.secret = secret
        _refuse_writable_by_others(keys_dir, "key directory")
        _refuse_replaceable_directory(keys_dir)
        names = [*PROCESS_ROLES, *(c.key for c in config.clients)]
        self.public_keys = {name: _load(keys_dir / f"{name}.key", secret=False)[0] for name in names}
        self._names_by_key = {key.decode(): name for name, key in self.public_keys.items()}
        self._control = {c.key: frozenset(c.control) for c in config.clients}
        self.counters = SecurityCounters()
        self._auth: ThreadAuthenticator | None = None
        self._monitors: queue.Queue[tuple[str, zmq.Socket]] = queue.Queue()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def for_role(cls, config: SecurityConfig, role: str) -> Security | None:
        """The role's security, or None when no keys are configured (loopback only)."""
        return cls(config, role) if config.keys_dir else None

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler and the handshake watcher; before any server socket binds."""
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("zmq.auth"))
        self._auth.start()
        self._watcher = threading.Thread(target=self._watch, name="fesloop-handshakes", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop both threads (before the context is destroyed)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(2)
        if self._auth is not None:
            self._auth.stop()

    # -- sockets -------------------------------------------------------------------

    def secure_server(self, sock: zmq.Socket, domain: str) -> None:
        """CURVE server admitting only the listed keys (ZAP domain ``domain``, used in logs).

        ZAP enforced: with no ZAP handler answering (stopped, or never started), libzmq
        otherwise completes the handshake with any key that knows the server's public one.
        """
        if self._auth is None:
            raise SecurityError("Security.start(ctx) must run before a server socket is made")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = domain.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        self._auth.configure_curve_callback(domain, self)
        self._watch_socket(domain, sock)

    def secure_client(self, sock: zmq.Socket, server_role: str, watch: bool = True) -> None:
        """CURVE client that only completes a handshake with ``server_role``'s key holder."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.public_keys[server_role]
        if watch:
            self._watch_socket(f"{self.role} -> {server_role}", sock)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a CURVE client only if its public key is listed."""
        if key.decode() in self._names_by_key:
            return True
        self.counters.add("denied_keys", f"DENIED {domain}: unknown CURVE key {key.decode()}")
        return False

    # -- requests ------------------------------------------------------------------

    def may(self, user_id: str, cmd: str) -> bool:
        """Whether the key ``user_id`` (z85, from ZAP) may send control request ``cmd``; counts a no."""
        name = self._names_by_key.get(user_id, "")
        if cmd in self._control.get(name, frozenset()):
            return True
        self.counters.add("unauthorized_requests", f"DENIED {self.role}: key {name or user_id!r} may not send {cmd!r}")
        return False

    def key_name(self, user_id: str) -> str:
        return self._names_by_key.get(user_id, user_id)

    # -- handshake watch -----------------------------------------------------------

    def _watch_socket(self, label: str, sock: zmq.Socket) -> None:
        events = (
            zmq.EVENT_ACCEPTED
            | zmq.EVENT_CONNECTED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_DISCONNECTED
        )
        self._monitors.put((label, sock.get_monitor_socket(events)))

    def _watch(self) -> None:
        """Count connections that never authenticate, and authenticated peers lost."""
        poller = zmq.Poller()
        watched: dict[zmq.Socket, _Connections] = {}
        while not self._stop.is_set():
            while not self._monitors.empty():
                label, monitor = self._monitors.get()
                watched[monitor] = _Connections(label)
                poller.register(monitor, zmq.POLLIN)
            for monitor, _ in poller.poll(WATCH_POLL_MS):
                while monitor.poll(0):
                    event = recv_monitor_message(monitor)
                    watched[monitor].on_event(event["event"], event["value"], self.counters)
        for monitor in watched:
            monitor.close(linger=0)

    def status(self) -> dict[str, int]:
        return self.counters.as_dict()
