"""Wire protocol: versioned binary messages with numpy payloads, no pickle.

Every message on the wire is two ZeroMQ frames: ``[topic, payload]``. The payload
starts with a fixed header (magic, version, kind, reserved, sequence number, send
time) followed by a kind-specific body. ``decode`` checks everything a receiver
relies on (sizes, version, finiteness, value ranges) and raises
:class:`MalformedMessage` otherwise, so a caller can count and drop it.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"FESL"
VERSION = 2  # 2: gate reason NO_PULSE_REPORTS (a build speaking 1 rejects it)

_HEADER = struct.Struct("<4sBBHQd")
HEADER_SIZE = _HEADER.size
MAX_STATUS_BYTES = 64 * 1024


class Kind(enum.IntEnum):
    EMG = 1
    COMMAND = 2
    PULSES = 3
    STATUS = 4
    TRUTH = 5
    CRANK = 6


TOPICS: dict[Kind, bytes] = {
    Kind.EMG: b"emg",
    Kind.COMMAND: b"command",
    Kind.PULSES: b"pulses",
    Kind.STATUS: b"status",
    Kind.TRUTH: b"truth",
    Kind.CRANK: b"crank",
}
_KIND_BY_TOPIC = {topic: kind for kind, topic in TOPICS.items()}


class GateReason(enum.IntEnum):
    """Why a stimulation channel's gate is closed (OPEN when it is not)."""

    OPEN = 0
    NO_EMG = 1
    STALE_EMG = 2
    GAP = 3
    CONTAMINATED = 4
    NOT_CALIBRATED = 5
    SHUTDOWN = 6
    CLOCK_UNSYNCED = 7  # a peer's clock offset is not known yet: pulse and EMG times cannot be compared
    NO_CRANK = 8  # cycling: no fresh crank reading (LSL stream or MOTOmed), the phase is unknown
    BLANKED = 9  # every EMG sample of the last stale_ms was blanked: the activation is not measured
    NO_PULSE_REPORTS = 10  # the stimulator's link is silent: its pulses' artifacts could not be blanked


_LAST_GATE_REASON = max(GateReason)


class MalformedMessage(ValueError):
    """A received message failed validation; it must be counted and dropped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    seq: int
    send_time_s: float


@dataclass(frozen=True, slots=True)
class EmgChunk:
    """A block of samples, (n_samples, n_channels) float32, on the shared clock.

    Also used for the simulated patient's ground truth (kind TRUTH), where the
    channels are muscles and the values are voluntary drive 0..1.
    """

    first_sample_index: int
    first_sample_time_s: float
    arrival_time_s: float
    sampling_rate_hz: float
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class Command:
    """Per stimulation channel: intensity 0..1 and gate (open flag plus reason)."""

    newest_emg_time_s: float
    intensity: np.ndarray  # float32 (n_channels,)
    gate_open: np.ndarray  # bool (n_channels,)
    gate_reason: np.ndarray  # uint8 (n_channels,), GateReason values


@dataclass(frozen=True, slots=True)
class Pulses:
    """Delivered pulses or output updates: one entry each."""

    channel: np.ndarray  # uint16 device channel index (0-based)
    time_s: np.ndarray  # float64
    amplitude_ma: np.ndarray  # float32
    pulse_width_us: np.ndarray  # float32


@dataclass(frozen=True, slots=True)
class Crank:
    """Ergometer crank readings (the MOTOmed's ActualValues, relayed by the stimulator): one entry each."""

    time_s: np.ndarray  # float64, when the reading arrived (sender's clock)
    angle_deg: np.ndarray  # float32, 0 <= angle < 360
    cadence_rpm: np.ndarray  # float32, signed (backwards negative)
    torque_nm: np.ndarray  # float32, signed


@dataclass(frozen=True, slots=True)
class Status:
    """Heartbeat and counters: a JSON object (small, not on the hot path)."""

    fields: dict[str, Any]


Body = EmgChunk | Command | Pulses | Crank | Status


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    body: Body


_EMG_HEAD = struct.Struct("<QdddII")
_COMMAND_HEAD = struct.Struct("<dI")
_COUNT_HEAD = struct.Struct("<I")  # entries in a body of columns (pulses, crank readings)
_PULSES_COLUMNS = ("<u2", "<f8", "<f4", "<f4")  # channel, time, amplitude, pulse width
_CRANK_COLUMNS = ("<f8", "<f4", "<f4", "<f4")  # time, angle, cadence, torque
MAX_CHANNELS = 1024
MIN_SAMPLING_RATE_HZ = 10.0  # EMG rates outside this range are no amplifier's (and break filter design)
MAX_SAMPLING_RATE_HZ = 100_000.0
MAX_SAMPLES = 1 << 16
MAX_PULSES = 1 << 12


def _header(kind: Kind, seq: int, send_time_s: float) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, int(kind), 0, seq, send_time_s)


class EmgEncoder:
    """EMG (or ``truth``) chunks encoded into one reused buffer: nothing allocated per chunk.

    :meth:`encode` returns ``[topic, payload]`` as :func:`encode` does, but the payload is
    a view of the buffer, valid until the next call: send it (a copying send) before then.
    """

    def __init__(self, kind: Kind = Kind.EMG) -> None:
        if kind not in (Kind.EMG, Kind.TRUTH):
            raise ValueError(f"an EMG encoder encodes EMG or TRUTH, not {kind!r}")
        self.kind = kind
        self._buffer = bytearray()

    def encode(self, seq: int, send_time_s: float, chunk: EmgChunk) -> list[bytes | memoryview]:
        data = np.asarray(chunk.data)
        if data.ndim != 2:
            raise ValueError(f"EMG data must be 2-D (n_samples, n_channels), got {data.shape}")
        body_offset = HEADER_SIZE + _EMG_HEAD.size
        size = body_offset + 4 * data.size
        if len(self._buffer) < size:
            self._buffer = bytearray(size)  # a new one: a view of the old one may still be alive
        buffer = self._buffer
        buffer[:HEADER_SIZE] = _header(self.kind, seq, send_time_s)
        _EMG_HEAD.pack_into(
            buffer,
            HEADER_SIZE,
            chunk.first_sample_index,
            chunk.first_sample_time_s,
            chunk.arrival_time_s,
            chunk.sampling_rate_hz,
            data.shape[0],
            data.shape[1],
        )
        samples = np.frombuffer(buffer, dtype="<f4", count=data.size, offset=body_offset).reshape(data.shape)
        np.copyto(samples, data, casting="same_kind")
        return [TOPICS[self.kind], memoryview(buffer)[:size]]


def encode_emg(kind: Kind, seq: int, send_time_s: float, chunk: EmgChunk) -> bytes:
    return bytes(EmgEncoder(kind).encode(seq, send_time_s, chunk)[1])


def encode_command(seq: int, send_time_s: float, command: Command) -> bytes:
    n = len(command.intensity)
    head = _COMMAND_HEAD.pack(command.newest_emg_time_s, n)
    return (
        _header(Kind.COMMAND, seq, send_time_s)
        + head
        + np.asarray(command.intensity, dtype="<f4").tobytes()
        + np.asarray(command.gate_open, dtype=np.uint8).tobytes()
        + np.asarray(command.gate_reason, dtype=np.uint8).tobytes()
    )


def _encode_columns(kind: Kind, seq: int, send_time_s: float, dtypes: tuple[str, ...], columns: tuple) -> bytes:
    """A count, then each column whole (little endian): the layout of pulses and crank bodies."""
    return (
        _header(kind, seq, send_time_s)
        + _COUNT_HEAD.pack(len(columns[0]))
        + b"".join(np.asarray(column, dtype=dtype).tobytes() for column, dtype in zip(columns, dtypes))
    )


def encode_pulses(seq: int, send_time_s: float, pulses: Pulses) -> bytes:
    columns = (pulses.channel, pulses.time_s, pulses.amplitude_ma, pulses.pulse_width_us)
    return _encode_columns(Kind.PULSES, seq, send_time_s, _PULSES_COLUMNS, columns)


def encode_crank(seq: int, send_time_s: float, crank: Crank) -> bytes:
    columns = (crank.time_s, crank.angle_deg, crank.cadence_rpm, crank.torque_nm)
    return _encode_columns(Kind.CRANK, seq, send_time_s, _CRANK_COLUMNS, columns)


def encode_status(seq: int, send_time_s: float, fields: dict[str, Any]) -> bytes:
    body = json.dumps(fields, allow_nan=False, separators=(",", ":")).encode()
    return _header(Kind.STATUS, seq, send_time_s) + body


def encode(seq: int, send_time_s: float, body: Body, kind: Kind | None = None) -> list[bytes]:
    """Encode ``body`` into the two frames ``[topic, payload]``."""
    if kind is not None and not (isinstance(body, EmgChunk) and kind in (Kind.EMG, Kind.TRUTH)):
        raise ValueError(f"kind {kind!r} does not fit a {type(body).__name__} body")
    if isinstance(body, EmgChunk):
        kind = kind or Kind.EMG
        payload = encode_emg(kind, seq, send_time_s, body)
    elif isinstance(body, Command):
        kind, payload = Kind.COMMAND, encode_command(seq, send_time_s, body)
    elif isinstance(body, Pulses):
        kind, payload = Kind.PULSES, encode_pulses(seq, send_time_s, body)
    elif isinstance(body, Crank):
        kind, payload = Kind.CRANK, encode_crank(seq, send_time_s, body)
    elif isinstance(body, Status):
        kind, payload = Kind.STATUS, encode_status(seq, send_time_s, body.fields)
    else:
        raise TypeError(f"cannot encode {type(body).__name__}")
    return [TOPICS[kind], payload]


def _finite(name: str, values: np.ndarray) -> None:
    """Reject NaN and infinities: both extremes finite means every value is (NaN propagates through min and max).

    Two reductions, no temporary the size of the data (an EMG chunk is checked per message).
    """
    if values.size and not (math.isfinite(values.min()) and math.isfinite(values.max())):
        raise MalformedMessage(f"{name} contains NaN or infinity")


def _decode_emg(body: memoryview) -> EmgChunk:
    if len(body) < _EMG_HEAD.size:
        raise MalformedMessage(f"EMG body truncated: {len(body)} bytes")
    first, t_first, t_arrival, fs, n_samples, n_channels = _EMG_HEAD.unpack_from(body)
    if not 0 < n_channels <= MAX_CHANNELS or not 0 < n_samples <= MAX_SAMPLES:
        raise MalformedMessage(f"EMG shape out of range: ({n_samples}, {n_channels})")
    expected = _EMG_HEAD.size + 4 * n_samples * n_channels
    if len(body) != expected:
        raise MalformedMessage(f"EMG body is {len(body)} bytes, expected {expected}")
    for name, value in (("first sample time", t_first), ("arrival time", t_arrival)):
        if not math.isfinite(value):
            raise MalformedMessage(f"EMG {name} is not finite")
    if not MIN_SAMPLING_RATE_HZ <= fs <= MAX_SAMPLING_RATE_HZ:  # NaN too
        raise MalformedMessage(
            f"EMG sampling rate {fs} Hz is not within {MIN_SAMPLING_RATE_HZ:g}..{MAX_SAMPLING_RATE_HZ:g} Hz"
        )
    data = np.frombuffer(body, dtype="<f4", offset=_EMG_HEAD.size).reshape(n_samples, n_channels)
    _finite("EMG data", data)
    return EmgChunk(first, t_first, t_arrival, fs, data)


def _decode_command(body: memoryview) -> Command:
    if len(body) < _COMMAND_HEAD.size:
        raise MalformedMessage(f"command body truncated: {len(body)} bytes")
    newest, n = _COMMAND_HEAD.unpack_from(body)
    if not 0 < n <= MAX_CHANNELS:
        raise MalformedMessage(f"command channel count {n} out of range")
    expected = _COMMAND_HEAD.size + 6 * n
    if len(body) != expected:
        raise MalformedMessage(f"command body is {len(body)} bytes, expected {expected}")
    if not math.isfinite(newest):
        raise MalformedMessage("command EMG time is not finite")
    offset = _COMMAND_HEAD.size
    # A few channels: checked value by value in Python, cheaper than numpy's per-call cost.
    values = _float32s(n).unpack_from(body, offset)
    if not all(map(math.isfinite, values)):
        raise MalformedMessage("command intensity contains NaN or infinity")
    if min(values) < 0 or max(values) > 1:
        raise MalformedMessage("command intensity outside 0..1")
    for gate, reason in zip(body[offset + 4 * n : offset + 5 * n], body[offset + 5 * n : offset + 6 * n]):
        if gate > 1:
            raise MalformedMessage("command gate flag is not 0 or 1")
        if reason > _LAST_GATE_REASON:
            raise MalformedMessage("command gate reason unknown")
        if (gate == 1) != (reason == GateReason.OPEN):
            raise MalformedMessage("command gate flag and reason disagree")
    intensity = np.frombuffer(body, dtype="<f4", count=n, offset=offset)
    gate_open = np.frombuffer(body, dtype=np.bool_, count=n, offset=offset + 4 * n)  # bytes 0 and 1, checked
    reason = np.frombuffer(body, dtype=np.uint8, count=n, offset=offset + 5 * n)
    return Command(newest, intensity, gate_open, reason)


@functools.cache
def _float32s(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}f")


def _decode_columns(body: memoryview, what: str, dtypes: tuple[str, ...]) -> list[np.ndarray]:
    """The columns of a count-prefixed body, each checked finite."""
    if len(body) < _COUNT_HEAD.size:
        raise MalformedMessage(f"{what} body truncated: {len(body)} bytes")
    (n,) = _COUNT_HEAD.unpack_from(body)
    if n > MAX_PULSES:
        raise MalformedMessage(f"{what} count {n} out of range")
    sizes = [np.dtype(dtype).itemsize * n for dtype in dtypes]
    expected = _COUNT_HEAD.size + sum(sizes)
    if len(body) != expected:
        raise MalformedMessage(f"{what} body is {len(body)} bytes, expected {expected}")
    columns, offset = [], _COUNT_HEAD.size
    for dtype, size in zip(dtypes, sizes):
        column = np.frombuffer(body, dtype=dtype, count=n, offset=offset)
        _finite(what, column)
        columns.append(column)
        offset += size
    return columns


def _decode_pulses(body: memoryview) -> Pulses:
    channel, time_s, amplitude, width = _decode_columns(body, "pulses", _PULSES_COLUMNS)
    if (amplitude < 0).any() or (width < 0).any():
        raise MalformedMessage("negative pulse amplitude or width")
    return Pulses(channel, time_s, amplitude, width)


def _decode_crank(body: memoryview) -> Crank:
    time_s, angle, cadence, torque = _decode_columns(body, "crank", _CRANK_COLUMNS)
    if ((angle < 0) | (angle >= 360)).any():
        raise MalformedMessage("crank angle outside 0..360 degrees")
    return Crank(time_s, angle, cadence, torque)


def _decode_status(body: memoryview) -> Status:
    if len(body) > MAX_STATUS_BYTES:
        raise MalformedMessage(f"status body too large: {len(body)} bytes")
    try:
        fields = json.loads(bytes(body), parse_constant=_reject_constant, parse_float=_finite_float)
    except MalformedMessage:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integer
        # literals; RecursionError comes from deeply nested arrays or objects.
        raise MalformedMessage(f"status body is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(fields, dict):
        raise MalformedMessage("status body is not a JSON object")
    return Status(fields)


def _reject_constant(name: str) -> None:
    raise MalformedMessage(f"status body contains {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedMessage(f"status body contains a non-finite number {text[:32]}")
    return value


_DECODERS = {
    Kind.EMG: _decode_emg,
    Kind.TRUTH: _decode_emg,
    Kind.COMMAND: _decode_command,
    Kind.PULSES: _decode_pulses,
    Kind.CRANK: _decode_crank,
    Kind.STATUS: _decode_status,
}


def decode(frames: list[bytes]) -> Message:
    """Decode ``[topic, payload]``; raise MalformedMessage on anything invalid."""
    if len(frames) != 2:
        raise MalformedMessage(f"expected 2 frames, got {len(frames)}")
    topic, payload = frames
    topic_kind = _KIND_BY_TOPIC.get(bytes(topic))
    if topic_kind is None:
        raise MalformedMessage(f"unknown topic {bytes(topic)[:32]!r}")
    view = memoryview(payload)
    if len(view) < HEADER_SIZE:
        raise MalformedMessage(f"message truncated: {len(view)} bytes, header needs {HEADER_SIZE}")
    magic, version, kind, reserved, seq, send_time = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise MalformedMessage(f"bad magic {magic!r}")
    if version != VERSION:
        raise MalformedMessage(f"protocol version {version}, this build speaks {VERSION}")
    if kind != topic_kind or reserved != 0:
        raise MalformedMessage(f"kind {kind} does not match topic {bytes(topic)!r}")
    if not math.isfinite(send_time):
        raise MalformedMessage("send time is not finite")
    body = _DECODERS[topic_kind](view[HEADER_SIZE:])
    return Message(Header(topic_kind, seq, send_time), body)
