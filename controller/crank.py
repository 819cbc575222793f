"""Crank angle and cadence from outside the controller: an LSL stream, or the MOTOmed.

:class:`CrankTracker` is pure: readings in (times on this process's clock, and when
they were received), the crank at a later time out, extrapolated at the last cadence,
or None once the newest reading is older than ``stale_s`` by its own time or by when
it was received (DESIGN 3: freshness on the receiver's clock; the phase is no longer
known, so cycling must stop). A reading stamped later than it was received (by more
than ``FUTURE_TOLERANCE_S``: a source on another clock) is dropped and counted: it
would stay "fresh" and block every true reading after it.
Cadence comes with each reading (MOTOmed, or an LSL cadence channel) or from the
angle's rate of change over the last ``CADENCE_WINDOW_S``.

:class:`LslCrank` is the I/O edge: a thread resolves the stream, pulls chunks into a
preallocated buffer with clock-synced timestamps and hands them over through a
deque, so resolving or a lost stream never blocks the control loop.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np
import pylsl
from pylsl.util import LostError

from controller.laws.base import CrankState
from controller.laws.cycling import DEG_PER_S_PER_RPM
from fesloop.config import CrankConfig
from fesloop.lsl import NUMPY_DTYPES, configure_machine_scope, stream_query

CADENCE_WINDOW_S = 0.1  # angle readings kept for a derived cadence
RESOLVE_WAIT_S = 0.5
PULL_WAIT_S = 0.05
MAX_PULL_SAMPLES = 1024
MAX_PENDING_CHUNKS = 256  # chunks not taken by the loop yet (older ones are dropped)
FUTURE_TOLERANCE_S = 0.05  # a reading may be stamped this much after it was received (clock sync error)


def _wrap_deg(delta_deg: float) -> float:
    """The shortest signed turn from one angle to another, in -180..180."""
    return (delta_deg + 180.0) % 360.0 - 180.0


class CrankTracker:
    """The crank as the latest readings of an external source describe it."""

    def __init__(self, stale_s: float) -> None:
        self.stale_s = stale_s
        self.readings = 0
        self.out_of_order = 0  # readings not newer than the last one: dropped
        self.not_finite = 0  # readings with a NaN or infinite time, angle or cadence: dropped
        self.future = 0  # readings stamped after they were received: dropped
        self._time_s = -math.inf
        self._received_s = -math.inf
        self._angle_deg = 0.0
        self._cadence_rpm = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (time, unwrapped angle) for a derived cadence

    def add(
        self, time_s: np.ndarray, angle_deg: np.ndarray, cadence_rpm: np.ndarray | None, received_s: float
    ) -> None:
        """Readings in time order, received at ``received_s``; ``cadence_rpm`` None derives the cadence from the angles."""
        for i in range(len(time_s)):
            t_s = float(time_s[i])
            if not (math.isfinite(t_s) and math.isfinite(angle_deg[i]) and (cadence_rpm is None or math.isfinite(cadence_rpm[i]))):
                self.not_finite += 1  # a NaN would open every cycling window or poison the cadence
                continue
            if t_s > received_s + FUTURE_TOLERANCE_S:
                self.future += 1
                continue
            if not t_s > self._time_s:
                self.out_of_order += 1
                continue
            angle = float(angle_deg[i]) % 360.0
            unwrapped = self._recent[-1][1] + _wrap_deg(angle - self._angle_deg) if self._recent else angle
            self._recent.append((t_s, unwrapped))
            while len(self._recent) > 2 and self._recent[1][0] <= t_s - CADENCE_WINDOW_S:
                self._recent.popleft()
            if cadence_rpm is not None:
                self._cadence_rpm = float(cadence_rpm[i])
            elif len(self._recent) > 1:
                (t0_s, a0), (t1_s, a1) = self._recent[0], self._recent[-1]
                self._cadence_rpm = (a1 - a0) / (t1_s - t0_s) / DEG_PER_S_PER_RPM
            self._time_s, self._angle_deg, self._received_s = t_s, angle, received_s
            self.readings += 1

    def state(self, now_s: float) -> CrankState | None:
        """The crank at ``now_s``, extrapolated from the newest reading; None if that is stale."""
        age_s = now_s - self._time_s
        if age_s > self.stale_s or now_s - self._received_s > self.stale_s:
            return None
        advanced_deg = self._cadence_rpm * DEG_PER_S_PER_RPM * max(age_s, 0.0)
        return CrankState((self._angle_deg + advanced_deg) % 360.0, self._cadence_rpm)


class LslCrank:
    """Crank readings from the LSL stream ``[controller.crank]`` names, gathered by a thread."""

    def __init__(self, cfg: CrankConfig) -> None:
        configure_machine_scope()  # here, before the thread makes this process's first LSL call
        self._cfg = cfg
        self.query = stream_query(cfg.name, cfg.type, cfg.source_id)
        self.state = "resolving"
        self._pending: deque[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = deque(maxlen=MAX_PENDING_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lsl-crank", daemon=True)
        self._thread.start()

    def take(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(times, angles, cadences or None) of every chunk pulled since the last call."""
        chunks = []
        while self._pending:
            chunks.append(self._pending.popleft())
        return chunks

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        inlet: pylsl.StreamInlet | None = None
        buffer = np.empty((0, 0))
        while not self._stop.is_set():
            if inlet is None:
                inlet, buffer = self._open()
                continue
            try:
                data, stamps_s = inlet.pull_chunk(
                    timeout=PULL_WAIT_S, max_samples=MAX_PULL_SAMPLES, dest_obj=buffer, as_numpy=True
                )
            except LostError:
                inlet, self.state = None, "lost: resolving again"
                continue
            n = len(stamps_s)
            if n:
                cadence = data[:n, self._cfg.cadence_channel].astype(np.float64) if self._cfg.cadence_channel >= 0 else None
                self._pending.append((np.array(stamps_s[:n]), data[:n, self._cfg.angle_channel].astype(np.float64), cadence))
        if inlet is not None:
            inlet.close_stream()

    def _open(self) -> tuple[pylsl.StreamInlet | None, np.ndarray]:
        found = pylsl.resolve_bypred(self.query, minimum=1, timeout=RESOLVE_WAIT_S)
        if not found:
            return None, np.empty((0, 0))
        info = found[0]
        needed = max(self._cfg.angle_channel, self._cfg.cadence_channel) + 1
        dtype = NUMPY_DTYPES.get(info.channel_format())
        if info.channel_count() < needed or dtype is None:
            self.state = (
                f"stream {info.name()!r} has {info.channel_count()} channels of format {info.channel_format()}; "
                f"the crank needs {needed} numeric ones"
            )
            self._stop.wait(RESOLVE_WAIT_S)
            return None, np.empty((0, 0))
        inlet = pylsl.StreamInlet(info, max_buflen=1, recover=False, processing_flags=pylsl.proc_clocksync)
        self.state = f"streaming from {info.name()!r}"
        return inlet, np.empty((MAX_PULL_SAMPLES, info.channel_count()), dtype=dtype)
