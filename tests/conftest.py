"""Shared test fixtures: machine-scope LSL, fresh loopback ports, real processes.

Every LSL use in the tests stays on this machine: ``LSLAPICFG`` points at a
machine-scope config (inherited by every process a test starts), set before any
pylsl call.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq

from fesloop.clock import LslClock
from fesloop.clocksync import clock_reply
from fesloop.lsl import MACHINE_SCOPE_CONFIG
from fesloop.security import Security
from fesloop.sockets import ControlServer, control_server

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

_lsl_cfg = Path(tempfile.gettempdir()) / f"fesloop-tests-lsl-{os.getpid()}.cfg"
_lsl_cfg.write_text(MACHINE_SCOPE_CONFIG)
os.environ["LSLAPICFG"] = str(_lsl_cfg)


def free_ports(n: int) -> list[int]:
    """Ports free on loopback right now (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def config_with_fresh_ports(text: str) -> str:
    """Rewrite every tcp://127.0.0.1:PORT in a config to a distinct free port."""
    ports = iter(free_ports(len(re.findall(r"127\.0\.0\.1:\d+", text))))
    return re.sub(r"127\.0\.0\.1:\d+", lambda _m: f"127.0.0.1:{next(ports)}", text)


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a config (a configs/ file, optionally edited) with fresh ports; returns its path."""

    def write(base: str = "demo.toml", replace: dict[str, str] | None = None, name: str = "test.toml") -> Path:
        text = (CONFIGS / base).read_text()
        for old, new in (replace or {}).items():
            assert old in text, f"{old!r} not in {base}"
            text = text.replace(old, new)
        path = tmp_path / name
        path.write_text(config_with_fresh_ports(text))
        return path

    return write


def long_contraction(start_s: float = 0.5, arm_at_start: bool = True) -> dict[str, str]:
    """Edits to demo.toml: the first muscle contracts at level 0.7 for 100 s from ``start_s``.

    For tests that need the loop stimulating on demand; without ``arm_at_start`` the
    stimulator waits for an explicit arm.
    """
    edits = {
        "start_s = 2.0\nduration_s = 2.0\nlevel = 0.6": f"start_s = {start_s}\nduration_s = 100.0\nlevel = 0.7",
        "schedule_period_s = 8.0": "schedule_period_s = 200.0",
    }
    if not arm_at_start:
        edits["arm_at_start = true"] = "arm_at_start = false"
    return edits


class Processes:
    """Real fesloop processes started by a test; all killed at teardown, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def start(self, *args: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``python -m fesloop ARGS``, logging to ``name``.log; ``env`` adds to the environment."""
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "fesloop", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.started.append(process)
        return process

    def start_loop(self, path: Path, env: dict[str, dict[str, str]] | None = None) -> dict[str, int]:
        """The three processes of the loop on one config, stimulator first; their pids by role.

        ``env`` adds environment variables per role.
        """
        env = env or {}
        roles = ("stimulator", "controller", "acquisition")
        return {role: self.start(role, str(path), name=role, env=env.get(role)).pid for role in roles}

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.cleanup()


@contextmanager
def fesloop_cli(*args: str) -> Iterator[subprocess.Popen]:
    """``python -m fesloop ARGS``, stdout and stderr piped as text; killed on the way out if it still runs."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fesloop", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)


def completed(process: subprocess.Popen, timeout_s: float) -> subprocess.CompletedProcess:
    """Wait for ``process`` (of :func:`fesloop_cli`) to end; its exit code and output."""
    stdout, stderr = process.communicate(timeout=timeout_s)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until truthy; fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def clock_peer(
    endpoint: str, security: Security | None = None, shift_s: float = 0.0, host: str | None = None
) -> Iterator[None]:
    """Answer ``clock`` control requests on ``endpoint`` from a thread, as a peer process on this host would.

    For tests that play one of the loop's processes themselves (e.g. the controller
    feeding a real stimulator, which measures the acquisition's clock before it trusts
    EMG ages). With ``security`` (that process's keys) it is a CURVE server. With
    ``host``, a peer on another host whose clock reads ``shift_s`` ahead of this one.
    """
    ctx = zmq.Context()
    if security is not None:
        security.start(ctx)
    server = ControlServer(control_server(ctx, endpoint, security), security=security)
    if host is None:
        server.handlers["clock"] = lambda _request: clock_reply(LslClock())
    else:
        server.handlers["clock"] = lambda _request: {"now_s": LslClock().now() + shift_s, "clock_id": host}
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if server.sock.poll(50):
                server.serve_pending()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)
        if security is not None:
            security.stop()
        ctx.destroy(linger=0)
