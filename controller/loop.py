"""The controller process: EMG in, activation estimate, ``command`` out as soon as it is known.

Each EMG chunk is blanked around delivered pulses, filtered and turned into an
activation per muscle as it arrives, and a command goes out at once (event-driven:
a fresh chunk does not wait for a control tick), at most ``MAX_COMMAND_RATE_HZ``.
When no command went out during a whole control period (``control_rate_hz``, on
absolute deadlines), the tick publishes one, so commands keep flowing without EMG;
without fresh, gap-free EMG the gate of every channel that depends on it is closed,
with the reason. Activation and gate telemetry stay on the fixed tick.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from controller.calibration import Calibration, CalibrationError, check_matches
from controller.estimator import EmgEstimator
from controller.mwave import Measurement
from controller.crank import LslCrank
from controller.laws.channels import ChannelLaws
from fesloop import protocol
from fesloop.config import Config
from fesloop.protocol import GateReason
from fesloop.runtime import STATUS_PERIOD_S, LatencyWindow, Pacer, ProcessRuntime
from fesloop.sockets import Link, Sequencer, publisher
from fesloop.telemetry import Telemetry

MAX_COMMAND_RATE_HZ = 1000.0  # event-driven commands are spaced at least 1 ms apart
MIN_COMMAND_INTERVAL_S = 1.0 / MAX_COMMAND_RATE_HZ
# The stimulator publishes status every STATUS_PERIOD_S besides its pulse reports: silent longer, its
# pulses may go unreported: artifacts cannot be blanked nor M-waves measured (gates of laws needing them close).
STIMULATOR_SILENCE_S = 2.5 * STATUS_PERIOD_S


def load_calibration(config: Config) -> Calibration | None:
    """The calibration file named by the config (None when it names none); it must hold every configured
    muscle, on its channel, measured through the config's filters."""
    path = config.controller.calibration_file
    if not path:
        return None
    try:
        calibration = Calibration.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        check_matches(calibration, config)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"calibration file {path}: {exc}") from None
    return calibration


def check_calibration_rate(config: Config, calibration: Calibration, fs_hz: float) -> None:
    """Refuse a calibration measured from EMG at another rate (another amplifier or setting), naming both."""
    if not math.isclose(calibration.sampling_rate_hz, fs_hz, rel_tol=1e-9):
        raise CalibrationError(
            f"calibration file {config.controller.calibration_file}: made from EMG at "
            f"{calibration.sampling_rate_hz:g} Hz, the EMG is at {fs_hz:g} Hz (calibrate again at this rate)"
        )


class Controller:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rt = ProcessRuntime("controller", config.endpoints.controller_control, security=config.security)
        ctx = self.rt.ctx
        self.pub = publisher(ctx, config.endpoints.command, self.rt.security)
        link_timeout_s = config.endpoints.link_timeout_ms * 1e-3
        self.emg_link = Link(
            ctx, config.endpoints.emg, [protocol.TOPICS[protocol.Kind.EMG]], link_timeout_s, self.rt.log,
            security=self.rt.security, server="acquisition",
        )
        stimulator_topics = [protocol.TOPICS[protocol.Kind.PULSES]]
        if config.controller.crank.source == "motomed":
            stimulator_topics.append(protocol.TOPICS[protocol.Kind.CRANK])
        self.pulses_link = Link(
            ctx, config.endpoints.pulses, stimulator_topics, link_timeout_s, self.rt.log,
            security=self.rt.security, server="stimulator",
        )
        self.command_seq = Sequencer()
        self.estimator: EmgEstimator | None = None
        self.last_emg_rx_s: float | None = None
        self.stimulator_heard_s: float | None = None  # last message from the stimulator
        self.newest_emg_time_s = 0.0
        self.unfinished_chunk: protocol.EmgChunk | None = None  # updated, its command not sent yet: see finish_chunk
        self.telemetry_unsynced = 0  # chunks whose LSL telemetry was dropped: the acquisition's clock was not known yet
        self.gap_until_s = 0.0
        self.commands_sent = 0
        self.latency_share = LatencyWindow()  # its part of end-to-end latency: EMG chunk received -> command sent
        self.last_command_s = float("-inf")
        self.emg_pending = False  # a processed chunk whose command has not gone out yet
        self.sent_since_tick = False
        self.n_stim = len(config.stimulation)
        # An EMG chunk must have as many columns: the muscles' and the sync channel's.
        self.channels_needed = max(*(m.emg_channel for m in config.muscles), config.controller.blanking.sync_channel) + 1
        self.laws = ChannelLaws(config)
        self.lsl_crank = (
            LslCrank(config.controller.crank) if self.laws.tracker is not None and config.controller.crank.source == "lsl" else None
        )
        self.crank_unsynced = 0  # MOTOmed readings received before the stimulator's clock offset was known
        self.intensity = np.zeros(self.n_stim, dtype=np.float32)
        self.gate_reason = np.full(self.n_stim, GateReason.NO_EMG, dtype=np.uint8)
        self.event_counts: dict[str, int] = {}
        self.pulses_unsynced = 0  # pulses received before the peer clocks were known
        self.calibration: Calibration | None = None
        self.calibration_error = ""
        try:
            self.calibration = load_calibration(config)
        except CalibrationError as exc:
            self.calibration_error = str(exc)
            self.rt.log.error("%s; every gate stays closed (NOT_CALIBRATED)", exc)
        calibration_json = json.dumps(self.calibration.to_dict()) if self.calibration else ""
        self.telemetry = self.rt.telemetry = Telemetry(config, "controller", {"calibration": calibration_json})
        self.telemetry.add_stream("activation", "Activation", [m.name for m in config.muscles], config.controller.control_rate_hz)
        self.telemetry.add_stream("gates", "GateReason", [s.name for s in config.stimulation], config.controller.control_rate_hz)
        self.telemetry.add_stream("command-latency", "Latency", ["controller_share_ms"], 0.0, unit="ms")
        self.rt.status_fields = self._status
        # Pulse times (stimulator clock) are compared with EMG sample times (acquisition clock).
        self.clocks = self.rt.sync_clocks(
            {"acquisition": config.endpoints.acquisition_control, "stimulator": config.endpoints.stimulator_control}
        )

    def _status(self) -> dict[str, Any]:
        activation = self.estimator.activation if self.estimator else np.zeros(len(self.config.muscles))
        return {
            "ready": True,
            "state": "RUNNING",
            "activation": {m.name: round(float(a), 4) for m, a in zip(self.config.muscles, activation)},
            "intensity": [round(float(x), 4) for x in self.intensity],
            "gate": [GateReason(int(r)).name for r in self.gate_reason],
            "commands_sent": self.commands_sent,
            "latency_share_ms": self.latency_share.summary_ms(),
            "emg_received": self.emg_link.counters.received,
            "pulses_received": self.pulses_link.counters.received,
            "rejected": self.emg_link.counters.rejected + self.pulses_link.counters.rejected,
            "dropped": self.emg_link.counters.dropped + self.pulses_link.counters.dropped,
            "links": {"acquisition": self.emg_link.status(), "stimulator": self.pulses_link.status()},
            "gap_samples": self.estimator.gap_samples if self.estimator else 0,
            "blanked_samples": self.estimator.blanker.blanked_samples if self.estimator and self.estimator.blanker else 0,
            "artifacts_detected": self.estimator.artifacts_detected if self.estimator else 0,
            "contaminated": [self.config.muscles[i].name for i in np.flatnonzero(self.estimator.contaminated)]
            if self.estimator
            else [],
            "events": dict(self.event_counts),
            "pulses_unsynced": self.pulses_unsynced,
            "telemetry_unsynced": self.telemetry_unsynced,
            "mwave": self.estimator.mwave.status(self.estimator.names) if self.estimator else {},
            **self.laws.status(),
            **self._crank_source_status(),
            "calibration": self.config.controller.calibration_file or "config",
            "calibration_error": self.calibration_error,
        }

    def on_pulses(self, pulses: protocol.Pulses) -> None:
        """Delivered pulses, put on the clocks of their users; dropped (and counted) until clocks are known.

        Judged on the translated times (NaN where an offset is unknown), not on an earlier look at
        the clocks: the probing thread may forget an offset in between, and a NaN pulse time raised
        in the blanker on the next chunk.
        """
        local_s = self.clocks.to_local("stimulator", pulses.time_s)
        acquisition_s = self.clocks.translate("stimulator", "acquisition", pulses.time_s)
        if not (np.isfinite(local_s).all() and np.isfinite(acquisition_s).all()):
            self.pulses_unsynced += len(pulses.time_s)
            return
        self.laws.add_pulses(local_s, pulses.channel, pulses.amplitude_ma)
        if self.estimator is not None:
            self.estimator.add_pulses(acquisition_s, pulses.channel, pulses.amplitude_ma, pulses.pulse_width_us)

    def on_crank(self, crank: protocol.Crank, received_s: float) -> None:
        """MOTOmed readings relayed by the stimulator, put on this clock; counted and dropped until it is known."""
        if not self.clocks.peers["stimulator"].known:
            self.crank_unsynced += len(crank.time_s)
            return
        self.laws.add_crank(
            self.clocks.to_local("stimulator", crank.time_s), crank.angle_deg, crank.cadence_rpm, received_s
        )

    def _crank_source_status(self) -> dict[str, Any]:
        if self.lsl_crank is not None:
            return {"crank_source": f"lsl {self.lsl_crank.query}: {self.lsl_crank.state}"}
        if self.config.controller.crank.source == "motomed":
            return {"crank_source": "motomed", "crank_unsynced": self.crank_unsynced}
        return {}

    def _refuse_calibration_at_another_rate(self, fs_hz: float) -> None:
        """Like an unreadable file, a calibration made at another EMG rate keeps every gate closed (NOT_CALIBRATED)."""
        if self.calibration is None:
            return
        try:
            check_calibration_rate(self.config, self.calibration, fs_hz)
        except CalibrationError as exc:
            self.calibration = None
            self.calibration_error = str(exc)
            self.rt.log.error("%s; every gate stays closed (NOT_CALIBRATED)", exc)

    def on_emg(self, chunk: protocol.EmgChunk, now_s: float) -> None:
        needed = self.channels_needed
        if chunk.data.shape[1] < needed:
            self.emg_link.counters.rejected += 1
            self.emg_link.counters.last_error = f"EMG has {chunk.data.shape[1]} channels, muscles and sync channel need {needed}"
            return
        self.finish_chunk()  # the previous chunk's, when its command is still held back by the rate limit
        stale_s = self.config.controller.stale_ms * 1e-3
        # A stream at another rate, or whose indices start again (the acquisition restarted): its filters,
        # contamination detector and artifact finder start afresh (they keep sample indices).
        estimator = self.estimator
        restarted = estimator is not None and (
            estimator.fs_hz != chunk.sampling_rate_hz
            or (estimator.next_index is not None and chunk.first_sample_index < estimator.next_index)
        )
        if estimator is None or restarted:
            self._refuse_calibration_at_another_rate(chunk.sampling_rate_hz)
            self.estimator = EmgEstimator(
                self.config, chunk.sampling_rate_hz, chunk.data.shape[1], self.calibration
            )
            self._open_emg_outlets(chunk.sampling_rate_hz)
        stalled = self.last_emg_rx_s is not None and now_s - self.last_emg_rx_s > stale_s
        if not self.estimator.update(chunk) or stalled or restarted:  # closed for a hold-off, as after a gap (DESIGN 4)
            self.gap_until_s = now_s + stale_s
        self.unfinished_chunk = chunk
        if self.laws.uses_mwave:
            self.finish_chunk()
        self.last_emg_rx_s = now_s
        self.newest_emg_time_s = chunk.arrival_time_s
        self.emg_pending = True

    def finish_chunk(self) -> None:
        """The work on the last chunk that no command waits for: M-waves, onsets, EMG telemetry, event markers."""
        chunk = self.unfinished_chunk
        if chunk is None:
            return
        self.unfinished_chunk = None
        estimator = self.estimator
        estimator.finish()
        measurements = estimator.mwave.take_measurements()
        for event in estimator.events:
            self.event_counts[event.kind] = self.event_counts.get(event.kind, 0) + 1
            if event.kind.startswith("contamination"):
                self.rt.log.warning("%s %s at %.3f s (acquisition clock)", event.channel, event.kind, event.time_s)
        if self.clocks.peers["acquisition"].known:
            self._publish_chunk(chunk, measurements)
        else:
            self.telemetry_unsynced += 1
        estimator.events.clear()

    def _publish_chunk(self, chunk: protocol.EmgChunk, measurements: list[Measurement]) -> None:
        """The chunk's filtered EMG, envelope, M-waves and events to LSL, on this host's clock (DESIGN 3).

        Their times are the acquisition's (EMG sample times): a recording corrects each
        outlet by its own host's clock offset, so they are put on this process's clock first.
        """
        estimator = self.estimator
        if len(estimator.envelope_uv):
            last_s = chunk.first_sample_time_s + (len(chunk.data) - 1 - estimator.delay) / chunk.sampling_rate_hz
            last_s = self.clocks.to_local("acquisition", last_s)
            self.telemetry.push("filtered-emg", estimator.filtered_uv, last_s)
            self.telemetry.push("envelope", estimator.envelope_uv, last_s)
        if measurements:  # each pulse's M-wave at the pulse time: its muscle's channel, NaN in the others
            samples = np.full((len(measurements), len(self.config.muscles)), np.nan)
            for row, measurement in enumerate(measurements):
                samples[row, measurement.muscle] = measurement.amplitude_uv
            pulse_s = np.array([m.pulse_time_s for m in measurements])
            self.telemetry.push("mwave", samples, self.clocks.to_local("acquisition", pulse_s))
        for event in estimator.events:
            self.telemetry.marker(f"{event.kind} {event.channel}", self.clocks.to_local("acquisition", event.time_s))

    def _open_emg_outlets(self, fs_hz: float) -> None:
        """LSL filtered EMG and envelope per muscle at the EMG rate (known from the first chunk), and M-waves."""
        if "envelope" not in self.telemetry.counts:
            names = [m.name for m in self.config.muscles]
            self.telemetry.add_stream("filtered-emg", "EMGFiltered", names, fs_hz, unit="microvolts")
            self.telemetry.add_stream("envelope", "EMGEnvelope", names, fs_hz, unit="microvolts")
            self.telemetry.add_stream("mwave", "MWave", names, 0.0, unit="microvolts")

    def compute(self, now_s: float) -> protocol.Command:
        """Intensities and gates from the newest activation and EMG freshness."""
        if self.config.controller.calibration_file and self.calibration is None:
            reason = GateReason.NOT_CALIBRATED
        elif not self.clocks.synchronized:
            reason = GateReason.CLOCK_UNSYNCED
        elif self.last_emg_rx_s is None or self.estimator is None:
            reason = GateReason.NO_EMG
        elif now_s - self.last_emg_rx_s > self.config.controller.stale_ms * 1e-3:
            reason = GateReason.STALE_EMG
        elif now_s < self.gap_until_s:
            reason = GateReason.GAP
        else:
            reason = GateReason.OPEN
        self.gate_reason[:] = reason
        self.laws.advance_crank(now_s)
        if reason == GateReason.OPEN:
            self.estimator.gate_reasons(self.gate_reason)
            if self._stimulator_silent(now_s):
                self.estimator.close_without_pulse_reports(self.gate_reason)
            self.laws.crank_gates(self.gate_reason)
        activation = self.estimator.activation if self.estimator is not None else None
        mwave = self.estimator.mwave.normalized if self.estimator is not None else None
        gate_open = self.gate_reason == GateReason.OPEN
        self.laws.step(now_s, activation, gate_open, self.intensity, mwave)
        return protocol.Command(self.newest_emg_time_s, self.intensity, gate_open, self.gate_reason)

    def on_stimulator_heard(self, received_s: float) -> None:
        """A message from the stimulator (pulse report, crank reading or status heartbeat) came at ``received_s``."""
        self.stimulator_heard_s = received_s

    def _stimulator_silent(self, now_s: float) -> bool:
        """Nothing from the stimulator for STIMULATOR_SILENCE_S, or ever."""
        return self.stimulator_heard_s is None or now_s - self.stimulator_heard_s > STIMULATOR_SILENCE_S

    def publish_command(self, now_s: float) -> None:
        command = self.compute(now_s)
        self.pub.send_multipart(protocol.encode(self.command_seq.next(), now_s, command))
        if self.emg_pending:  # a command for a fresh chunk: this process's share of its latency
            share_s = self.rt.clock.now() - self.last_emg_rx_s
            self.latency_share.add(share_s)
            self.telemetry.push("command-latency", [share_s * 1e3], now_s)
        for text, time_s in self.laws.take_unpublished():
            self.telemetry.marker(text, time_s)
        self.commands_sent += 1
        self.last_command_s = now_s
        self.emg_pending = False
        self.sent_since_tick = True
        self.finish_chunk()

    def poller(self) -> zmq.Poller:
        """The sockets a loop step waits on: control, EMG, pulses."""
        poller = zmq.Poller()
        for sock in (self.rt.control.sock, self.emg_link.sock, self.pulses_link.sock):
            poller.register(sock, zmq.POLLIN)
        return poller

    def step(self, poller: zmq.Poller, pacer: Pacer) -> None:
        """One loop iteration: wait for input or the next tick, take what came, send what is due."""
        rt = self.rt
        now_s = rt.clock.now()
        timeout_ms = pacer.timeout_ms(now_s)
        if self.emg_pending:  # rate-limited: due once the minimum interval has passed
            timeout_ms = min(timeout_ms, max(0.0, (self.last_command_s + MIN_COMMAND_INTERVAL_S - now_s) * 1e3))
        ready = dict(poller.poll(math.ceil(timeout_ms)))  # zmq polls whole ms: round down would spin
        if self.pulses_link.sock in ready:
            received_s = rt.clock.now()
            for message in self.pulses_link.drain(received_s):
                if isinstance(message.body, protocol.Crank):
                    self.on_crank(message.body, received_s)
                else:
                    self.on_pulses(message.body)
            if self.pulses_link.last_heard_s is not None:
                self.on_stimulator_heard(self.pulses_link.last_heard_s)
        if self.lsl_crank is not None:
            received_s = rt.clock.now()
            for time_s, angle_deg, cadence_rpm in self.lsl_crank.take():
                self.laws.add_crank(time_s, angle_deg, cadence_rpm, received_s)
        if self.emg_link.sock in ready:
            received_s = rt.clock.now()
            for message in self.emg_link.drain(received_s):
                self.on_emg(message.body, received_s)
        if rt.control.sock in ready:
            rt.control.serve_pending()
        now_s = rt.clock.now()
        self.emg_link.keep(now_s)
        self.pulses_link.keep(now_s)
        if self.emg_pending and now_s - self.last_command_s >= MIN_COMMAND_INTERVAL_S:
            self.publish_command(now_s)
        if pacer.due(now_s):
            if not self.sent_since_tick:
                self.publish_command(now_s)
            self.sent_since_tick = False
            self.telemetry.push("gates", self.gate_reason, now_s)
            if self.estimator is not None:
                self.telemetry.push("activation", self.estimator.activation, now_s)
        rt.publish_status_if_due(self.pub, now_s)

    def run(self) -> int:
        rt = self.rt
        pacer = Pacer(1.0 / self.config.controller.control_rate_hz, rt.clock.now())
        poller = self.poller()
        rt.log.info("running: %d muscles, %d stimulation channels", len(self.config.muscles), self.n_stim)
        try:
            while rt.running:
                self.step(poller, pacer)
        finally:
            rt.log.info("stopped: %d commands sent, %d overruns", self.commands_sent, pacer.overruns)
            if self.lsl_crank is not None:
                self.lsl_crank.close()
            rt.close()
        return rt.exit_code


def main(config: Config) -> int:
    return Controller(config).run()
