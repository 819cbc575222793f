"""LSL publishing kept off the control path: loops queue numpy data, a thread pushes it.

A loop never waits on LSL: :meth:`Telemetry.push`, :meth:`~Telemetry.marker` and
:meth:`~Telemetry.status` copy into a bounded queue and return (no lock, no thread
wake-up: the thread drains the queue every ``DRAIN_PERIOD_S``); a full queue drops
the item and counts its samples as ``dropped``. Data for an outlet without a consumer
(as the thread saw it at its last drain) is not even copied: liblsl would discard it.
A sample counts as ``pushed`` only when its outlet had a consumer at that moment, so a
recording of a stream holds exactly the ``pushed`` count that the process's last
status sample reports for it (``status["lsl"][stream]``).

Every process has a ``<process>-markers`` stream (type ``Markers``, strings), a
``<process>-status`` stream (type ``FesloopStatus``: the process's status as JSON at
5 Hz and once more on exit, with the final counts) and a ``<process>-counters`` stream
(type ``FesloopCounters``: the status' top-level numbers as float64 channels, at the
same times). Stream names are
``<config name>-<key>``, source ids ``fesloop-<config name>-<key>``; every stream
carries the resolved config (and the controller's, its calibration) as JSON under
``<desc><fesloop>``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
import threading
import time
from typing import Any

import numpy as np
import pylsl

from fesloop.config import Config
from fesloop.lsl import make_outlet

STATUS_TYPE = "FesloopStatus"
QUEUE_ITEMS = 2048
DRAIN_PERIOD_S = 0.01  # the publishing thread wakes this often (LSL consumers see data <= 10 ms later)
LINGER_S = 0.2  # after the last push, before the outlets close: lets consumers receive it
JOIN_TIMEOUT_S = 2.0

# Every stream key each process publishes; the recorder waits for all of them.
STREAMS: dict[str, tuple[str, ...]] = {
    "acquisition": ("emg", "acquisition-markers", "acquisition-status", "acquisition-counters"),
    "controller": (
        "filtered-emg", "envelope", "activation", "gates", "mwave", "command-latency", "controller-markers",
        "controller-status", "controller-counters",
    ),
    "stimulator": ("stimulation", "pulses", "latency", "stimulator-markers", "stimulator-status", "stimulator-counters"),
}
COUNTERS_TYPE = "FesloopCounters"
NOT_COUNTERS = frozenset({"pid", "time_s", "session_start_s"})  # numbers in a status that are not counters


def stream_name(config_name: str, key: str) -> str:
    return f"{config_name}-{key}"


def config_json(config: Config) -> str:
    """The resolved config (every default filled in) as JSON."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


@dataclasses.dataclass
class Counts:
    pushed: int = 0  # samples handed to liblsl while the outlet had a consumer
    dropped: int = 0  # samples dropped because the queue was full
    failed: int = 0  # items liblsl refused (e.g. text it cannot encode): dropped, publishing goes on


class Telemetry:
    """The LSL outlets of one process and the thread that feeds them (inert when LSL is off)."""

    def __init__(self, config: Config, process: str, description: dict[str, str] | None = None) -> None:
        self.enabled = config.acquisition.lsl
        self.process = process
        self.config_name = config.name
        self.counts: dict[str, Counts] = {}
        self._description = {"process": process, "config": config_json(config), **(description or {})}
        self._outlets: dict[str, pylsl.StreamOutlet] = {}
        self._consumed: dict[str, bool] = {}  # per outlet: a consumer was there at the thread's last drain
        # Appends and pops of a deque are atomic: the loop never takes a lock or wakes the thread.
        self._queue: deque[tuple[str, Any, Any]] = deque()
        self._closing = threading.Event()
        self._markers = f"{process}-markers"
        self._status = f"{process}-status"
        self._counters = f"{process}-counters"  # opened by the thread from the first status' numbers
        self._counter_names: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"{process}-lsl", daemon=True)
        if self.enabled:
            self.add_stream(self._markers, "Markers", ["event"], 0.0, channel_format="string")
            self.add_stream(self._status, STATUS_TYPE, ["status_json"], 0.0, channel_format="string")
            self.counts[self._counters] = Counts()
            self._thread.start()

    def add_stream(
        self,
        key: str,
        stream_type: str,
        labels: list[str],
        rate_hz: float,
        unit: str = "",
        channel_format: str = "float32",
        extra_channel_fields: dict[str, list[str]] | None = None,
        source_id: str = "",
    ) -> None:
        """Open the outlet of one of this process's STREAMS (before its first push)."""
        if key not in STREAMS[self.process]:
            raise ValueError(f"{key!r} is not one of the {self.process} streams {STREAMS[self.process]}")
        if not self.enabled:
            return
        self.counts[key] = Counts()
        self._outlets[key] = make_outlet(
            stream_name(self.config_name, key),
            stream_type,
            labels,
            rate_hz,
            source_id or f"fesloop-{self.config_name}-{key}",
            channel_format=channel_format,
            unit=unit,
            extra_channel_fields=extra_channel_fields,
            description={**self._description, "stream": key},
        )

    def push(self, key: str, data: np.ndarray, time_s: float | np.ndarray) -> None:
        """Queue samples (n_samples, n_channels) or one sample (n_channels,).

        ``time_s``: the time of the last sample (regular streams: liblsl dates the
        others back by the sampling period) or one time per sample.
        """
        if self._consumed.get(key):
            times = np.array(time_s, dtype=np.float64) if np.ndim(time_s) else float(time_s)
            self._put(key, np.array(data, dtype=np.float32, ndmin=2), times)

    def has_consumer(self, key: str) -> bool:
        """Whether ``push`` queues data for ``key``: its outlet had a consumer at the last drain."""
        return self._consumed.get(key, False)

    def marker(self, text: str, time_s: float) -> None:
        """Queue one event string for this process's Markers stream."""
        if self.enabled:
            self._put(self._markers, text, time_s)

    def status(self, status: dict[str, Any]) -> None:
        """Queue a status sample (its ``time_s`` is the timestamp); the thread adds the counts.

        Its top-level numbers (counters) also go to ``<process>-counters`` as numeric channels.
        """
        if self.enabled:
            time_s = float(status.get("time_s", pylsl.local_clock()))
            counters = {
                key: float(value)
                for key, value in status.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_COUNTERS
            }
            self._put(self._counters, counters, time_s)
            self._put(self._status, status, time_s)

    def close(self, final_status: dict[str, Any]) -> None:
        """Push what is queued and the final status, let consumers receive it, close the outlets."""
        if not self.enabled:
            return
        self.status(final_status)
        self._closing.set()
        self._thread.join(JOIN_TIMEOUT_S)
        if any(outlet.have_consumers() for outlet in self._outlets.values()):
            time.sleep(LINGER_S)
        self._outlets.clear()

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per stream. Called on the publishing thread too: iterates a copy (taken in one
        step under the GIL), as the loop adds streams meanwhile (the controller's on its first EMG)."""
        return {key: dataclasses.asdict(counts) for key, counts in dict(self.counts).items()}

    def _put(self, key: str, data: Any, time_s: Any) -> None:
        if len(self._queue) >= QUEUE_ITEMS:
            self.counts[key].dropped += len(data) if isinstance(data, np.ndarray) else 1
        else:
            self._queue.append((key, data, time_s))

    def _run(self) -> None:
        """Every ``DRAIN_PERIOD_S``, push what is queued (one wake-up per period, not per item)."""
        while True:
            closing = self._closing.wait(DRAIN_PERIOD_S)
            for key, outlet in list(self._outlets.items()):  # a copy: the loop may add outlets meanwhile
                self._consumed[key] = outlet.have_consumers()
            while self._queue:
                key, data, time_s = self._queue.popleft()
                try:
                    self._push(key, data, time_s)
                except Exception:  # one bad item must not end this process's LSL publishing
                    if key in self.counts:
                        size = len(data) if isinstance(data, np.ndarray) else 1
                        self.counts[key].pushed -= size  # counted on its way in
                        self.counts[key].failed += size
            if closing:
                return

    def _push(self, key: str, data: Any, time_s: Any) -> None:
        """One queued item to its outlet (counted as pushed only while the outlet has a consumer)."""
        if key == self._counters:
            self._push_counters(data, time_s)
            return
        outlet = self._outlets[key]
        if not outlet.have_consumers():
            return
        counts = self.counts[key]
        if isinstance(data, np.ndarray):
            counts.pushed += len(data)
            if np.ndim(time_s):
                for sample, t in zip(data, time_s):
                    outlet.push_sample(sample, float(t))
            else:
                outlet.push_chunk(data, time_s)
        elif key == self._status:
            counts.pushed += 1  # before the summary is taken: the final status counts itself
            outlet.push_sample([json.dumps({**data, "lsl": self.summary()}, default=str)], time_s)
        else:
            counts.pushed += 1
            outlet.push_sample([data], time_s)

    def _push_counters(self, counters: dict[str, float], time_s: float) -> None:
        """One sample of the numeric counters; the first one fixes the channels (names sorted)."""
        if self._counters not in self._outlets:
            self._counter_names = sorted(counters)
            self._outlets[self._counters] = make_outlet(
                stream_name(self.config_name, self._counters), COUNTERS_TYPE, self._counter_names, 0.0,
                f"fesloop-{self.config_name}-{self._counters}", channel_format="double64",
                description={**self._description, "stream": self._counters},
            )
        outlet = self._outlets[self._counters]
        if outlet.have_consumers():
            self.counts[self._counters].pushed += 1
            outlet.push_sample([counters.get(name, float("nan")) for name in self._counter_names], time_s)
