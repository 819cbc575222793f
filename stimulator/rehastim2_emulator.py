"""A RehaStim2 emulator following the ScienceMode2 protocol description v1.24, over a pty.

:class:`RehaStim2Emulator` is the device's behaviour, fed bytes and time (no I/O):
Init every 500 ms until InitAck; acks with the documented result codes; parameter
checks (-2), wrong mode (-3), transfer errors (-1) on a bad checksum or length,
UnknownCommand for commands it does not implement (MOTOmed); the continuous channel
list repeated every main interval, each channel in its 1.5 ms slot, low-frequency
channels skipping lists; its 1200 ms watchdog (no valid packet -> stimulation
stopped, all modes reset, Init again); injected StimulationErrors (-1/-2/-3) and
lost acks. Pulses it "delivers" are kept with their times, so tests see the output.
With a MOTOmed attached (:class:`EmulatedMotomed`, a motor turning the crank at a
set cadence), it sends ActualValues every 20 ms once connected.

Where the PDF is silent the emulator takes the cautious reading: StopChannelListMode
returns to start mode (a new InitChannelListMode is needed), and commands before
the handshake are ignored.

:class:`PtyEmulator` runs one on a pseudo-terminal in a thread: open its ``path``
with pyserial like a real port. ``fesloop emulate rehastim2`` runs one by hand.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import select
import signal
import threading
import time
import tty
from dataclasses import dataclass
from types import TracebackType

from stimulator import sciencemode2 as sm2
from stimulator.sciencemode2 import Cmd, StimulationMode

INIT_REPETITION_S = 0.5
WATCHDOG_TIMEOUT_S = 1.2
PROTOCOL_VERSION = 1  # the PDF gives no number; the driver accepts any
ACTUAL_VALUES_INTERVAL_S = 0.020
_ACK_OF = {
    Cmd.GET_STIMULATION_MODE: Cmd.GET_STIMULATION_MODE_ACK,
    Cmd.INIT_CHANNEL_LIST_MODE: Cmd.INIT_CHANNEL_LIST_MODE_ACK,
    Cmd.START_CHANNEL_LIST_MODE: Cmd.START_CHANNEL_LIST_MODE_ACK,
    Cmd.STOP_CHANNEL_LIST_MODE: Cmd.STOP_CHANNEL_LIST_MODE_ACK,
    Cmd.SINGLE_PULSE: Cmd.SINGLE_PULSE_ACK,
}


@dataclass(frozen=True)
class EmulatedPulse:
    time_s: float
    channel: int  # 0-based (bit index); the device calls it channel + 1
    current_ma: int
    pulse_width_us: int


@dataclass
class EmulatedMotomed:
    """A MOTOmed whose motor turns the crank at ``cadence_rpm`` (settable) with ``torque_nm`` on it."""

    cadence_rpm: float = 40.0
    torque_nm: float = 0.0
    angle_deg: float = 0.0
    time_s: float | None = None

    def advance(self, now_s: float) -> sm2.ActualValues:
        """The crank at ``now_s``, as the device reports it (whole degrees and rpm, torque in dNm)."""
        if self.time_s is not None:
            self.angle_deg = (self.angle_deg + 6.0 * self.cadence_rpm * (now_s - self.time_s)) % 360.0
        self.time_s = now_s
        return sm2.ActualValues(int(self.angle_deg) % 360, round(self.cadence_rpm), round(self.torque_nm * 10))


class RehaStim2Emulator:
    """The device side of ScienceMode2; ``receive`` and ``tick`` fill ``outbox``."""

    def __init__(self, motomed: EmulatedMotomed | None = None) -> None:
        self.decoder = sm2.Decoder()
        self.outbox = bytearray()
        self.connected = False
        self.mode = StimulationMode.START
        self.channel_list: sm2.ChannelListInit | None = None
        self.settings: list[sm2.ChannelSetting] = []
        self.pulses: collections.deque[EmulatedPulse] = collections.deque(maxlen=200_000)
        self.events: list[tuple[float, str]] = []
        self.commands: list[sm2.Packet] = []  # every valid packet received, in order
        self.drop_acks = False  # injected: lost responses
        self.transfer_errors = 0
        self.last_valid_s = -math.inf
        self._next_init_s = -math.inf
        self._number = 0
        self._first_list_s = math.inf
        self._next_list = 0
        self.motomed = motomed
        self.actual_values: collections.deque[tuple[float, sm2.ActualValues]] = collections.deque(maxlen=200_000)
        self._next_actual_s = -math.inf

    @property
    def stimulating(self) -> bool:
        return self.mode is StimulationMode.STARTED

    # -- input ------------------------------------------------------------------------------

    def receive(self, data: bytes, now_s: float) -> None:
        self.tick(now_s)  # pulses and watchdog up to the arrival
        for item in self.decoder.feed(data):
            if isinstance(item, sm2.Packet):
                self.last_valid_s = now_s
                self.commands.append(item)
                self._on_packet(item, now_s)
            elif item.command in _ACK_OF and item.number is not None:
                self.transfer_errors += 1  # "the response (Ack) is sent with the transfer error code"
                self._ack(item.number, Cmd(item.command), -1)

    def tick(self, now_s: float) -> None:
        """Deliver due channel lists, run the watchdog, repeat Init while unconnected."""
        self._deliver(now_s)
        if self.connected and now_s - self.last_valid_s > WATCHDOG_TIMEOUT_S:
            self._stop(self.last_valid_s + WATCHDOG_TIMEOUT_S, "watchdog: no valid packet for 1200 ms")
            self.connected = False
            self.mode = StimulationMode.START
            self.channel_list = None
        if not self.connected and now_s >= self._next_init_s:
            self._send(self._own_number(), Cmd.INIT, bytes((PROTOCOL_VERSION,)))
            self._next_init_s = now_s + INIT_REPETITION_S
        if self.motomed is not None and self.connected and now_s >= self._next_actual_s:
            reading = self.motomed.advance(now_s)
            self.actual_values.append((now_s, reading))
            self._send(self._own_number(), Cmd.ACTUAL_VALUES, reading.to_bytes())
            following_s = self._next_actual_s + ACTUAL_VALUES_INTERVAL_S  # on the 20 ms grid, unless it fell behind
            self._next_actual_s = following_s if following_s > now_s else now_s + ACTUAL_VALUES_INTERVAL_S

    def inject_stimulation_error(self, code: int, now_s: float) -> None:
        """Emergency switch (-1), electrode (-2) or module (-3) error: stop, start mode, report."""
        if code not in sm2.STIMULATION_ERROR_TEXT:
            raise ValueError(f"StimulationError code {code} is not -1, -2 or -3")
        self._stop(now_s, f"StimulationError {code}: {sm2.STIMULATION_ERROR_TEXT[code]}")
        self.mode = StimulationMode.START  # start mode: the channel list must be initialized again
        self.channel_list = None
        self._send(self._own_number(), Cmd.STIMULATION_ERROR, bytes((sm2.to_byte(code),)))

    # -- protocol ---------------------------------------------------------------------------

    def _own_number(self) -> int:
        number, self._number = self._number, (self._number + 1) % 256
        return number

    def _send(self, number: int, command: int, data: bytes = b"") -> None:
        self.outbox += sm2.encode(number, command, data)

    def _ack(self, number: int, command: Cmd, result: int, extra: bytes = b"") -> None:
        if not self.drop_acks:
            self._send(number, _ACK_OF[command], bytes((sm2.to_byte(result),)) + (extra if result == 0 else b""))

    def _on_packet(self, packet: sm2.Packet, now_s: float) -> None:
        command, number = packet.command, packet.number
        if command == Cmd.INIT_ACK:
            if packet.data[:1] == b"\x00" and not self.connected:
                self.connected = True
                self.events.append((now_s, "connected"))
            return
        if not self.connected:
            return
        if command == Cmd.WATCHDOG:
            return
        if command not in _ACK_OF:
            self._send(number, Cmd.UNKNOWN_COMMAND, bytes((command,)))
            return
        cmd = Cmd(command)
        try:
            result, extra = self._execute(cmd, packet.data, now_s)
        except sm2.ParameterError as exc:
            self.events.append((now_s, f"{cmd.name}: parameter error: {exc}"))
            result, extra = -2, b""
        self._ack(number, cmd, result, extra)

    def _execute(self, cmd: Cmd, data: bytes, now_s: float) -> tuple[int, bytes]:
        if cmd is Cmd.GET_STIMULATION_MODE:
            return 0, bytes((self.mode,))
        if cmd is Cmd.STOP_CHANNEL_LIST_MODE:
            self._stop(now_s, "StopChannelListMode")
            self.mode = StimulationMode.START
            self.channel_list = None
            return 0, b""
        if cmd is Cmd.INIT_CHANNEL_LIST_MODE:
            if self.mode is StimulationMode.STARTED:
                return -3, b""
            self.channel_list = sm2.ChannelListInit.from_bytes(data)
            self.mode = StimulationMode.INITIALIZED
            return 0, b""
        if cmd is Cmd.START_CHANNEL_LIST_MODE:
            if self.channel_list is None:
                return -3, b""
            settings = sm2.parse_start_data(data, len(self.channel_list.channels))
            groups = 1 + max(s.mode for s in settings)
            if self.channel_list.main_interval_code and self.channel_list.main_interval_ms < groups * self.channel_list.inter_pulse_ms:
                raise sm2.ParameterError("main interval shorter than pulse groups x inter pulse interval")
            self.settings = settings
            if self.mode is not StimulationMode.STARTED:
                self.mode = StimulationMode.STARTED
                self._first_list_s, self._next_list = now_s, 0
                self.events.append((now_s, "stimulation started"))
            if not self.channel_list.main_interval_code:  # one shot: this list only
                self._deliver(now_s)
            return 0, b""
        # SINGLE_PULSE: channel, pulse width MSB, LSB, current
        if len(data) != 4:
            raise sm2.ParameterError(f"SinglePulse has 4 data bytes, got {len(data)}")
        if self.mode is StimulationMode.STARTED:
            return -3, b""
        channel, width, current = data[0], (data[1] << 8) | data[2], data[3]
        if channel > 7 or width > sm2.MAX_PULSE_WIDTH_US or current > sm2.MAX_CURRENT_MA:
            raise sm2.ParameterError(f"SinglePulse channel {channel}, {width} us, {current} mA out of range")
        self.pulses.append(EmulatedPulse(now_s, channel, current, max(width, sm2.MIN_PULSE_WIDTH_US)))
        return 0, b""

    def _stop(self, at_s: float, why: str) -> None:
        if self.mode is StimulationMode.STARTED:
            self._deliver(at_s)
            self.events.append((at_s, f"stimulation stopped: {why}"))
        self.mode = StimulationMode.INITIALIZED if self.channel_list else StimulationMode.START
        self._first_list_s = math.inf

    def _deliver(self, now_s: float) -> None:
        """Pulses of every list that started by ``now_s``."""
        init = self.channel_list
        if init is None or self.mode is not StimulationMode.STARTED or math.isinf(self._first_list_s):
            return
        one_shot = init.main_interval_code == 0
        period_s = init.main_interval_ms / 1e3
        channels = init.channels
        while self._first_list_s + self._next_list * period_s <= now_s:
            start_s = self._first_list_s + self._next_list * period_s
            for slot, (channel, setting) in enumerate(zip(channels, self.settings)):
                low = init.low_frequency_mask >> channel & 1
                if low and self._next_list % (init.low_frequency_factor + 1):
                    continue
                if setting.current_ma > 0:
                    t = start_s + slot * sm2.SLOT_MS / 1e3
                    self.pulses.append(EmulatedPulse(t, channel, setting.current_ma, setting.pulse_width_us))
            self._next_list += 1
            if one_shot:
                self._first_list_s = math.inf
                return


class PtyEmulator:
    """A :class:`RehaStim2Emulator` answering on a pseudo-terminal, served by a thread.

    Use ``with emulator.lock:`` to read or poke ``emulator.device`` from another thread.
    """

    def __init__(self, device: RehaStim2Emulator | None = None, period_s: float = 0.0005) -> None:
        self.device = device or RehaStim2Emulator()
        self.lock = threading.Lock()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing, before anyone opens the port
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._period_s = period_s
        self._pending = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehastim2-emulator", daemon=True)
        self._thread.start()

    def __enter__(self) -> PtyEmulator:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def inject_line_bytes(self, data: bytes) -> None:
        """Raw bytes on the line towards the host (noise, a broken frame)."""
        with self.lock:
            self.device.outbox += data

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._master], [], [], self._period_s)
            data = b""
            if readable:
                try:
                    data = os.read(self._master, 4096)
                except (BlockingIOError, OSError):
                    data = b""
            with self.lock:
                now_s = time.monotonic()
                if data:
                    self.device.receive(data, now_s)
                self.device.tick(now_s)
                self._pending += self.device.outbox
                self.device.outbox.clear()
            if self._pending:
                try:
                    written = os.write(self._master, self._pending)
                    del self._pending[:written]
                except (BlockingIOError, OSError):
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", choices=["rehastim2"], help="the device to emulate")
    parser.add_argument("--error", type=int, choices=[-1, -2, -3], help="inject this StimulationError ...")
    parser.add_argument("--after", type=float, default=5.0, metavar="S", help="... S seconds after stimulation starts")
    parser.add_argument("--motomed-rpm", type=float, metavar="RPM",
                        help="attach a MOTOmed turning at RPM: ActualValues every 20 ms")


def main(args: argparse.Namespace) -> int:
    """Run an emulator until Ctrl+C, printing its pty path and what it does."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    motomed = EmulatedMotomed(args.motomed_rpm) if args.motomed_rpm is not None else None
    with PtyEmulator(RehaStim2Emulator(motomed)) as emulator:
        print(f"RehaStim2 emulator on {emulator.path} (set stimulator.serial_port to it); Ctrl+C stops", flush=True)
        shown = 0
        try:
            while not stop.wait(0.1):
                with emulator.lock:
                    device = emulator.device
                    events = device.events[shown:]
                    started = [t for t, what in device.events if what == "stimulation started"]
                    if args.error is not None and started and device.stimulating and time.monotonic() - started[-1] >= args.after:
                        device.inject_stimulation_error(args.error, time.monotonic())
                        args.error = None
                for t, what in events:
                    print(f"{t:.3f} {what}", flush=True)
                shown += len(events)
        except KeyboardInterrupt:
            pass
    return 0
