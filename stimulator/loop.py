"""The stimulator process: the safety kernel between commands and the driver.

Acts only on the newest fresh command; every output goes through the kernel
(clamp, ramp, gate, deadline, state). Publishes delivered pulses on ``pulses``
and to LSL, its state on ``status`` (at once on every state change). Any
exception: output to zero first, FAULT latched, then the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq

from fesloop import protocol
from fesloop.config import Config
from fesloop.lsl import configure_machine_scope, make_outlet
from fesloop.runtime import LatencyWindow, ProcessRuntime
from fesloop.sockets import ControlRefused, Sequencer, StreamCounters, drain, publisher, subscriber
from stimulator.drivers.simulated import SimulatedDriver
from stimulator.limits import DEVICES
from stimulator.safety import SafetyKernel, SafetyRefused, StimState

MAX_POLL_S = 0.005
COMMAND_RCVHWM = 10


class Stimulator:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rt = ProcessRuntime("stimulator", config.endpoints.stimulator_control, security=config.security)
        ctx = self.rt.ctx
        channels = config.stimulation
        self.kernel = SafetyKernel(channels, DEVICES[config.stimulator.driver], config.stimulator)
        self.driver = SimulatedDriver(channels)
        self.pub = publisher(ctx, config.endpoints.pulses, self.rt.security)
        self.command_sub = subscriber(
            ctx, config.endpoints.command, [protocol.TOPICS[protocol.Kind.COMMAND]], hwm=COMMAND_RCVHWM,
            security=self.rt.security, server="controller",
        )
        self.command_counters = StreamCounters()
        self.pulse_seq = Sequencer()
        self.latency = LatencyWindow()
        self.commanded_intensity = np.zeros(len(channels), dtype=np.float32)
        self._auto_arm_pending = config.stimulator.arm_at_start
        self.outlet = None
        handlers = self.rt.control.handlers
        handlers["arm"] = lambda _r: self._control(lambda: self.kernel.arm(self.rt.clock.now()))
        handlers["disarm"] = lambda _r: self._control(self.kernel.disarm)
        handlers["stop"] = lambda r: self._control(lambda: self.kernel.stop(str(r.get("reason", "stop requested"))))
        handlers["reset"] = lambda _r: self._control(self.kernel.reset)
        self.rt.status_fields = self._status

    def _control(self, action: Any) -> dict[str, Any]:
        try:
            action()
        except SafetyRefused as exc:
            raise ControlRefused(str(exc)) from None
        self._apply(self.rt.clock.now())
        return self.kernel.snapshot()

    def _status(self) -> dict[str, Any]:
        return {
            "ready": True,
            **self.kernel.snapshot(),
            "channels": [c.name for c in self.config.stimulation],
            "commanded_intensity": [round(float(x), 4) for x in self.commanded_intensity],
            "latency_ms": self.latency.summary_ms(),
            "pulses_delivered": self.driver.pulses_delivered,
            "commands_received": self.command_counters.received,
            "rejected": self.command_counters.rejected + self.kernel.rejected,
        }

    def _open_outlet(self) -> None:
        configure_machine_scope()
        self.outlet = make_outlet(
            f"{self.config.name}-pulses",
            "StimulationPulses",
            ["device_channel", "amplitude_ma", "pulse_width_us"],
            0.0,
            f"fesloop-{self.config.name}-pulses",
        )

    def _on_commands(self, now_s: float) -> None:
        for message in drain(self.command_sub, self.command_counters):
            if self.kernel.accept(message.header.seq, message.body, now_s):
                self.commanded_intensity = message.body.intensity
                if self._auto_arm_pending and self.kernel.state is StimState.DISARMED:
                    self._auto_arm_pending = False
                    self.kernel.arm(now_s)
                self._apply(now_s)
                if message.body.gate_open.any():
                    self.latency.add(self.rt.clock.now() - message.body.newest_emg_time_s)

    def _apply(self, now_s: float) -> None:
        """Kernel output to the driver, then fire what is due."""
        self.driver.set_output(self.kernel.update(now_s), now_s)
        pulses = self.driver.deliver_due(now_s)
        if pulses is not None:
            self.pub.send_multipart(protocol.encode(self.pulse_seq.next(), now_s, pulses))
            if self.outlet is not None:
                for i in range(len(pulses.channel)):
                    sample = [float(pulses.channel[i]), float(pulses.amplitude_ma[i]), float(pulses.pulse_width_us[i])]
                    self.outlet.push_sample(sample, float(pulses.time_s[i]))
        events = self.kernel.pop_events()
        for event in events:
            self.rt.log.warning("%s", event)
        if events:
            self.pub.send_multipart(protocol.encode(self.rt.status_seq.next(), now_s, protocol.Status(self.rt.status())))

    def _step(self, poller: zmq.Poller) -> None:
        rt = self.rt
        now_s = rt.clock.now()
        timeout_s = min(MAX_POLL_S, max(0.0, self.driver.next_event_s() - now_s))
        ready = dict(poller.poll(timeout_s * 1e3))
        now_s = rt.clock.now()
        if self.command_sub in ready:
            self._on_commands(now_s)
        if rt.control.sock in ready:
            rt.control.serve_pending()
        self._apply(rt.clock.now())
        rt.publish_status_if_due(self.pub, rt.clock.now())

    def run(self) -> int:
        rt = self.rt
        if self.config.acquisition.lsl:
            self._open_outlet()
        poller = zmq.Poller()
        poller.register(rt.control.sock, zmq.POLLIN)
        poller.register(self.command_sub, zmq.POLLIN)
        rt.log.info("running: %s driver, state %s", self.config.stimulator.driver, self.kernel.state.value)
        try:
            while rt.running:
                try:
                    self._step(poller)
                except Exception as exc:
                    self.driver.zero()
                    self.kernel.fault(f"internal error: {exc!r}")
                    rt.log.exception("internal error: output set to zero, FAULT latched")
        finally:
            self.driver.zero()
            if self.kernel.state is StimState.ARMED:
                self.kernel.disarm()
            rt.log.info("stopped: output zero, %d pulses delivered", self.driver.pulses_delivered)
            rt.close()
        return rt.exit_code


def main(config: Config) -> int:
    return Stimulator(config).run()
