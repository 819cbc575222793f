"""Hasomed RehaStim2 over USB serial, ScienceMode2 continuous channel list mode.

Runs inside the stimulator loop's single thread and never blocks: reads take what
is waiting, writes are bounded (a packet not gone within ``WRITE_TIMEOUT_S`` plus twice
its time on the line has failed), and one command is in flight at a time (a cut to
zero pre-empts it); its ack must come within 100 ms (MaxResponseTime) of its write or
the driver raises :class:`DriverFault`. A refused command leaves the device as it was:
a refused Stop goes out again, and after three refusals the driver falls silent so the
device's watchdog stops it. It sends nothing on
its own but one Stop when it starts (a device still stimulating from before a restart
of the stimulator stops at once): commands go out when the output changes,
``Watchdog`` only from :meth:`keep_alive` (called after a fresh command), and
``InitAck`` in answer to the device's ``Init``. So when the loop dies, the device's 1200 ms watchdog stops
stimulation.

Session: the device sends Init (every 500 ms until answered) -> InitAck. Output
above zero -> InitChannelListMode (the timing of :mod:`stimulator.channel_list`),
then StartChannelListMode with every channel's current and pulse width; changes ->
StartChannelListMode again (it also updates); all channels zero -> StopChannelListMode,
after which the device's mode is asked (GetStimulationMode) before starting again.
A StimulationError, a refused command, an ack timeout, an unexpected Init while
stimulating or a link error -> DriverFault naming the cause and the channels. Bytes
from the device that fail their check while it may stimulate could be a StimulationError:
as section 5.3 asks, its mode is then asked (GetStimulationMode), and a device found
stopped is a DriverFault too. After
an ack timeout the driver falls silent until the device, reset by its own watchdog,
sends Init again; meanwhile it counts the device as stopped, so pulses the device
may deliver until its watchdog fires (up to 1.2 s) are not published, nor counted in
the dose. (Silent after refused Stops, it keeps counting them: the device answered.)

A MOTOmed on the RehaStim2 sends ActualValues (crank angle, speed, torque) every
20 ms on its own; the driver keeps each reading with the time it was read, for the
loop to relay as ``crank`` messages (:meth:`take_crank`). A malformed reading is
counted and dropped.

Published pulses follow the channel-list timing the device was given: list k starts
at (first Start ack read, not before that Start was written) + k * t1, each channel in
its 1.5 ms slot; parameters apply from when their ack was read.
"""

from __future__ import annotations

import math
import os
import select
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from fesloop import protocol
from fesloop.config import StimulationChannel
from stimulator import sciencemode2 as sm2
from stimulator.channel_list import plan_channel_list
from stimulator.drivers.base import DriverFault

T = TypeVar("T")

BAUD_RATE = 460800
BITS_PER_BYTE = 11  # 8E1: start, 8 data, parity, stop
ACK_TIMEOUT_S = 0.100  # MaxResponseTime
KEEP_ALIVE_AFTER_S = 0.25  # a Watchdog goes out if nothing was sent for this long (device: 1.2 s)
WRITE_TIMEOUT_S = 0.010  # besides twice a packet's time on the line (< 130 bytes: < 3.1 ms at 460800 baud)
READ_CHUNK_BYTES = 4096
MAX_LISTS_PER_CALL = 256  # pulses published per call at most, if the loop was late
MAX_CRANK_READINGS = 256  # kept until taken (5 s of ActualValues): older ones are dropped
MAX_REFUSED_STOPS = 3  # then the driver falls silent, so the device's own watchdog stops it


class Link(Protocol):
    """A byte transport to the device (a serial port, or anything that behaves like one)."""

    def read_available(self) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class SerialLink:
    """The RehaStim2 serial port: 460800 baud 8E1, no flow control, low latency if the OS offers it."""

    def __init__(self, port: str) -> None:
        import serial

        self._serial_exception = serial.SerialException
        try:
            self.port = serial.Serial(
                port,
                BAUD_RATE,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_EVEN,
                stopbits=serial.STOPBITS_ONE,
                timeout=0,
                write_timeout=WRITE_TIMEOUT_S,
                exclusive=True,
            )
        except (OSError, ValueError, serial.SerialException) as exc:
            raise DriverFault(f"cannot open serial port {port!r}: {exc}") from exc
        try:  # Linux: ASYNC_LOW_LATENCY (the FTDI latency timer at 1 ms); a pty has none
            self.port.set_low_latency_mode(True)
            self.low_latency = True
        except (AttributeError, NotImplementedError, OSError, ValueError):
            self.low_latency = False

    def read_available(self) -> bytes:
        try:
            return self.port.read(READ_CHUNK_BYTES)
        except (OSError, self._serial_exception) as exc:
            raise DriverFault(f"serial read failed: {exc}") from exc

    def write(self, data: bytes) -> None:
        """All of ``data``, or DriverFault if it has not gone within its deadline: WRITE_TIMEOUT_S plus
        twice its time on the line (a port that takes nothing, or trickles, fails; the loop is bounded).

        POSIX: on the port's non-blocking descriptor, failing only when a write attempt made after
        the deadline still leaves bytes. pyserial's own timeout fails a write that completed if the
        process was descheduled 10 ms inside the call ("Write timeout": a FAULT on a loaded host).
        Windows: pyserial's, timed by the driver's I/O.
        """
        if os.name != "posix":
            self._write_pyserial(data)
            return
        try:
            fd = self.port.fileno()
        except self._serial_exception as exc:  # closed
            raise DriverFault(f"serial write failed: {exc}") from exc
        rest = memoryview(data)
        allowed_s = WRITE_TIMEOUT_S + 2 * len(data) * BITS_PER_BYTE / BAUD_RATE
        deadline_s = time.monotonic() + allowed_s
        while rest:
            expired = time.monotonic() >= deadline_s  # read first: a last try always follows the deadline
            try:
                rest = rest[os.write(fd, rest):]
            except BlockingIOError:
                pass
            except OSError as exc:
                raise DriverFault(f"serial write failed: {exc}") from exc
            if not rest:
                return
            if expired:
                raise DriverFault(
                    f"serial write timed out: {len(data) - len(rest)} of {len(data)} bytes written in "
                    f"{allowed_s * 1e3:.0f} ms"
                )
            select.select([], [fd], [], max(0.0, deadline_s - time.monotonic()))

    def _write_pyserial(self, data: bytes) -> None:
        try:
            written = self.port.write(data)
        except (OSError, self._serial_exception) as exc:
            raise DriverFault(f"serial write failed: {exc}") from exc
        if written != len(data):
            raise DriverFault(f"serial write incomplete: {written} of {len(data)} bytes")

    def close(self) -> None:
        self.port.close()


@dataclass(frozen=True)
class _InFlight:
    number: int
    command: sm2.Cmd
    sent_s: float
    settings: tuple[sm2.ChannelSetting, ...] = ()


class RehaStim2Driver:
    """The stimulator loop's view of one RehaStim2 (implements ``Driver``)."""

    def __init__(
        self,
        channels: Sequence[StimulationChannel],
        link: Link,
        clock: Callable[[], float],
    ) -> None:
        """``clock``: the loop's (its ``now_s`` values): write times and ack timeouts compare with them."""
        self.link = link
        self.clock = clock
        self.plan = plan_channel_list(channels)
        self.names = [c.name for c in channels]
        self.device_channel = np.array([c.device_channel for c in channels], dtype=np.uint16)
        self.decoder = sm2.Decoder()
        self.connected = False
        self.silent_reason = ""  # set after an ack timeout: say nothing until the device sends Init
        self.link_lost = ""  # set when the port fails (cable pulled): closed for good, restart to reopen
        self.mode: sm2.StimulationMode | None = None  # None: stopped, set-up unknown
        self.protocol_version: int | None = None
        self._in_flight: _InFlight | None = None
        self._mode_in_doubt = False  # garbled bytes came while it may stimulate: ask its mode
        self._number = 0
        self.last_sent_s = -math.inf
        n = len(channels)
        self._want_ma = np.zeros(n, dtype=np.int64)
        self._want_pw_us = np.array([int(c.pulse_width_us) for c in channels], dtype=np.int64)
        self._device_settings: tuple[sm2.ChannelSetting, ...] = ()
        self._device_ma = np.zeros(n, dtype=np.float32)
        self._device_pw_us = np.zeros(n, dtype=np.float32)
        self._first_list_s = math.inf
        self._next_list = 0
        # A new channel list pulses at once: after a stop none starts until the longest period has passed.
        self._longest_period_s = float(1.0 / self.plan.frequency_hz().min())
        self._resume_s = -math.inf
        self.pulses_delivered = 0
        self.pulses_unpublished = 0
        self.acks = 0
        self.stale_acks = 0
        self.watchdogs_sent = 0
        self.refused_stops = 0  # in a row
        self.unexpected_packets = 0
        self._crank: deque[tuple[float, sm2.ActualValues]] = deque(maxlen=MAX_CRANK_READINGS)
        self.actual_values = 0
        self.bad_actual_values = 0
        # A stimulator restarted while the device still runs the last session's channel list: stop it
        # now, not when its watchdog fires (1.2 s). Not awaited: a device not connected yet ignores it.
        self._send(sm2.Cmd.STOP_CHANNEL_LIST_MODE, b"")

    # -- Driver interface -------------------------------------------------------------

    def ready(self) -> bool:
        return self.connected and not self.silent_reason and not self.link_lost

    def set_output(self, amplitude_ma: np.ndarray, pulse_width_us: np.ndarray, now_s: float) -> None:
        amplitude = np.asarray(amplitude_ma, dtype=np.float64)
        width = np.asarray(pulse_width_us, dtype=np.float64)
        if not (np.isfinite(amplitude).all() and np.isfinite(width).all()):
            raise DriverFault("output is not finite", self.names)
        if ((amplitude < 0) | (amplitude > sm2.MAX_CURRENT_MA)).any() or ((width < 0) | (width > sm2.MAX_PULSE_WIDTH_US)).any():
            raise DriverFault(f"output {amplitude.tolist()} mA, {width.tolist()} us outside the device range", self.names)
        # Floor to the device's 1 mA and 1 us grid: never above what the kernel allowed.
        want_ma = np.floor(amplitude + 1e-9).astype(np.int64)
        if want_ma.any() and not self.ready():
            raise DriverFault(f"device not ready: {self._link_text()}", self._on(want_ma))
        self._want_ma = want_ma
        self._want_pw_us = np.floor(width + 1e-9).astype(np.int64)
        self._advance(now_s)

    def keep_alive(self, now_s: float) -> None:
        if self.ready() and self._in_flight is None and now_s - self.last_sent_s >= KEEP_ALIVE_AFTER_S:
            self._send(sm2.Cmd.WATCHDOG, b"")
            self.watchdogs_sent += 1

    def deliver_due(self, now_s: float) -> protocol.Pulses | None:
        if self.link_lost:
            return None
        faults = []
        garbage_bytes = self.decoder.garbage_bytes
        for item in self.decoder.feed(self._link_io(self.link.read_available)):
            if isinstance(item, sm2.Packet):
                try:
                    self._on_packet(item, now_s)
                except DriverFault as exc:  # the packets after it still tell what the device did
                    faults.append(exc)
            elif self._may_stimulate():
                self._mode_in_doubt = True
        if self.decoder.garbage_bytes > garbage_bytes and self._may_stimulate():
            self._mode_in_doubt = True
        if faults:
            raise faults[0] if len(faults) == 1 else DriverFault(
                "; ".join(f.cause for f in faults), list(dict.fromkeys(c for f in faults for c in f.channels))
            )
        flight = self._in_flight
        if flight is not None and now_s - flight.sent_s > ACK_TIMEOUT_S:
            self._preempt(now_s)  # an unanswered Start may have reached the device: zero() must stop it
            self._in_flight = None
            self.silent_reason = f"no answer to {flight.command.name} within {ACK_TIMEOUT_S * 1e3:.0f} ms"
            raise DriverFault(self.silent_reason, self._on(self._device_ma))
        self._advance(now_s)
        return self._pulses(now_s)

    def take_crank(self) -> protocol.Crank | None:
        """MOTOmed readings since the last call (time = when read), or None."""
        if not self._crank:
            return None
        readings = list(self._crank)
        self._crank.clear()
        return protocol.Crank(
            np.array([t for t, _ in readings]),
            np.array([v.angle_deg for _, v in readings], dtype=np.float32),
            np.array([v.speed_rpm for _, v in readings], dtype=np.float32),
            np.array([v.torque_nm for _, v in readings], dtype=np.float32),
        )

    def next_event_s(self) -> float:
        times = [self._first_list_s + self._next_list * self.plan.period_s]
        waiting = self._in_flight is None and self.mode in (sm2.StimulationMode.START, sm2.StimulationMode.INITIALIZED)
        if waiting and self._want_ma.any() and math.isfinite(self._resume_s):  # a new list waits out the period
            times.append(self._resume_s)
        if self._in_flight is not None:
            times.append(self._in_flight.sent_s + ACK_TIMEOUT_S)
        return min(times)

    def zero(self) -> None:
        """Want nothing; if the device may be stimulating, send Stop at once, pre-empting any command in flight.

        The Stop's ack decides: refused, the device still runs and the next update sends
        Stop again; a Stop already on its way is not repeated. A driver silent after an
        unanswered command sends one Stop and no more, one silent after refused Stops
        sends nothing: either way the device's watchdog fires. A lost link sends nothing.
        """
        self._want_ma[:] = 0
        flight = self._in_flight
        if not self._may_stimulate() or not self.connected or self.link_lost:
            return
        if flight is not None and flight.command is sm2.Cmd.STOP_CHANNEL_LIST_MODE:
            return
        now_s = self.clock()
        try:
            if not self.silent_reason:
                self._preempt(now_s)
                self._command(sm2.Cmd.STOP_CHANNEL_LIST_MODE)
            elif self.refused_stops < MAX_REFUSED_STOPS:
                self._send(sm2.Cmd.STOP_CHANNEL_LIST_MODE, b"")
                self._stopped()
        except DriverFault:
            return  # the write failed: _link_io marked the link lost, which status reports; zero() must not raise

    def close(self) -> None:
        self.zero()
        if not self.link_lost:
            self.link.close()

    def status(self) -> dict[str, Any]:
        return {
            "driver": "rehastim2",
            "device": self._link_text(),
            "mode": self.mode.name if self.mode is not None else None,
            "protocol_version": self.protocol_version,
            "main_interval_ms": round(self.plan.period_s * 1e3, 3),
            "frequency_hz": [round(float(f), 3) for f in self.plan.frequency_hz()],
            "acks": self.acks,
            "stale_acks": self.stale_acks,
            "watchdogs_sent": self.watchdogs_sent,
            "refused_stops": self.refused_stops,
            "frame_errors": self.decoder.frame_errors,
            "garbage_bytes": self.decoder.garbage_bytes,
            "unexpected_packets": self.unexpected_packets,
            "pulses_unpublished": self.pulses_unpublished,
            "actual_values": self.actual_values,
            "bad_actual_values": self.bad_actual_values,
        }

    # -- protocol -----------------------------------------------------------------------

    def _link_text(self) -> str:
        if self.link_lost:
            return f"serial link lost ({self.link_lost}): reconnect the device and restart the stimulator"
        if self.silent_reason:
            return f"silent until the device sends Init ({self.silent_reason})"
        return "connected" if self.connected else "waiting for the device's Init"

    def _on(self, amplitude: np.ndarray) -> list[str]:
        """Names (and 1-based device channels) of the channels with output above zero."""
        return [f"{self.names[i]} (device channel {self.device_channel[i] + 1})" for i in np.flatnonzero(amplitude)]

    def _send(self, command: sm2.Cmd, data: bytes) -> int:
        """Write one packet; ``last_sent_s`` is when it left, read after the write: the loop
        step's ``now_s`` may be long past by then (a process descheduled for 98 ms sent its
        Start stamped 98 ms early, and the ack that came 1 ms later had "timed out")."""
        number = self._number
        self._number = (self._number + 1) % 256
        self._write(sm2.encode(number, command, data))
        return number

    def _write(self, packet: bytes) -> None:
        self._link_io(lambda: self.link.write(packet))
        self.last_sent_s = self.clock()

    def _link_io(self, io: Callable[[], T]) -> T:
        """One read or write; a failing port is closed and marked lost, so it fails once, not every step."""
        try:
            return io()
        except DriverFault as exc:
            stimulating = self._on(self._device_ma)
            self.link_lost = exc.cause
            self.connected = False
            self._in_flight = None
            self._stopped()
            try:
                self.link.close()
            except Exception:  # the port is gone; closing it may fail too, and that changes nothing
                pass
            raise DriverFault(f"{exc.cause}; the serial link is closed", stimulating) from exc

    def _command(self, command: sm2.Cmd, settings: tuple[sm2.ChannelSetting, ...] = ()) -> None:
        """Send ``command`` and wait for its ack. One that overtakes another waits from when the
        first went unanswered: a device that answers nothing times out however often gates change."""
        data = self.plan.init.to_bytes() if command is sm2.Cmd.INIT_CHANNEL_LIST_MODE else sm2.start_data(list(settings))
        overtaken = self._in_flight
        number = self._send(command, data)
        self._in_flight = _InFlight(number, command, overtaken.sent_s if overtaken else self.last_sent_s, settings)

    def _settings(self) -> tuple[sm2.ChannelSetting, ...]:
        """One setting per active channel, in increasing device channel order."""
        return tuple(
            sm2.ChannelSetting(0, int(max(self._want_pw_us[i], sm2.MIN_PULSE_WIDTH_US)), int(self._want_ma[i]))
            for i in self.plan.order
        )

    def _may_stimulate(self) -> bool:
        """Started, or a Start on its way (it may reach the device whatever comes after it)."""
        flight = self._in_flight
        return self.mode is sm2.StimulationMode.STARTED or (
            flight is not None and flight.command is sm2.Cmd.START_CHANNEL_LIST_MODE
        )

    def _cuts_off(self, settings: tuple[sm2.ChannelSetting, ...]) -> bool:
        """Is a channel above 0 mA in ``settings`` (plan order) wanted at zero now?"""
        return any(s.current_ma > 0 and self._want_ma[i] == 0 for i, s in zip(self.plan.order, settings))

    def _advance(self, now_s: float) -> None:
        """Send the next command towards the wanted output.

        One command is in flight at a time, except for a cut: a channel that a Start in
        flight drives, or that the device runs while its mode is asked, is wanted at zero
        (gate closed, disarm, stop). Then the update (or Stop) goes out at once, pre-empting
        it, and the drop is not delayed by the ack.
        """
        if not self.ready():
            return
        flight = self._in_flight
        if flight is not None:
            asking = flight.command is sm2.Cmd.GET_STIMULATION_MODE and self._cuts_off(self._device_settings)
            if asking:  # a cut does not wait for the mode (asked after garbled bytes): ask again after it
                self._mode_in_doubt = True
            if asking or (flight.command is sm2.Cmd.START_CHANNEL_LIST_MODE and self._cuts_off(flight.settings)):
                self._preempt(now_s)
                if self._want_ma.any():
                    self._command(sm2.Cmd.START_CHANNEL_LIST_MODE, self._settings())
                else:
                    self._command(sm2.Cmd.STOP_CHANNEL_LIST_MODE)
            return
        mode = self.mode
        if self._mode_in_doubt:
            self._mode_in_doubt = False
            if self._may_stimulate():
                self._command(sm2.Cmd.GET_STIMULATION_MODE)
                return
        if self._want_ma.any():
            if mode is None:
                self._command(sm2.Cmd.GET_STIMULATION_MODE)
            elif mode is not sm2.StimulationMode.STARTED and now_s < self._resume_s:
                return  # a Start now would pulse sooner than 1/f after the last list (a flickering output)
            elif mode is sm2.StimulationMode.START:
                self._command(sm2.Cmd.INIT_CHANNEL_LIST_MODE)
            elif mode is sm2.StimulationMode.INITIALIZED or self._settings() != self._device_settings:
                self._command(sm2.Cmd.START_CHANNEL_LIST_MODE, self._settings())
        elif mode is sm2.StimulationMode.STARTED:
            self._command(sm2.Cmd.STOP_CHANNEL_LIST_MODE)

    def _preempt(self, now_s: float) -> None:
        """Before a command overtakes the one in flight: a Start may reach the device all the
        same, so it counts as applied (its late ack is then stale); the new command's ack, or
        its refusal, goes on from there."""
        flight = self._in_flight
        if flight is not None and flight.command is sm2.Cmd.START_CHANNEL_LIST_MODE:
            self._started(flight.settings, now_s)

    def _started(self, settings: tuple[sm2.ChannelSetting, ...], now_s: float) -> None:
        """The device runs ``settings`` (plan order) from ``now_s``, or from when the Start left if
        that is later (a step's ``now_s`` read before the write: its pulses were stamped too early)."""
        self.mode = sm2.StimulationMode.STARTED
        self._device_settings = settings
        by_order = {int(i): s for i, s in zip(self.plan.order, settings)}
        self._device_ma[:] = [by_order[i].current_ma for i in range(len(self.names))]
        self._device_pw_us[:] = [by_order[i].pulse_width_us for i in range(len(self.names))]
        if math.isinf(self._first_list_s):
            self._first_list_s, self._next_list = max(now_s, self.last_sent_s), 0

    def _stopped(self) -> None:
        """The device stops (or was told to): no pulses from here, set-up unknown; a new channel list
        waits out the longest period, so no channel pulses sooner than 1/f after its last pulse."""
        if not math.isinf(self._first_list_s):
            self._resume_s = self.clock() + self._longest_period_s
        self.mode = None
        self._device_settings = ()
        self._device_ma[:] = 0
        self._first_list_s = math.inf

    def _on_packet(self, packet: sm2.Packet, now_s: float) -> None:
        command = packet.command
        if command == sm2.Cmd.INIT:
            self._on_init(packet, now_s)
        elif command == sm2.Cmd.ACTUAL_VALUES:
            try:
                self._crank.append((now_s, sm2.ActualValues.from_bytes(packet.data)))
                self.actual_values += 1
            except sm2.ParameterError:
                self.bad_actual_values += 1
        elif command == sm2.Cmd.STIMULATION_ERROR:
            code = sm2.to_signed(packet.data[0]) if packet.data else 0
            cause = sm2.STIMULATION_ERROR_TEXT.get(code, "unknown stimulation error")
            stimulating = self._on(self._device_ma)
            start_in_flight = self._in_flight is not None and self._in_flight.command is sm2.Cmd.START_CHANNEL_LIST_MODE
            self._stopped()
            # The device "resets its mode to start mode"; but a Start sent before this packet
            # arrived may still reach it, so then count it as possibly stimulating: zero() stops it.
            self.mode = sm2.StimulationMode.STARTED if start_in_flight else sm2.StimulationMode.START
            self._in_flight = None
            raise DriverFault(f"RehaStim2 StimulationError {code}: {cause}; the device stopped", stimulating)
        elif command == sm2.Cmd.UNKNOWN_COMMAND:
            echoed = packet.data[0] if packet.data else -1
            flight = self._in_flight
            if flight is not None and packet.number == flight.number:
                self._in_flight = None  # answered: the device did nothing with it
            raise DriverFault(f"RehaStim2 does not know command {echoed}", self._on(self._device_ma))
        elif self._in_flight is not None and packet.number == self._in_flight.number and command == self._in_flight.command + 1:
            self._on_ack(packet, now_s)
        elif command in (sm2.Cmd.INIT_CHANNEL_LIST_MODE_ACK, sm2.Cmd.START_CHANNEL_LIST_MODE_ACK,
                         sm2.Cmd.STOP_CHANNEL_LIST_MODE_ACK, sm2.Cmd.GET_STIMULATION_MODE_ACK):  # fmt: skip
            self.stale_acks += 1  # the answer to a command pre-empted by zero()
            if packet.data and packet.data[0] and self._may_stimulate():
                # A failure in no answer we wait for (the PDF's StimulationError table names command
                # 33, StartChannelListModeAck, where section 3.3 says 38): ask the mode.
                self._mode_in_doubt = True
        else:
            self.unexpected_packets += 1

    def _on_init(self, packet: sm2.Packet, now_s: float) -> None:
        """Answer the device's Init; if it was set up or stimulating, it has reset: fault."""
        was = self._on(self._device_ma) if self.mode is sm2.StimulationMode.STARTED else []
        was_wanted = self._on(self._want_ma)
        self.protocol_version = packet.data[0] if packet.data else None
        self._write(sm2.encode(packet.number, sm2.Cmd.INIT_ACK, bytes((0,))))
        self.connected = True
        self.silent_reason = ""
        self.refused_stops = 0
        self._in_flight = None
        self._stopped()
        self.mode = sm2.StimulationMode.START
        if was or was_wanted:
            raise DriverFault("RehaStim2 sent Init during stimulation: it reset (watchdog or power) and stopped", was or was_wanted)

    def _on_ack(self, packet: sm2.Packet, now_s: float) -> None:
        flight = self._in_flight
        assert flight is not None
        self._in_flight = None
        self.acks += 1
        result = sm2.to_signed(packet.data[0]) if packet.data else -1
        if result != 0:
            concerned = self._on(np.maximum(self._want_ma, self._device_ma))  # wanted on, or still on
            self._on_refusal(flight.command, result)
            raise DriverFault(
                f"RehaStim2 refused {flight.command.name}: {result} ({sm2.RESULT_TEXT.get(result, 'unknown result')})",
                concerned,
            )
        if flight.command is sm2.Cmd.GET_STIMULATION_MODE:
            if len(packet.data) < 2 or packet.data[1] > max(sm2.StimulationMode):
                raise DriverFault(f"RehaStim2 answered GetStimulationMode with no known mode: {bytes(packet.data).hex()}")
            mode = sm2.StimulationMode(packet.data[1])
            if mode is sm2.StimulationMode.STARTED and not self._device_settings:
                self.mode = mode
                raise DriverFault("RehaStim2 reports stimulation running after Stop", self.names)
            if mode is not sm2.StimulationMode.STARTED and self._device_settings:  # asked after garbled bytes
                stopped = self._on(self._device_ma)
                self._stopped()
                self.mode = mode
                raise DriverFault(
                    f"RehaStim2 is in {mode.name} mode: it stopped on its own, and its report was garbled "
                    "on the line (a StimulationError: emergency switch, electrode or module error)",
                    stopped,
                )
            self.mode = mode
        elif flight.command is sm2.Cmd.INIT_CHANNEL_LIST_MODE:
            self.mode = sm2.StimulationMode.INITIALIZED
        elif flight.command is sm2.Cmd.START_CHANNEL_LIST_MODE:
            self._started(flight.settings, now_s)
        elif flight.command is sm2.Cmd.STOP_CHANNEL_LIST_MODE:
            self.refused_stops = 0
            self._stopped()

    def _on_refusal(self, command: sm2.Cmd, result: int) -> None:
        """A refused command changed nothing on the device, which runs (or not) as before.

        Wrong mode: it is not set up as thought, so not stimulating (its mode is asked
        before starting again). A refused Stop goes out again from the next update; after
        ``MAX_REFUSED_STOPS`` in a row the driver falls silent, so the device's watchdog
        stops it (a packet of ours, even a Stop, would keep it alive).
        """
        if result == sm2.WRONG_MODE:
            self._stopped()
        elif command is sm2.Cmd.STOP_CHANNEL_LIST_MODE:
            self.refused_stops += 1
            if self.refused_stops >= MAX_REFUSED_STOPS:
                self.silent_reason = f"Stop refused {self.refused_stops} times in a row: silent, so its watchdog stops it"

    def _pulses(self, now_s: float) -> protocol.Pulses | None:
        """Pulses of every channel list that started by ``now_s`` (times from the device timing)."""
        if math.isinf(self._first_list_s):
            return None
        period_s = self.plan.period_s
        last = math.floor((now_s - self._first_list_s) / period_s)
        if last < self._next_list:
            return None
        first = max(self._next_list, last - MAX_LISTS_PER_CALL + 1)
        lists = np.arange(self._next_list, last + 1)
        pulsing = (lists[:, None] % self.plan.every_n_lists[None, :] == 0) & (self._device_ma > 0)[None, :]
        self.pulses_unpublished += int(pulsing[: first - self._next_list].sum())
        pulsing[: first - self._next_list] = False
        self._next_list = last + 1
        k, ch = np.nonzero(pulsing)
        if len(k) == 0:
            return None
        self.pulses_delivered += len(k)
        return protocol.Pulses(
            self.device_channel[ch],
            self._first_list_s + lists[k] * period_s + self.plan.offset_s[ch],
            self._device_ma[ch],
            self._device_pw_us[ch],
        )
