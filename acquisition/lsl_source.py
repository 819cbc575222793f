"""EMG from an LSL stream (amplifiers that ship an LSL app), chosen by name, type, source_id.

Pulled with ``pull_chunk(dest_obj=...)`` into a preallocated buffer; a short
``max_buflen`` means liblsl drops what piles up during a stall instead of handing
over seconds of stale data. Timestamps are clock-synced to this host (the shared
clock); a sample clock fitted through them gives the stream's index -> time line:
sample times come from it (they follow the sample indices, without the outlet's push
jitter), and samples stamped later than the line expects, by more than the stream's
own jitter allows (at least ``gap_tolerance_ms``), follow a gap of that many samples
(:mod:`acquisition.stamp_gaps`). Timestamps that go back are counted. A sample with a
NaN, an infinity or a value beyond float32 after scaling is dropped as lost and counted
(the next block handed over says it in its ``lost_samples``, also when it ended a pull).
A re-anchor of the sample clock is reported as an event; a stream off its nominal rate
by more than the clock can follow raises SourceError. A lost stream raises SourceError on
read; the acquisition loop then reports it and calls ``restart``, which resolves the stream
again (same query), and the gap across the outage is counted from the timestamps.
"""

from __future__ import annotations

import numpy as np
import pylsl
from pylsl.util import LostError, TimeoutError as LslTimeoutError

from acquisition.gaps import segments, steps_back, lost_counted_from, without_rows
from acquisition.sources import Block, SourceError, SourceEvent, n_channels_needed
from acquisition.stamp_gaps import StampGaps
from fesloop import protocol
from fesloop.config import Config
from fesloop.lsl import NUMPY_DTYPES, configure_machine_scope, stream_query

MAX_PULL_SAMPLES = 4096
RESTART_RESOLVE_S = 0.5


class LslSource:
    """An LSL inlet on the first stream matching the query."""

    def __init__(self, config: Config) -> None:
        cfg = config.acquisition.lsl_inlet
        self._cfg = cfg
        try:
            self._query = stream_query(cfg.name, cfg.type, cfg.source_id)
        except ValueError as exc:
            raise SourceError(f"acquisition.lsl_inlet: {exc}") from None
        self.n_channels = n_channels_needed(config)
        self.sampling_rate_hz = 0.0  # known once the stream is resolved
        self.source_id = f"lsl-{cfg.source_id or cfg.name or cfg.type}"
        self.duplicate_samples = 0
        self.non_finite_samples = 0
        self.timestamps_back = 0
        self._stamps: StampGaps | None = None  # at the stream's rate, once it is resolved
        self._inlet: pylsl.StreamInlet | None = None
        self._raw = np.empty((0, 0))
        self._emg_uv = np.empty((MAX_PULL_SAMPLES, self.n_channels), dtype=np.float32)
        self._last_stamp_s: float | None = None
        self._handed_stop = 0  # the index after the last sample handed over
        self._events: list[SourceEvent] = []

    def start(self, now_s: float) -> None:
        self._open(self._cfg.resolve_timeout_s)

    def _open(self, timeout_s: float) -> None:
        configure_machine_scope()
        found = pylsl.resolve_bypred(self._query, minimum=1, timeout=timeout_s)
        if not found:
            raise SourceError(f"no LSL stream matches {self._query} (waited {timeout_s:g} s)")
        info = found[0]
        rate_hz = info.nominal_srate()
        if rate_hz <= 0:
            raise SourceError(f"LSL stream {info.name()!r} has an irregular rate: EMG needs a nominal rate")
        if not protocol.MIN_SAMPLING_RATE_HZ <= rate_hz <= protocol.MAX_SAMPLING_RATE_HZ:  # NaN too
            raise SourceError(
                f"LSL stream {info.name()!r} has a nominal rate of {rate_hz:g} Hz: EMG needs "
                f"{protocol.MIN_SAMPLING_RATE_HZ:g}..{protocol.MAX_SAMPLING_RATE_HZ:g} Hz"
            )
        if self.sampling_rate_hz and rate_hz != self.sampling_rate_hz:
            raise SourceError(
                f"LSL stream {info.name()!r} came back at {rate_hz:g} Hz, was {self.sampling_rate_hz:g} Hz"
            )
        if info.channel_count() < self.n_channels:
            raise SourceError(
                f"LSL stream {info.name()!r} has {info.channel_count()} channels, the muscles need {self.n_channels}"
            )
        dtype = NUMPY_DTYPES.get(info.channel_format())
        if dtype is None:
            raise SourceError(f"LSL stream {info.name()!r}: channel format {info.channel_format()} is not numeric")
        inlet = pylsl.StreamInlet(
            info, max_buflen=self._cfg.max_buflen_s, recover=False, processing_flags=pylsl.proc_clocksync
        )
        try:
            inlet.open_stream(timeout=max(timeout_s, 1.0))
            inlet.time_correction(timeout=max(timeout_s, 1.0))
        except (LslTimeoutError, LostError) as exc:
            raise SourceError(f"LSL stream {info.name()!r}: could not open ({exc})") from None
        self._inlet = inlet
        if self._stamps is None:
            self._stamps = StampGaps(rate_hz, self._cfg.gap_tolerance_ms, f"LSL stream {self._query}")
        self.sampling_rate_hz = rate_hz
        self._raw = np.empty((MAX_PULL_SAMPLES, info.channel_count()), dtype=dtype)

    def read(self, now_s: float) -> list[Block]:
        if self._inlet is None or self._stamps is None:
            raise SourceError(f"LSL stream {self._query}: not open")
        try:
            raw, stamps_s = self._inlet.pull_chunk(
                timeout=0.0, max_samples=MAX_PULL_SAMPLES, dest_obj=self._raw, as_numpy=True
            )
        except LostError:
            self._inlet = None
            raise SourceError(f"LSL stream {self._query}: lost (the outlet is gone)") from None
        n = len(stamps_s)
        if n == 0:
            return []
        emg_uv = self._emg_uv[:n]
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, and its row is dropped
            np.multiply(raw[:, : self.n_channels], self._cfg.scale_uv, out=emg_uv, casting="unsafe")
        self.timestamps_back += steps_back(stamps_s, self._last_stamp_s)
        self._last_stamp_s = float(stamps_s[-1])
        first_index = self._stamps.next_index
        scan, line = self._stamps.place(stamps_s, self._events)
        finite = np.isfinite(emg_uv).all(axis=1)
        if not finite.all():  # NaN, inf, or beyond float32: the row is lost
            self.non_finite_samples += int(n - finite.sum())
            scan, emg_uv = without_rows(scan, finite), emg_uv[finite]
        parts = lost_counted_from(segments(emg_uv.shape[0], scan, first_index), self._handed_stop)
        if parts:
            start, stop, index, _ = parts[-1]
            self._handed_stop = index + stop - start
        return [Block(index, line.time_of(index), emg_uv[start:stop], lost) for start, stop, index, lost in parts]

    def restart(self, now_s: float) -> None:
        """Resolve the stream again (briefly: the loop retries with backoff)."""
        self.stop()
        self._open(RESTART_RESOLVE_S)

    def take_events(self) -> list[SourceEvent]:
        events, self._events = self._events, []
        return events

    def on_pulses(self, pulses: protocol.Pulses) -> None:
        """An LSL amplifier does not need the pulses."""

    def stop(self) -> None:
        if self._inlet is not None:
            self._inlet.close_stream()
            self._inlet = None
