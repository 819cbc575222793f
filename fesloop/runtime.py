"""What every fesloop process shares: control socket, signals, parent watch, pacing.

A process built on :class:`ProcessRuntime` answers ``status`` and ``shutdown`` on
its REP socket, stops cleanly on SIGTERM (and on SIGINT unless supervised: the
supervisor owns Ctrl+C so it can stop the stimulator first), and exits when the
supervisor that started it is gone, so no process is ever orphaned.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from fesloop import protocol
from fesloop.clock import Clock, LslClock
from fesloop.clocksync import ClockSync, clock_reply
from fesloop.config import SecurityConfig
from fesloop.security import Security
from fesloop.sockets import ControlServer, Sequencer, control_server

if TYPE_CHECKING:
    from fesloop.telemetry import Telemetry

PARENT_PID_ENV = "FESLOOP_PARENT_PID"
SESSION_ENV = "FESLOOP_SESSION"  # set by the supervisor for its children; their status carries it
# Set by `fesloop run --record`: the stimulator leaves arm_at_start to the supervisor, which arms once recording.
HOLD_AUTO_ARM_ENV = "FESLOOP_HOLD_AUTO_ARM"
STATUS_PERIOD_S = 0.2

log = logging.getLogger("fesloop")


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {name} %(levelname)s %(message)s"
    )
    return logging.getLogger(name)


class LatencyWindow:
    """The last ``capacity`` latencies (s) in a ring buffer, for p50/p99/max."""

    def __init__(self, capacity: int = 2048) -> None:
        self._values = np.zeros(capacity)
        self._count = 0

    def add(self, value_s: float) -> None:
        self._values[self._count % len(self._values)] = value_s
        self._count += 1

    def summary_ms(self) -> dict[str, float | None]:
        n = min(self._count, len(self._values))
        if n == 0:
            return {"p50": None, "p99": None, "p99.9": None, "max": None, "n": 0}
        values = self._values[:n] * 1e3
        p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
        return {
            "p50": round(float(p50), 3),
            "p99": round(float(p99), 3),
            "p99.9": round(float(p999), 3),
            "max": round(float(values.max()), 3),
            "n": n,
        }


class Pacer:
    """Absolute deadlines at a fixed period: ticks never drift, overruns are counted."""

    def __init__(self, period_s: float, start_s: float) -> None:
        self.period_s = period_s
        self.next_s = start_s + period_s
        self.overruns = 0

    def due(self, now_s: float) -> bool:
        if now_s < self.next_s:
            return False
        behind = int((now_s - self.next_s) // self.period_s)
        if behind:
            self.overruns += behind
        self.next_s += (behind + 1) * self.period_s
        return True

    def timeout_ms(self, now_s: float) -> float:
        return max(0.0, (self.next_s - now_s) * 1e3)


class ProcessRuntime:
    """Control socket, stop flag, status cadence and parent watch of one process."""

    def __init__(
        self, name: str, control_endpoint: str, clock: Clock | None = None, security: SecurityConfig | None = None
    ) -> None:
        self.name = name
        self.clock = clock or LslClock()
        self.ctx = zmq.Context()
        self.log = setup_logging(name)
        self._running = True
        self._next_parent_check_s = 0.0
        self.exit_code = 0
        # CurveZMQ keys of this process (None: loopback only); pass to every socket it makes.
        self.security = Security.for_role(security, name) if security is not None else None
        if self.security is not None:
            self.security.start(self.ctx)
        self.control = ControlServer(control_server(self.ctx, control_endpoint, self.security), security=self.security)
        self.control.handlers["status"] = lambda _request: self.status()
        self.control.handlers["shutdown"] = self._shutdown
        self.control.handlers["clock"] = lambda _request: clock_reply(self.clock)
        self.clock_sync: ClockSync | None = None
        self.status_fields: Callable[[], dict[str, Any]] = dict
        self.status_seq = Sequencer()
        self.telemetry: Telemetry | None = None  # LSL outlets; closed (final status pushed) by close()
        self._parent_pid = int(os.environ.get(PARENT_PID_ENV, "0"))
        self._status_pacer = Pacer(STATUS_PERIOD_S, self.clock.now())
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN if self._parent_pid else self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.log.info("signal %s: stopping", signal.Signals(signum).name)
        self.running = False

    def _shutdown(self, _request: dict[str, Any]) -> dict[str, Any]:
        self.running = False
        return {}

    def status(self) -> dict[str, Any]:
        security = {"security": self.security.status()} if self.security is not None else {}
        clocks = {"peer_clocks": self.clock_sync.status()} if self.clock_sync is not None else {}
        return {
            "process": self.name,
            "pid": os.getpid(),
            "session": os.environ.get(SESSION_ENV, ""),
            "time_s": self.clock.now(),
            "control_rejected": self.control.rejected,  # bad control requests, answered and dropped
            **security,
            **clocks,
            **self.status_fields(),
        }

    def sync_clocks(self, peers: dict[str, str]) -> ClockSync:
        """Start measuring the clock offsets of ``peers`` (role -> control endpoint)."""
        self.clock_sync = ClockSync(self.ctx, self.clock, peers, self.security).start()
        return self.clock_sync

    def parent_alive(self) -> bool:
        return not self._parent_pid or os.getppid() == self._parent_pid

    @property
    def running(self) -> bool:
        """False once asked to stop, or once the supervisor that started us is gone.

        The parent is checked here (at most 5 times a second), not on a path that an
        exception in the loop could skip, so a failing process still never outlives it.
        """
        now_s = time.monotonic()
        if self._running and now_s >= self._next_parent_check_s:
            self._next_parent_check_s = now_s + STATUS_PERIOD_S
            if not self.parent_alive():
                self.log.error("supervisor %d is gone: stopping", self._parent_pid)
                self._running = False
                self.exit_code = 1
        return self._running

    @running.setter
    def running(self, value: bool) -> None:
        self._running = value

    def publish_status_if_due(self, pub: zmq.Socket, now_s: float) -> bool:
        """Publish a status heartbeat at 5 Hz."""
        if not self._status_pacer.due(now_s):
            return False
        status = self.status()
        pub.send_multipart(protocol.encode(self.status_seq.next(), now_s, protocol.Status(status)))
        if self.telemetry is not None:
            self.telemetry.status(status)
        return True

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close(self.status())
        if self.clock_sync is not None:
            self.clock_sync.stop()
        if self.security is not None:
            self.security.stop()
        self.ctx.destroy(linger=0)
