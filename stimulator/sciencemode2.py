"""ScienceMode2 (Hasomed RehaStim2) packets: framing, byte stuffing, CRC-8 and payloads.

Pure: bytes in, bytes out, no I/O. Follows the protocol description v1.24
(2012-12-12), section 2.2 and chapter 4:

    0xF0 | 0x81 ck^0x55 | 0x81 len^0x55 | packet# command data... (stuffed) | 0x0F

Every byte equal to a constant of table 6 except the stuffing key (0xF0 start,
0x0F stop, 0x81 stuffing byte) is sent as 0x81 followed by (byte XOR 0x55); 0x55
itself is sent as is. The checksum (CRC-8, polynomial 0x07, initial value 0) and
the length are computed over the *stuffed* packet number, command and data, and
are themselves always sent stuffed. Two-byte fields go MSB first, as the command
tables show. (pysciencemode 1.1.5 also escapes 0x55 and 0x0A and XORs the packet
number and command in place: this module follows the PDF, not that library.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

START = 0xF0
STOP = 0x0F
STUFF = 0x81
STUFF_KEY = 0x55
ESCAPED = frozenset((START, STOP, STUFF))
MAX_DATA_BYTES = 60  # "command data < 61 bytes"
# start + stuffed checksum and length + every payload byte stuffed + stop
MAX_FRAME_BYTES = 1 + 4 + 2 * (2 + MAX_DATA_BYTES) + 1

MAX_PULSE_WIDTH_US = 500
MIN_PULSE_WIDTH_US = 20  # "in current version [20, 500] us, if (pw < 20) then pw = 20"
MAX_CURRENT_MA = 130
MAX_LOW_FREQUENCY_FACTOR = 7
MIN_INTERVAL_MS = 8.0  # minimum inter-pulse and main interval of the current firmware
MAX_MAIN_INTERVAL_CODE = 2048  # "Range: [0, 2048]": t1 = code * 0.5 ms + 1 ms, up to 1025 ms
SLOT_MS = 1.5  # time slot of each selected channel in the list


class Cmd(enum.IntEnum):
    INIT = 1
    INIT_ACK = 2
    UNKNOWN_COMMAND = 3
    WATCHDOG = 4
    GET_STIMULATION_MODE = 10
    GET_STIMULATION_MODE_ACK = 11
    INIT_CHANNEL_LIST_MODE = 30
    INIT_CHANNEL_LIST_MODE_ACK = 31
    START_CHANNEL_LIST_MODE = 32
    START_CHANNEL_LIST_MODE_ACK = 33
    STOP_CHANNEL_LIST_MODE = 34
    STOP_CHANNEL_LIST_MODE_ACK = 35
    SINGLE_PULSE = 36
    SINGLE_PULSE_ACK = 37
    STIMULATION_ERROR = 38
    ACTUAL_VALUES = 60  # MOTOmed angle, speed and torque, sent by the device every 20 ms


class StimulationMode(enum.IntEnum):
    """GetStimulationModeAck byte 8."""

    START = 0
    INITIALIZED = 1
    STARTED = 2


WRONG_MODE = -3  # result code: the command does not apply in the device's present mode

RESULT_TEXT = {
    0: "ok",
    -1: "transfer error",
    -2: "parameter error",
    -3: "wrong mode error",
    -4: "MOTOmed connection error",
    -5: "incompatible protocol version",
    -6: "invalid MOTOmed trainer",
    -7: "MOTOmed busy error",
    -8: "busy error",
}

STIMULATION_ERROR_TEXT = {
    -1: "emergency switch activated or not connected",
    -2: "electrode error",
    -3: "stimulation module error",
}


def to_signed(byte: int) -> int:
    """A result byte as the signed code the tables list (0xFF -> -1)."""
    return byte - 256 if byte > 127 else byte


def to_byte(code: int) -> int:
    """A signed result code as the byte sent (-1 -> 0xFF)."""
    return code & 0xFF


def crc8(data: bytes) -> int:
    """CRC-8, polynomial x^8 + x^2 + x + 1 (0x07), initial value 0, no reflection."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def stuff(data: bytes) -> bytes:
    """Escape every start, stop and stuffing byte as 0x81, byte ^ 0x55."""
    out = bytearray()
    for byte in data:
        if byte in ESCAPED:
            out += bytes((STUFF, byte ^ STUFF_KEY))
        else:
            out.append(byte)
    return bytes(out)


class FrameError(ValueError):
    """A frame that cannot be used; number and command are set when they could be read."""

    def __init__(self, reason: str, number: int | None = None, command: int | None = None) -> None:
        self.reason = reason
        self.number = number
        self.command = command
        super().__init__(reason)


def unstuff(data: bytes) -> bytes:
    """Undo :func:`stuff`; a stuffing byte at the end is a FrameError."""
    out = bytearray()
    escape = False
    for byte in data:
        if escape:
            out.append(byte ^ STUFF_KEY)
            escape = False
        elif byte == STUFF:
            escape = True
        else:
            out.append(byte)
    if escape:
        raise FrameError("stuffing byte at the end of the packet")
    return bytes(out)


@dataclass(frozen=True)
class Packet:
    number: int
    command: int
    data: bytes = b""


def encode(number: int, command: int, data: bytes = b"") -> bytes:
    """One framed, stuffed packet with checksum and length."""
    if not 0 <= number <= 255 or not 0 <= command <= 255:
        raise ValueError(f"packet number {number} and command {command} must be bytes")
    if len(data) > MAX_DATA_BYTES:
        raise ValueError(f"command data is {len(data)} bytes; at most {MAX_DATA_BYTES}")
    body = stuff(bytes((number, command)) + data)
    checksum, length = crc8(body), len(body)
    if length > 255:
        raise ValueError(f"stuffed length {length} does not fit a byte")
    return bytes((START, STUFF, checksum ^ STUFF_KEY, STUFF, length ^ STUFF_KEY)) + body + bytes((STOP,))


def parse_frame(frame: bytes) -> Packet:
    """Check and decode one frame (start to stop byte inclusive); FrameError if bad.

    A checksum or length mismatch is a transfer error; the FrameError then carries
    the packet number and command when the payload still unstuffs, so the device
    can answer with the transfer-error code as the protocol asks.
    """
    if len(frame) < 8 or frame[0] != START or frame[-1] != STOP:
        raise FrameError(f"frame of {len(frame)} bytes is too short or not delimited")
    if frame[1] != STUFF or frame[3] != STUFF:
        raise FrameError("checksum and length must be stuffed")
    checksum, length = frame[2] ^ STUFF_KEY, frame[4] ^ STUFF_KEY
    body = frame[5:-1]
    try:
        payload = unstuff(body)
    except FrameError:
        payload = b""
    number = payload[0] if len(payload) >= 2 else None
    command = payload[1] if len(payload) >= 2 else None
    if len(payload) < 2:
        raise FrameError("no packet number and command", number, command)
    if length != len(body):
        raise FrameError(f"length byte {length} but {len(body)} bytes received", number, command)
    if checksum != crc8(body):
        raise FrameError(f"checksum 0x{checksum:02X} but computed 0x{crc8(body):02X}", number, command)
    return Packet(payload[0], payload[1], payload[2:])


class Decoder:
    """Splits a byte stream into packets; garbage, broken frames and overlong runs are dropped.

    As section 5.2 says, a start byte inside a frame rejects the bytes before it and
    begins a new frame. Bytes outside any frame are counted as garbage. The bytes
    after the two leading stuffing bytes are checksum ^ 0x55 and length ^ 0x55, which
    may equal the start or stop byte (checksum 0x5A is sent as 0x81 0x0F): they are
    never taken as delimiters. So a start byte there may also begin the next frame (a
    fragment of a frame cut short, then a whole one): a frame that fails its check, or
    lacks a stuffing byte before its checksum or length, is scanned again from its
    second byte, so the packet after a fragment is not lost with it.
    """

    def __init__(self) -> None:
        self._frame = bytearray()
        self.garbage_bytes = 0
        self.frame_errors = 0

    def feed(self, data: bytes) -> list[Packet | FrameError]:
        """Every complete packet (or FrameError) in ``data`` after what was fed before."""
        out: list[Packet | FrameError] = []
        todo = bytearray(data)
        i = 0
        while i < len(todo):
            byte = todo[i]
            i += 1
            again = self._take(byte, out)
            if again:
                todo[i:i] = again
        return out

    def _take(self, byte: int, out: list[Packet | FrameError]) -> bytes:
        """One byte into the frame; returns the bytes of a failed frame to scan again (after its start byte)."""
        at = len(self._frame)
        if at in (2, 4):  # the stuffed checksum or length: any value, even 0x0F
            self._frame.append(byte)
        elif at in (1, 3) and byte != STUFF:
            frame, self._frame = bytes(self._frame), bytearray()
            out.append(self._error(FrameError(f"byte {at} of a frame is 0x{byte:02X}, not the stuffing byte")))
            return frame[1:] + bytes((byte,))
        elif byte == START:
            if self._frame:
                out.append(self._error(FrameError(f"start byte inside a frame: {len(self._frame)} bytes dropped")))
            self._frame = bytearray((START,))
        elif not self._frame:
            self.garbage_bytes += 1
        else:
            self._frame.append(byte)
            if byte == STOP:
                frame, self._frame = bytes(self._frame), bytearray()
                try:
                    out.append(parse_frame(frame))
                except FrameError as exc:
                    out.append(self._error(exc))
                    return frame[1:]
            elif len(self._frame) >= MAX_FRAME_BYTES:
                self._frame = bytearray()
                out.append(self._error(FrameError(f"no stop byte within {MAX_FRAME_BYTES} bytes")))
        return b""

    def _error(self, exc: FrameError) -> FrameError:
        self.frame_errors += 1
        return exc


# -- command data ------------------------------------------------------------------------


class ParameterError(ValueError):
    """Command data out of the protocol's range (the device answers -2)."""


@dataclass(frozen=True)
class ChannelListInit:
    """InitChannelListMode data (bytes 7-13)."""

    low_frequency_factor: int
    active_mask: int
    low_frequency_mask: int
    inter_pulse_code: int  # t2 = code * 0.5 ms + 1.5 ms
    main_interval_code: int  # t1 = code * 0.5 ms + 1 ms; 0 = one shot
    execution: int = 0  # 0 fixed 1.5 ms slots, 1 as fast as possible

    def to_bytes(self) -> bytes:
        code = self.main_interval_code
        return bytes(
            (
                self.low_frequency_factor,
                self.active_mask,
                self.low_frequency_mask,
                self.inter_pulse_code,
                code >> 8,
                code & 0xFF,
                self.execution,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ChannelListInit:
        """Parse and range-check, as the device does (ParameterError if out of range)."""
        if len(data) != 7:
            raise ParameterError(f"InitChannelListMode has 7 data bytes, got {len(data)}")
        init = cls(data[0], data[1], data[2], data[3], (data[4] << 8) | data[5], data[6])
        if init.low_frequency_factor > MAX_LOW_FREQUENCY_FACTOR:
            raise ParameterError(f"low frequency factor {init.low_frequency_factor} > {MAX_LOW_FREQUENCY_FACTOR}")
        if init.main_interval_code > MAX_MAIN_INTERVAL_CODE:
            raise ParameterError(f"main interval code {init.main_interval_code} > {MAX_MAIN_INTERVAL_CODE}")
        if init.main_interval_code and init.main_interval_ms < MIN_INTERVAL_MS:
            raise ParameterError(f"main interval {init.main_interval_ms} ms < {MIN_INTERVAL_MS} ms")
        if init.inter_pulse_ms < MIN_INTERVAL_MS:
            raise ParameterError(f"inter pulse interval {init.inter_pulse_ms} ms < {MIN_INTERVAL_MS} ms")
        if init.execution > 1:
            raise ParameterError(f"channel execution {init.execution} is neither 0 nor 1")
        return init

    @property
    def main_interval_ms(self) -> float:
        return self.main_interval_code * 0.5 + 1.0

    @property
    def inter_pulse_ms(self) -> float:
        return self.inter_pulse_code * 0.5 + 1.5

    @property
    def channels(self) -> list[int]:
        """Active channel indices (0-based, bit 0 = channel 1), ascending."""
        return [i for i in range(8) if self.active_mask >> i & 1]


@dataclass(frozen=True)
class ChannelSetting:
    """StartChannelListMode data of one active channel."""

    mode: int  # 0 single, 1 doublet, 2 triplet
    pulse_width_us: int
    current_ma: int

    def to_bytes(self) -> bytes:
        return bytes((self.mode, self.pulse_width_us >> 8, self.pulse_width_us & 0xFF, self.current_ma))


def start_data(settings: list[ChannelSetting]) -> bytes:
    """StartChannelListMode data: 4 bytes per active channel, in increasing channel order."""
    return b"".join(s.to_bytes() for s in settings)


def parse_start_data(data: bytes, n_active: int) -> list[ChannelSetting]:
    """Parse and range-check StartChannelListMode data for ``n_active`` channels."""
    if len(data) != 4 * n_active:
        raise ParameterError(f"StartChannelListMode needs {4 * n_active} data bytes, got {len(data)}")
    settings = []
    for i in range(n_active):
        mode, msb, lsb, current = data[4 * i : 4 * i + 4]
        width = (msb << 8) | lsb
        if mode > 2:
            raise ParameterError(f"channel {i}: mode {mode} is not 0, 1 or 2")
        if width > MAX_PULSE_WIDTH_US:
            raise ParameterError(f"channel {i}: pulse width {width} us > {MAX_PULSE_WIDTH_US} us")
        if current > MAX_CURRENT_MA:
            raise ParameterError(f"channel {i}: current {current} mA > {MAX_CURRENT_MA} mA")
        settings.append(ChannelSetting(mode, max(width, MIN_PULSE_WIDTH_US), current))
    return settings


@dataclass(frozen=True)
class ActualValues:
    """MOTOmed crank state from the ActualValues packet (command 60, every 20 ms).

    Data (PDF section 4.4, bytes 7-12, MSB first): angle (0..359 degrees from the left crank
    at 12 o'clock), speed (rpm, + forward) and torque (dNm, + active, - passive).
    """

    angle_deg: int
    speed_rpm: int
    torque_dnm: int

    @property
    def torque_nm(self) -> float:
        return self.torque_dnm / 10.0

    def to_bytes(self) -> bytes:
        return (
            self.angle_deg.to_bytes(2, "big")
            + self.speed_rpm.to_bytes(2, "big", signed=True)
            + self.torque_dnm.to_bytes(2, "big", signed=True)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ActualValues:
        if len(data) != 6:
            raise ParameterError(f"ActualValues needs 6 data bytes, got {len(data)}")
        angle = int.from_bytes(data[0:2], "big")
        if angle >= 360:
            raise ParameterError(f"ActualValues angle {angle} is not within 0..359 degrees")
        return cls(angle, int.from_bytes(data[2:4], "big", signed=True), int.from_bytes(data[4:6], "big", signed=True))
