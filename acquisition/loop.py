"""The acquisition process: read the source on absolute deadlines, publish ``emg``.

Publishes on ``endpoints.emg``: ``emg`` chunks (uV, shared clock, arrival time =
when the source's read returned them, the start of end-to-end latency;
the first sample index jumps over lost samples, which are never filled),
``truth`` (simulated patient's voluntary drive), ``status`` (5 Hz heartbeat with
gap counts and the recent gaps and source events, and FAULT "EMG stale" published
at once when the source stalls). What a source notices (a wall-clock step, its
sample clock anchored again) is logged and marked in the recording. Listens to ``pulses`` so the simulated patient can answer them.
Pushes raw EMG to an LSL outlet.

Recovery policy: once the source has been stale for ``recover_after_ms`` it is
closed and opened again (BrainFlow: release and prepare the session; LSL: resolve
the stream again), then again after 2x, 4x ... that interval, capped at
``recover_backoff_max_s``, until samples flow. Every attempt and its outcome is
logged and counted in status. The reopening runs in a worker thread: preparing a
device that is not back can block for seconds, and meanwhile the loop keeps
answering control requests, publishing the FAULT status and draining pulses.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import zmq

from acquisition.sources import Block, Source, SourceError, open_source
from fesloop import protocol
from fesloop.config import Config
from fesloop.runtime import LatencyWindow, Pacer, ProcessRuntime
from fesloop.sockets import Link, Sequencer, publisher
from fesloop.telemetry import Telemetry

RECENT_GAPS = 8
RECENT_EVENTS = 8
GAP_LOG_PERIOD_S = 5.0
RESTART_JOIN_S = 2.0  # at exit, how long to wait for a reopening that is still blocked


class Recovery:
    """When to reopen a stalled source: after ``first_s`` stale, then doubling up to ``max_s``."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.attempts = 0  # in the current stall
        self.total_attempts = 0
        self.next_s = float("inf")

    def stalled(self, since_s: float) -> None:
        self.attempts = 0
        self.next_s = since_s + self.first_s

    def due(self, now_s: float) -> bool:
        return now_s >= self.next_s

    def attempted(self, now_s: float) -> float:
        """Count an attempt; returns the wait before the next one."""
        self.attempts += 1
        self.total_attempts += 1
        wait_s = min(self.first_s * 2 ** self.attempts, self.max_s)
        self.next_s = now_s + wait_s
        return wait_s

    def recovered(self) -> None:
        self.next_s = float("inf")


class BackgroundRestart:
    """``source.restart`` in a daemon worker thread, one at a time.

    Sources are not thread-safe: while ``busy`` the loop does not read the source
    (``on_pulses`` excepted: only the simulated patient acts on it, and its restart
    does nothing). Daemon, so a device that never comes back cannot keep the process from exiting.
    """

    def __init__(self, source: Source) -> None:
        self._source = source
        self._thread: threading.Thread | None = None
        self._error: SourceError | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, now_s: float) -> None:
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(now_s,), name="source-restart", daemon=True)
        self._thread.start()

    def _run(self, now_s: float) -> None:
        try:
            self._source.restart(now_s)
        except SourceError as exc:
            self._error = exc
        except Exception as exc:  # the thread's end: any failure is reported, never taken for a reopening
            self._error = SourceError(f"reopening failed unexpectedly: {type(exc).__name__}: {exc}")

    def finished(self) -> tuple[bool, SourceError | None]:
        """(True, its error or None) once after a restart ends; (False, None) otherwise."""
        if self._thread is None or self._thread.is_alive():
            return False, None
        self._thread = None
        return True, self._error

    def join(self, timeout_s: float) -> bool:
        """Wait for a running restart; False if it is still blocked after ``timeout_s``."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.busy


class Acquisition:
    def __init__(self, config: Config, source: Source | None = None) -> None:
        self.config = config
        acq = config.acquisition
        self.rt = ProcessRuntime("acquisition", config.endpoints.acquisition_control, security=config.security)
        self.source = source or open_source(config)
        self.pub = publisher(self.rt.ctx, config.endpoints.emg, self.rt.security)
        self.pulses_link = Link(
            self.rt.ctx, config.endpoints.pulses, [protocol.TOPICS[protocol.Kind.PULSES]],
            config.endpoints.link_timeout_ms * 1e-3, self.rt.log, security=self.rt.security, server="stimulator",
        )
        self.pulses_unsynced = 0  # pulses received before the stimulator's clock offset was known
        self.stimulator_clock = self.rt.sync_clocks({"stimulator": config.endpoints.stimulator_control}).peers[
            "stimulator"
        ]
        self.emg_seq = Sequencer()
        self.truth_seq = Sequencer()
        self.emg_encoder = protocol.EmgEncoder(protocol.Kind.EMG)  # chunks encoded without allocating
        self.truth_encoder = protocol.EmgEncoder(protocol.Kind.TRUTH)
        self.samples_sent = 0
        self.lost_samples = 0
        self.gaps = 0
        self.recent_gaps: deque[dict[str, Any]] = deque(maxlen=RECENT_GAPS)
        self.source_events = 0
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.chunk_age = LatencyWindow()
        self.latency_share = LatencyWindow()  # its part of end-to-end latency: samples returned -> chunk sent
        self.state = "STARTING"
        self.fault_reason = ""
        self.source_error = ""
        self.stale_since_s = 0.0
        self.last_data_s = 0.0
        self.recovery = Recovery(acq.recover_after_ms * 1e-3, acq.recover_backoff_max_s)
        self.restart = BackgroundRestart(self.source)
        self.pacer: Pacer | None = None
        self.telemetry = self.rt.telemetry = Telemetry(config, "acquisition")
        self._gaps_logged = (0, 0)
        self._gap_log_s = 0.0
        self.rt.status_fields = self._status

    def _status(self) -> dict[str, Any]:
        return {
            "ready": self.state in ("RUNNING", "FAULT"),
            "state": self.state,
            "fault_reason": self.fault_reason,
            "source": self.source.source_id,
            "source_error": self.source_error,
            "sampling_rate_hz": self.source.sampling_rate_hz,
            "n_channels": self.source.n_channels,
            "samples_sent": self.samples_sent,
            "lost_samples": self.lost_samples,
            "gaps": self.gaps,
            "recent_gaps": list(self.recent_gaps),
            "duplicate_samples": self.source.duplicate_samples,
            "non_finite_samples": self.source.non_finite_samples,
            "timestamps_back": self.source.timestamps_back,
            "source_events": self.source_events,
            "recent_events": list(self.recent_events),
            "recovery_attempts": self.recovery.total_attempts,
            "reopening": self.restart.busy,
            "chunk_age_ms": self.chunk_age.summary_ms(),
            "latency_share_ms": self.latency_share.summary_ms(),
            "overruns": self.pacer.overruns if self.pacer else 0,
            "pulses_received": self.pulses_link.counters.received,
            "pulses_unsynced": self.pulses_unsynced,
            "rejected": self.pulses_link.counters.rejected,
            "dropped": self.pulses_link.counters.dropped,
            "links": {"stimulator": self.pulses_link.status()},
        }

    def _open_outlet(self) -> None:
        labels = [f"ch{i}" for i in range(self.source.n_channels)]
        muscles = ["" for _ in labels]
        placements = ["" for _ in labels]
        for muscle in self.config.muscles:
            labels[muscle.emg_channel] = muscle.name
            muscles[muscle.emg_channel] = muscle.name
            placements[muscle.emg_channel] = muscle.placement
        self.telemetry.add_stream(
            "emg",
            "EMG",
            labels,
            self.source.sampling_rate_hz,
            unit="microvolts",
            extra_channel_fields={"muscle": muscles, "placement": placements},
            source_id=f"fesloop-{self.config.name}-emg-{self.source.source_id}",
        )

    def _on_pulses(self, pulses: protocol.Pulses) -> None:
        """Delivered pulses on this clock, for the simulated patient; counted and dropped until it is known."""
        if not self.stimulator_clock.known:
            self.pulses_unsynced += len(pulses.time_s)
            return
        time_s = self.stimulator_clock.to_local(pulses.time_s)
        self.source.on_pulses(protocol.Pulses(pulses.channel, time_s, pulses.amplitude_ma, pulses.pulse_width_us))

    def _publish(self, block: Block, arrival_s: float) -> None:
        fs_hz = self.source.sampling_rate_hz
        chunk = protocol.EmgChunk(block.first_sample_index, block.first_sample_time_s, arrival_s, fs_hz, block.emg_uv)
        self.pub.send_multipart(self.emg_encoder.encode(self.emg_seq.next(), arrival_s, chunk))
        if block.truth is not None:
            truth = protocol.EmgChunk(block.first_sample_index, block.first_sample_time_s, arrival_s, fs_hz, block.truth)
            self.pub.send_multipart(self.truth_encoder.encode(self.truth_seq.next(), arrival_s, truth))
        n = len(block.emg_uv)
        self.samples_sent += n
        last_time_s = block.first_sample_time_s + (n - 1) / fs_hz
        self.chunk_age.add(arrival_s - last_time_s)
        if block.lost_samples:
            self._count_gap(block)
        self.telemetry.push("emg", block.emg_uv, last_time_s)

    def _count_gap(self, block: Block) -> None:
        self.gaps += 1
        self.lost_samples += block.lost_samples
        self.telemetry.marker(f"gap {block.lost_samples} samples", block.first_sample_time_s)
        self.recent_gaps.append(
            {
                "first_missing_index": block.first_sample_index - block.lost_samples,
                "size_samples": block.lost_samples,
                "resumed_at_s": round(block.first_sample_time_s, 6),
            }
        )

    def _log_gaps(self, now_s: float) -> None:
        """Lost samples are logged as they come, at most one line per GAP_LOG_PERIOD_S."""
        gaps, lost = self._gaps_logged
        if self.gaps == gaps or now_s < self._gap_log_s + GAP_LOG_PERIOD_S:
            return
        last = self.recent_gaps[-1]
        self.rt.log.warning(
            "%d gaps, %d samples lost since the last report (latest: %d samples before sample %d)",
            self.gaps - gaps, self.lost_samples - lost, last["size_samples"],
            last["first_missing_index"] + last["size_samples"],
        )
        self._gaps_logged = (self.gaps, self.lost_samples)
        self._gap_log_s = now_s

    def _read(self, now_s: float) -> list[Block]:
        try:
            blocks = self.source.read(now_s)
        except SourceError as exc:
            if str(exc) != self.source_error:
                self.rt.log.error("%s", exc)
            self.source_error = str(exc)
            return []
        self._on_source_events()
        return blocks

    def _on_source_events(self) -> None:
        """What the source noticed: a marker in the recording, a log line, the recent ones in status."""
        for event in self.source.take_events():
            self.source_events += 1
            self.telemetry.marker(event.marker, event.time_s)
            self.recent_events.append({"time_s": round(event.time_s, 6), "what": event.marker})
            self.rt.log.warning("%s", event.marker)

    def _publish_status_now(self, now_s: float) -> None:
        self.pub.send_multipart(protocol.encode(self.rt.status_seq.next(), now_s, protocol.Status(self.rt.status())))

    def _check_stale(self, now_s: float) -> None:
        stale = now_s - self.last_data_s > self.config.acquisition.stale_ms * 1e-3
        if stale and self.state == "RUNNING":
            self.state, self.fault_reason = "FAULT", "EMG stale"
            self.telemetry.marker("fault EMG stale", self.last_data_s)
            self.stale_since_s = self.last_data_s
            self.recovery.stalled(self.last_data_s)
            self.rt.log.error("EMG stale: no samples for %.0f ms", (now_s - self.last_data_s) * 1e3)
            self._publish_status_now(now_s)
        elif not stale and self.state == "FAULT":
            self.state, self.fault_reason = "RUNNING", ""
            self.telemetry.marker("recovered EMG flowing", now_s)
            self.rt.log.info(
                "EMG flowing again after %.0f ms (%d reopen attempts)",
                (now_s - self.stale_since_s) * 1e3, self.recovery.attempts,
            )
            self.recovery.recovered()
            self.source_error = ""
            self._publish_status_now(now_s)
        if self.state == "FAULT" and not self.restart.busy and self.recovery.due(now_s):
            self._reopen(now_s)

    def _reopen(self, now_s: float) -> None:
        wait_s = self.recovery.attempted(now_s)
        self.rt.log.warning(
            "EMG stale for %.0f ms: reopening the source (attempt %d; next in %.1f s if still stale)",
            (now_s - self.stale_since_s) * 1e3, self.recovery.attempts, wait_s,
        )
        self.restart.start(now_s)

    def _reopened(self) -> None:
        """Log a reopening that has ended, and its outcome."""
        done, error = self.restart.finished()
        if not done:
            return
        if error is not None:
            self.source_error = str(error)
            self.rt.log.error("reopening failed: %s", error)
        else:
            self.rt.log.info("source reopened: waiting for samples")

    def _stop_source(self) -> None:
        if self.restart.join(RESTART_JOIN_S):
            self.source.stop()
        else:
            self.rt.log.error("the source is still reopening after %.0f s: exiting without releasing it", RESTART_JOIN_S)

    def run(self) -> int:
        rt = self.rt
        try:
            self.source.start(rt.clock.now())
        except SourceError as exc:
            rt.log.error("%s", exc)
            self.source.stop()
            return 2
        if self.config.acquisition.lsl:
            self._open_outlet()
        now_s = rt.clock.now()
        self.last_data_s = now_s
        self.state = "RUNNING"
        self.pacer = pacer = Pacer(self.config.acquisition.chunk_ms * 1e-3, now_s)
        poller = zmq.Poller()
        poller.register(rt.control.sock, zmq.POLLIN)
        poller.register(self.pulses_link.sock, zmq.POLLIN)
        rt.log.info("running: %s, %d channels at %g Hz", self.source.source_id, self.source.n_channels,
                    self.source.sampling_rate_hz)
        try:
            while rt.running:
                # One wake-up per chunk: sleep to the deadline, then take what the sockets hold.
                # Requests and pulses wait at most one chunk (50 ms at most); the simulated
                # patient needs its pulses only when it renders, right after this.
                time.sleep(pacer.timeout_ms(rt.clock.now()) * 1e-3)
                ready = dict(poller.poll(0))
                if self.pulses_link.sock in ready:
                    for message in self.pulses_link.drain(rt.clock.now()):
                        self._on_pulses(message.body)
                if rt.control.sock in ready:
                    rt.control.serve_pending()
                now_s = rt.clock.now()
                self.pulses_link.keep(now_s)
                if pacer.due(now_s):
                    self._reopened()
                    blocks = [] if self.restart.busy else self._read(now_s)
                    arrival_s = rt.clock.now()  # the samples reached this process when the source returned them
                    for block in blocks:
                        self._publish(block, arrival_s)
                        self.latency_share.add(rt.clock.now() - arrival_s)
                    if blocks:
                        self.last_data_s = arrival_s  # staleness counts from the stamp the chunks carry
                    self._check_stale(now_s)
                    self._log_gaps(now_s)
                rt.publish_status_if_due(self.pub, now_s)
        finally:
            self._stop_source()
            rt.log.info("stopped: %d samples sent, %d lost in %d gaps, %d duplicates dropped",
                        self.samples_sent, self.lost_samples, self.gaps, self.source.duplicate_samples)
            rt.close()
        return rt.exit_code


def main(config: Config) -> int:
    return Acquisition(config).run()
