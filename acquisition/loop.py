"""The acquisition process: read the source on absolute deadlines, publish ``emg``.

Publishes on ``endpoints.emg``: ``emg`` chunks (uV, shared clock, arrival time),
``truth`` (simulated patient's voluntary drive), ``status`` (5 Hz heartbeat with
FAULT "EMG stale" as soon as the source stalls). Listens to ``pulses`` so the
simulated patient can answer them. Pushes raw EMG to an LSL outlet.
"""

from __future__ import annotations

from typing import Any

import zmq

from acquisition.sources import Block, Source, SourceError, open_source
from fesloop import protocol
from fesloop.config import Config
from fesloop.lsl import configure_machine_scope, make_outlet
from fesloop.runtime import Pacer, ProcessRuntime
from fesloop.sockets import Sequencer, StreamCounters, drain, publisher, subscriber


class Acquisition:
    def __init__(self, config: Config, source: Source | None = None) -> None:
        self.config = config
        self.rt = ProcessRuntime("acquisition", config.endpoints.acquisition_control)
        self.source = source or open_source(config)
        self.pub = publisher(self.rt.ctx, config.endpoints.emg)
        self.pulses_sub = subscriber(self.rt.ctx, config.endpoints.pulses, [protocol.TOPICS[protocol.Kind.PULSES]])
        self.pulse_counters = StreamCounters()
        self.emg_seq = Sequencer()
        self.truth_seq = Sequencer()
        self.samples_sent = 0
        self.lost_samples = 0
        self.state = "STARTING"
        self.fault_reason = ""
        self.last_data_s = 0.0
        self.outlet = None
        self.rt.status_fields = self._status

    def _status(self) -> dict[str, Any]:
        return {
            "ready": self.state in ("RUNNING", "FAULT"),
            "state": self.state,
            "fault_reason": self.fault_reason,
            "source": self.source.source_id,
            "sampling_rate_hz": self.source.sampling_rate_hz,
            "n_channels": self.source.n_channels,
            "samples_sent": self.samples_sent,
            "lost_samples": self.lost_samples,
            "pulses_received": self.pulse_counters.received,
            "rejected": self.pulse_counters.rejected,
        }

    def _open_outlet(self) -> None:
        configure_machine_scope()
        labels = [f"ch{i}" for i in range(self.source.n_channels)]
        muscles = ["" for _ in labels]
        for muscle in self.config.muscles:
            labels[muscle.emg_channel] = muscle.name
            muscles[muscle.emg_channel] = muscle.name
        self.outlet = make_outlet(
            f"{self.config.name}-emg",
            "EMG",
            labels,
            self.source.sampling_rate_hz,
            f"fesloop-{self.config.name}-emg-{self.source.source_id}",
            unit="microvolts",
            extra_channel_fields={"muscle": muscles},
        )

    def _publish(self, block: Block, now_s: float) -> None:
        chunk = protocol.EmgChunk(
            block.first_sample_index, block.first_sample_time_s, now_s, self.source.sampling_rate_hz, block.emg_uv
        )
        self.pub.send_multipart(protocol.encode(self.emg_seq.next(), now_s, chunk))
        if block.truth is not None:
            truth = protocol.EmgChunk(
                block.first_sample_index, block.first_sample_time_s, now_s, self.source.sampling_rate_hz, block.truth
            )
            self.pub.send_multipart(protocol.encode(self.truth_seq.next(), now_s, truth, protocol.Kind.TRUTH))
        self.samples_sent += len(block.emg_uv)
        self.lost_samples += block.lost_samples
        if self.outlet is not None:
            last_time_s = block.first_sample_time_s + (len(block.emg_uv) - 1) / self.source.sampling_rate_hz
            self.outlet.push_chunk(block.emg_uv, last_time_s)

    def _check_stale(self, now_s: float) -> None:
        stale = now_s - self.last_data_s > self.config.acquisition.stale_ms * 1e-3
        if stale and self.state == "RUNNING":
            self.state, self.fault_reason = "FAULT", "EMG stale"
            self.rt.log.error("EMG stale: no samples for %.0f ms", (now_s - self.last_data_s) * 1e3)
            self.pub.send_multipart(protocol.encode(self.rt.status_seq.next(), now_s, protocol.Status(self.rt.status())))
        elif not stale and self.state == "FAULT":
            self.state, self.fault_reason = "RUNNING", ""
            self.rt.log.info("EMG flowing again")

    def run(self) -> int:
        rt = self.rt
        try:
            self.source.start(rt.clock.now())
        except SourceError as exc:
            rt.log.error("%s", exc)
            return 2
        if self.config.acquisition.lsl:
            self._open_outlet()
        now_s = rt.clock.now()
        self.last_data_s = now_s
        self.state = "RUNNING"
        pacer = Pacer(self.config.acquisition.chunk_ms * 1e-3, now_s)
        poller = zmq.Poller()
        poller.register(rt.control.sock, zmq.POLLIN)
        poller.register(self.pulses_sub, zmq.POLLIN)
        rt.log.info("running: %s, %d channels at %g Hz", self.source.source_id, self.source.n_channels,
                    self.source.sampling_rate_hz)
        try:
            while rt.running:
                ready = dict(poller.poll(pacer.timeout_ms(rt.clock.now())))
                if self.pulses_sub in ready:
                    for message in drain(self.pulses_sub, self.pulse_counters):
                        self.source.on_pulses(message.body)
                if rt.control.sock in ready:
                    rt.control.serve_pending()
                now_s = rt.clock.now()
                if pacer.due(now_s):
                    block = self.source.read(now_s)
                    if block is not None:
                        self.last_data_s = now_s
                        self._publish(block, now_s)
                    self._check_stale(now_s)
                rt.publish_status_if_due(self.pub, now_s)
        finally:
            self.source.stop()
            rt.log.info("stopped: %d samples sent, %d lost", self.samples_sent, self.lost_samples)
            rt.close()
        return rt.exit_code


def main(config: Config) -> int:
    return Acquisition(config).run()
