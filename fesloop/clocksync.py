"""Peer clocks: put another process's timestamps on this process's clock.

Every process stamps with its host's monotonic clock (``pylsl.local_clock``). On one
host all processes share that clock; across hosts the clocks have unrelated origins,
so a receiver must know each sender's offset before it compares its timestamps with
its own (EMG age at the stimulator) or with a third process's (pulse times against EMG
sample times for blanking, in the controller and the simulated patient).

The offset is measured the way NTP and LSL's ``time_correction`` do: a ``clock``
control request sent at local t0, answered with the peer's time t_peer, received at
local t1, gives ``offset = t_peer - (t0 + t1) / 2`` within ``(t1 - t0) / 2``. The
probe with the shortest round trip in a recent window wins. A peer that answers with
this host's clock identity shares the clock: offset exactly 0.

Until a peer's offset is known, ``to_local`` returns NaN, which every caller treats
as "cannot be trusted" (gates stay closed). So it is again when the peer (on another
clock) has not answered for ``OFFSET_MAX_AGE_S``: clocks drift apart (1e-5 to 1e-4), and
an offset kept for ever would move pulse times off their artifacts. A probing thread
that fails unexpectedly forgets every offset before it ends (a frozen offset fails safe).
"""

from __future__ import annotations

import math
import socket
import threading
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from fesloop.clock import Clock
from fesloop.sockets import ControlClient, ControlTimeout

if TYPE_CHECKING:
    from fesloop.security import Security

PROBE_WINDOW = 8  # probes kept; the shortest round trip among them gives the offset
SYNC_PERIOD_S = 1.0  # between probes once synchronized (steady clocks drift ~1e-5)
RETRY_PERIOD_S = 0.1  # between probes while a peer has not answered yet
PROBE_TIMEOUT_S = 0.5
OFFSET_MAX_AGE_S = 10.0  # a peer on another clock unanswered this long: its offset is unknown again


@lru_cache(maxsize=1)
def clock_id() -> str:
    """Identity of this host's monotonic clock: host name plus boot id (Linux).

    Two processes with the same identity read the same clock (same host, same boot).
    """
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.exists() else ""
    return f"{socket.gethostname()}/{boot_id}"


def clock_reply(clock: Clock) -> dict[str, Any]:
    """The answer to a ``clock`` control request."""
    return {"now_s": clock.now(), "clock_id": clock_id()}


@dataclass(frozen=True, slots=True)
class Probe:
    """One round trip: local send time, the peer's time, local receive time."""

    sent_s: float
    peer_s: float
    received_s: float

    @property
    def rtt_s(self) -> float:
        return self.received_s - self.sent_s

    @property
    def offset_s(self) -> float:
        """Peer clock minus local clock."""
        return self.peer_s - (self.sent_s + self.received_s) / 2.0


class PeerOffset:
    """A peer clock's offset from the local one, from the best recent probe.

    Pure: no I/O. ``offset_s`` is NaN until a first probe (or a shared clock) is known.
    """

    def __init__(self, local_clock_id: str, window: int = PROBE_WINDOW) -> None:
        self._local_clock_id = local_clock_id
        self._peer_clock_id = ""
        self._probes: deque[Probe] = deque(maxlen=window)
        self.shared_clock = False
        self.offset_s = math.nan
        self.uncertainty_s = math.nan

    def add(self, probe: Probe, peer_clock_id: str) -> None:
        """Take one probe; a peer that now answers from another clock starts afresh."""
        if not (probe.rtt_s >= 0 and math.isfinite(probe.peer_s)):
            return
        if peer_clock_id != self._peer_clock_id:
            self._peer_clock_id = peer_clock_id
            self._probes.clear()
        self.shared_clock = peer_clock_id == self._local_clock_id
        if self.shared_clock:
            self.offset_s, self.uncertainty_s = 0.0, 0.0
            return
        self._probes.append(probe)
        best = min(self._probes, key=lambda p: p.rtt_s)
        self.offset_s, self.uncertainty_s = best.offset_s, best.rtt_s / 2.0

    def expire(self, now_s: float, max_age_s: float) -> None:
        """Forget the offset of a peer on another clock whose last probe was received before ``now_s - max_age_s``."""
        if self._probes and now_s - self._probes[-1].received_s > max_age_s:
            self.forget()

    def forget(self) -> None:
        """Unknown again, until the next probe."""
        self._probes.clear()
        self._peer_clock_id = ""
        self.shared_clock = False
        self.offset_s = self.uncertainty_s = math.nan

    @property
    def known(self) -> bool:
        return not math.isnan(self.offset_s)

    def to_local(self, peer_time_s: np.ndarray | float) -> np.ndarray | float:
        """Peer timestamps on the local clock (NaN while the offset is unknown)."""
        return peer_time_s - self.offset_s

    def status(self) -> dict[str, Any]:
        if not self.known:
            return {"synchronized": False}
        return {
            "synchronized": True,
            "shared_clock": self.shared_clock,
            "offset_s": round(self.offset_s, 6),
            "uncertainty_ms": round(self.uncertainty_s * 1e3, 3),
        }


class ClockSync:
    """Keeps ``PeerOffset``s of named peers fresh from a background thread.

    The thread owns its REQ sockets; the process loop only reads the offsets (a float
    replaced atomically), so the control path never waits on a probe.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        clock: Clock,
        peers: dict[str, str],
        security: Security | None = None,
        max_age_s: float = OFFSET_MAX_AGE_S,
    ) -> None:
        self._ctx = ctx
        self._clock = clock
        self._endpoints = dict(peers)
        self._security = security
        self._max_age_s = max_age_s
        self.peers = {name: PeerOffset(clock_id()) for name in peers}
        self.failure = ""  # why the probing thread ended, if it failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fesloop-clocksync", daemon=True)

    def start(self) -> ClockSync:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop probing (before the context is destroyed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(PROBE_TIMEOUT_S + 1.0)

    def to_local(self, peer: str, time_s: np.ndarray) -> np.ndarray:
        """Times stamped by ``peer`` on this process's clock (NaN while its offset is unknown)."""
        return self.peers[peer].to_local(time_s)

    def translate(self, from_peer: str, to_peer: str, time_s: np.ndarray) -> np.ndarray:
        """Times stamped by ``from_peer`` on ``to_peer``'s clock (NaN while either offset is unknown)."""
        return self.to_local(from_peer, time_s) + self.peers[to_peer].offset_s

    @property
    def synchronized(self) -> bool:
        return all(offset.known for offset in self.peers.values())

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {name: offset.status() for name, offset in self.peers.items()}
        if self.failure:
            status["failure"] = self.failure
        return status

    def _run(self) -> None:
        clients = {
            name: ControlClient(self._ctx, endpoint, self._security, server=name)
            for name, endpoint in self._endpoints.items()
        }
        try:
            while not self._stop.is_set():
                for name, client in clients.items():
                    if self._stop.is_set():
                        break
                    self._probe(name, client)
                    self.peers[name].expire(self._clock.now(), self._max_age_s)
                self._stop.wait(SYNC_PERIOD_S if self.synchronized else RETRY_PERIOD_S)
        except Exception as exc:  # no offset can be kept fresh any more: none is trusted (gates close)
            self.failure = f"clock probing stopped: {type(exc).__name__}: {exc}"
            for offset in self.peers.values():
                offset.forget()
            raise
        finally:
            for client in clients.values():
                client.close()

    def _probe(self, name: str, client: ControlClient) -> None:
        sent_s = self._clock.now()
        try:
            reply = client.request("clock", timeout_s=PROBE_TIMEOUT_S)
        except (ControlTimeout, ValueError):  # no reply, or one that is not JSON: no probe
            return
        received_s = self._clock.now()
        try:
            probe = Probe(sent_s, float(reply["now_s"]), received_s)
            peer_clock_id = str(reply["clock_id"])
        except (KeyError, TypeError, ValueError):
            return
        self.peers[name].add(probe, peer_clock_id)
