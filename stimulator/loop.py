"""The stimulator process: the safety kernel between commands and the driver.

Acts only on the newest fresh command; every output goes through the kernel
(clamp, ramp, gate, deadline, state). Publishes delivered pulses on ``pulses``
and to LSL, its state on ``status`` and as an LSL marker (type ``Markers``) at
once on every state change. Any exception: output to zero first, FAULT latched,
then the report. The device keep-alive goes out only right after a fresh command.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import zmq

from fesloop import protocol
from fesloop.config import Config
from fesloop.runtime import HOLD_AUTO_ARM_ENV, LatencyWindow, ProcessRuntime, setup_logging
from fesloop.session import ConfirmationMissing, check_confirmation, printable
from fesloop.sockets import ControlRefused, Link, Sequencer, publisher
from fesloop.telemetry import Telemetry
from stimulator.drivers.base import Driver, DriverFault
from stimulator.dose import DoseTracker
from stimulator.drivers.simulated import SimulatedDriver
from stimulator.limits import DEVICES
from stimulator.mapping import modulate
from stimulator.safety import SafetyKernel, SafetyRefused, StimState

MAX_POLL_S = 0.005
COMMAND_RCVHWM = 10


def open_driver(config: Config, clock: Any) -> Driver:
    """The configured output device (DriverFault if it cannot be opened)."""
    if config.stimulator.driver == "rehastim2":
        from stimulator.drivers.rehastim2 import RehaStim2Driver, SerialLink

        return RehaStim2Driver(config.stimulation, SerialLink(config.stimulator.serial_port), clock)
    return SimulatedDriver(config.stimulation)


class Stimulator:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rt = ProcessRuntime("stimulator", config.endpoints.stimulator_control, security=config.security)
        ctx = self.rt.ctx
        channels = config.stimulation
        self.kernel = SafetyKernel(channels, DEVICES[config.stimulator.driver], config.stimulator)
        self.device = DEVICES[config.stimulator.driver]
        self._pulse_width_us = np.array([c.pulse_width_us for c in channels], dtype=np.float64)
        self._pulse_width_modulated = np.array([c.modulation == "pulse_width" for c in channels], dtype=bool)
        self.driver = open_driver(config, self.rt.clock.now)
        self.pub = publisher(ctx, config.endpoints.pulses, self.rt.security)
        self.command_link = Link(
            ctx, config.endpoints.command, [protocol.TOPICS[protocol.Kind.COMMAND]],
            config.endpoints.link_timeout_ms * 1e-3, self.rt.log, hwm=COMMAND_RCVHWM,
            security=self.rt.security, server="controller",
        )
        self.pulse_seq = Sequencer()
        self.crank_seq = Sequencer()
        self.latency = LatencyWindow()  # end to end: EMG reached acquisition -> update handed to the driver
        self.latency_share = LatencyWindow()  # its part: command received -> update handed to the driver
        self.commanded_intensity = np.zeros(len(channels), dtype=np.float32)
        self._auto_arm_pending = config.stimulator.arm_at_start and not os.environ.get(HOLD_AUTO_ARM_ENV)
        self.dose = DoseTracker(channels, config.stimulator.dose)
        self._session_events: list[str] = []
        self.amplitude_ma = np.zeros(len(channels))
        self.handed_s = 0.0  # when the last update was handed to the driver
        self.telemetry = self.rt.telemetry = Telemetry(config, "stimulator")
        # EMG age is judged on this clock: the acquisition host's offset puts its stamps here.
        self.acquisition_clock = self.rt.sync_clocks({"acquisition": config.endpoints.acquisition_control}).peers[
            "acquisition"
        ]
        handlers = self.rt.control.handlers
        handlers["arm"] = lambda r: self._control(lambda: self._arm(r))
        handlers["override_dose"] = lambda r: self._control(lambda: self._override_dose(r))
        handlers["disarm"] = lambda _r: self._control(self.kernel.disarm)
        handlers["stop"] = lambda r: self._control(lambda: self.kernel.stop(_stop_reason(r)))
        handlers["reset"] = lambda _r: self._control(self.kernel.reset)
        self.rt.status_fields = self._status

    def _arm(self, request: dict[str, Any]) -> None:
        """Arm; a real device also needs the operator's confirmation record in the request."""
        markers: list[str] = []
        if self.config.stimulator.driver != "simulated":
            try:
                markers = check_confirmation(request.get("confirmation")).markers()
            except ConfirmationMissing as exc:
                raise SafetyRefused(str(exc)) from None
        if not self.driver.ready():
            raise SafetyRefused(f"device not ready: {self.driver.status()}")
        self.kernel.arm(self.rt.clock.now())
        self._session_events.extend(markers)

    def _override_dose(self, request: dict[str, Any]) -> None:
        """Lift a reached dose limit for one channel: only with an operator and a reason, on record."""
        channel = request.get("channel")
        operator, reason = (
            printable(value) if isinstance(value, str) else "" for value in (request.get("operator"), request.get("reason"))
        )
        if channel not in self.dose.names:
            raise SafetyRefused(f"override_dose: channel must be one of {self.dose.names}, got {channel!r}")
        if not operator or not reason:
            raise SafetyRefused("override_dose needs the operator's name and a reason, both on record")
        if not self.dose.exhausted[self.dose.names.index(channel)]:  # else each call would restart its allowance
            raise SafetyRefused(f"override_dose: {channel} has reached no dose limit, there is nothing to lift")
        self.dose.override(channel, self.rt.clock.now())
        self._session_events.append(f"dose limit overridden for {channel} by {operator}: {reason}")

    def _control(self, action: Any) -> dict[str, Any]:
        """An operator's request; it also ends a pending ``arm_at_start`` (after stop and reset, only an arm arms)."""
        self._auto_arm_pending = False
        try:
            action()
            self._apply(self.rt.clock.now())
        except SafetyRefused as exc:
            raise ControlRefused(str(exc)) from None
        except Exception as exc:
            self._fail(exc)
            raise ControlRefused(f"FAULT: {self.kernel.fault_reason}") from None
        return self.kernel.snapshot()

    def _fail(self, exc: Exception) -> None:
        """Output to zero first, then FAULT naming the cause, then the report."""
        reason = str(exc) if isinstance(exc, DriverFault) else f"internal error: {exc!r}"
        try:
            self.driver.zero()
        except Exception as zero_exc:  # zero() must not raise; if it does, say so in the FAULT
            reason += f"; zeroing the driver failed: {zero_exc!r}"
        self.kernel.fault(reason)
        self.rt.log.error("output set to zero, FAULT latched: %s", reason)
        self._publish_events(self.rt.clock.now())

    def _status(self) -> dict[str, Any]:
        return {
            "ready": True,
            **self.kernel.snapshot(),
            "channels": [c.name for c in self.config.stimulation],
            "commanded_intensity": [round(float(x), 4) for x in self.commanded_intensity],
            "latency_ms": self.latency.summary_ms(),
            "latency_share_ms": self.latency_share.summary_ms(),
            "pulses_delivered": self.driver.pulses_delivered,
            "dose": self.dose.summary(),
            "session_start_s": self.dose.session_start_s,
            "skin_check_due": self.dose.skin_check_due,
            "device": self.driver.status(),
            "commands_received": self.command_link.counters.received,
            "rejected": self.command_link.counters.rejected + self.kernel.rejected,
            "dropped": self.command_link.counters.dropped,
            "links": {"controller": self.command_link.status()},
        }

    def _open_outlets(self) -> None:
        """LSL: delivered pulses, commanded intensity and delivered amplitude per command, latency."""
        names = [c.name for c in self.config.stimulation]
        self.telemetry.add_stream("pulses", "StimulationPulses", ["device_channel", "amplitude_ma", "pulse_width_us"], 0.0)
        labels = [f"{n}_intensity" for n in names] + [f"{n}_amplitude_ma" for n in names]
        self.telemetry.add_stream("stimulation", "StimulationIntensity", labels, 0.0)
        self.telemetry.add_stream("latency", "Latency", ["e2e_latency_ms", "stimulator_share_ms"], 0.0, unit="ms")

    def _on_commands(self, now_s: float) -> None:
        """Accept what queued up, then act once, on the newest accepted command."""
        newest = None
        for message in self.command_link.drain(now_s):
            if self.kernel.accept(message.header.seq, message.body, now_s, self.acquisition_clock.offset_s):
                newest = message.body
        if newest is not None:
            self.commanded_intensity = newest.intensity
            if self._auto_arm_pending and not self.kernel.arm_refusal(now_s):
                self._auto_arm_pending = False
                self.kernel.arm(now_s)
        self._apply(now_s)
        handed_s = self.handed_s
        if newest is None:
            return
        self.telemetry.push("stimulation", np.concatenate((self.commanded_intensity, self.amplitude_ma)), now_s)
        if self.kernel.state is StimState.ARMED or self.kernel.state is StimState.DISARMED:
            self.driver.keep_alive(now_s)
        if newest.gate_open.any() and self.acquisition_clock.known:
            latency_s = handed_s - self.acquisition_clock.to_local(newest.newest_emg_time_s)
            self.latency.add(latency_s)
            self.latency_share.add(handed_s - now_s)
            self.telemetry.push("latency", [latency_s * 1e3, (handed_s - now_s) * 1e3], now_s)

    def _apply(self, now_s: float) -> None:
        """Kernel output to the driver (``handed_s``: where end-to-end latency ends), then the
        dose accounting (its limits act from the next update on) and the pulses that are due."""
        output_ma = self.kernel.update(now_s)
        amplitude_ma, pulse_width_us = modulate(
            output_ma, self.kernel.clamp_ma, self._pulse_width_us, self._pulse_width_modulated, self.device
        )
        self.driver.set_output(amplitude_ma, pulse_width_us, now_s)
        self.handed_s = self.rt.clock.now()
        self.amplitude_ma = amplitude_ma
        if self.kernel.state is StimState.ARMED:
            self.dose.start_session(now_s)
        self._session_events.extend(self.dose.update(now_s, output_ma))
        self.kernel.dose_locked[:] = self.dose.exhausted
        pulses = self.driver.deliver_due(now_s)
        if pulses is not None:
            self.dose.on_pulses(pulses.channel, pulses.amplitude_ma, pulses.pulse_width_us)
            self.pub.send_multipart(protocol.encode(self.pulse_seq.next(), now_s, pulses))
            self.telemetry.push(
                "pulses", np.column_stack((pulses.channel, pulses.amplitude_ma, pulses.pulse_width_us)), pulses.time_s
            )
        crank = self.driver.take_crank()
        if crank is not None:
            self.pub.send_multipart(protocol.encode(self.crank_seq.next(), now_s, crank))
        self._publish_events(now_s)

    def _publish_events(self, now_s: float) -> None:
        """Each state change or session event: logged, as an LSL marker, and a status message at once."""
        events = self.kernel.pop_events() + self._session_events
        self._session_events = []
        for event in events:
            self.rt.log.warning("%s", event)
            self.telemetry.marker(event, now_s)
        if events:
            self.pub.send_multipart(protocol.encode(self.rt.status_seq.next(), now_s, protocol.Status(self.rt.status())))

    def step(self, poller: zmq.Poller) -> None:
        """One loop iteration: wait for commands or the next pulse, then update the output once."""
        rt = self.rt
        now_s = rt.clock.now()
        timeout_s = min(MAX_POLL_S, max(0.0, self.driver.next_event_s() - now_s))
        # zmq polls whole milliseconds: round up, or the last millisecond before a pulse spins.
        ready = dict(poller.poll(math.ceil(timeout_s * 1e3)))
        now_s = rt.clock.now()
        if self.command_link.sock in ready:
            self.kernel.check_deadline(now_s)  # on the time now, before reading what queued up
            self._on_commands(now_s)  # applies once
        else:
            self._apply(now_s)
        self.command_link.keep(now_s)
        if rt.control.sock in ready:
            rt.control.serve_pending()  # each handler applies its change at once
        rt.publish_status_if_due(self.pub, rt.clock.now())

    def poller(self) -> zmq.Poller:
        """The sockets a loop step waits on: control, commands."""
        poller = zmq.Poller()
        poller.register(self.rt.control.sock, zmq.POLLIN)
        poller.register(self.command_link.sock, zmq.POLLIN)
        return poller

    def run(self) -> int:
        rt = self.rt
        if self.config.acquisition.lsl:
            self._open_outlets()
        poller = self.poller()
        rt.log.info("running: %s driver, state %s", self.config.stimulator.driver, self.kernel.state.value)
        try:
            while rt.running:
                try:
                    self.step(poller)
                except Exception as exc:
                    self._fail(exc)
                    if not isinstance(exc, DriverFault):
                        rt.log.exception("internal error")
        finally:
            self.driver.close()
            if self.kernel.state is StimState.ARMED:
                self.kernel.disarm()
            rt.log.info("stopped: output zero, %d pulses delivered", self.driver.pulses_delivered)
            rt.close()
        return rt.exit_code


def main(config: Config) -> int:
    try:
        stimulator = Stimulator(config)
    except DriverFault as exc:
        setup_logging("stimulator").error("cannot open the %s driver: %s", config.stimulator.driver, exc)
        return 1
    return stimulator.run()


def _stop_reason(request: dict[str, Any]) -> str:
    """A stop's reason as the record can carry it; a stop is never refused for its text."""
    return printable(request.get("reason", "")) or "stop requested"
