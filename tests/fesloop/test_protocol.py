"""Wire protocol: exact round trips, and every malformed input refused as MalformedMessage.

A receiver must be able to ``try: decode(...) except MalformedMessage: count and drop``,
so any other exception type escaping ``decode`` is a bug just as much as a bad message
being accepted.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fesloop.protocol import (
    HEADER_SIZE,
    MAGIC,
    MAX_CHANNELS,
    MAX_PULSES,
    MAX_SAMPLING_RATE_HZ,
    MAX_SAMPLES,
    MAX_STATUS_BYTES,
    MIN_SAMPLING_RATE_HZ,
    TOPICS,
    VERSION,
    Command,
    Crank,
    EmgChunk,
    EmgEncoder,
    GateReason,
    Kind,
    MalformedMessage,
    Message,
    Pulses,
    Status,
    decode,
    encode,
)

HEADER = struct.Struct("<4sBBHQd")
EMG_HEAD = struct.Struct("<QdddII")
COMMAND_HEAD = struct.Struct("<dI")
PULSES_HEAD = struct.Struct("<I")
CRANK_HEAD = struct.Struct("<I")
NON_FINITE = [math.nan, math.inf, -math.inf]

# ---------------------------------------------------------------- strategies

seqs = st.integers(0, 2**64 - 1)
finite64 = st.floats(allow_nan=False, allow_infinity=False)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
unit32 = st.floats(0.0, 1.0, width=32)
nonneg32 = st.floats(0.0, allow_nan=False, allow_infinity=False, width=32)
positive64 = st.floats(0.0, exclude_min=True, allow_nan=False, allow_infinity=False)
emg_rates = st.floats(MIN_SAMPLING_RATE_HZ, MAX_SAMPLING_RATE_HZ)


@st.composite
def emg_chunks(draw, max_samples: int = 64, max_channels: int = 16) -> EmgChunk:
    shape = (draw(st.integers(1, max_samples)), draw(st.integers(1, max_channels)))
    data = draw(hnp.arrays(np.float32, shape, elements=finite32))
    return EmgChunk(
        first_sample_index=draw(st.integers(0, 2**64 - 1)),
        first_sample_time_s=draw(finite64),
        arrival_time_s=draw(finite64),
        sampling_rate_hz=draw(emg_rates),
        data=data,
    )


@st.composite
def commands(draw, max_channels: int = 64) -> Command:
    n = draw(st.integers(1, max_channels))
    intensity = draw(hnp.arrays(np.float32, n, elements=unit32))
    reasons = np.array(draw(st.lists(st.sampled_from(list(GateReason)), min_size=n, max_size=n)), dtype=np.uint8)
    return Command(
        newest_emg_time_s=draw(finite64),
        intensity=intensity,
        gate_open=reasons == GateReason.OPEN,
        gate_reason=reasons,
    )


@st.composite
def pulse_sets(draw, max_pulses: int = 64) -> Pulses:
    n = draw(st.integers(0, max_pulses))
    return Pulses(
        channel=draw(hnp.arrays(np.uint16, n)),
        time_s=draw(hnp.arrays(np.float64, n, elements=finite64)),
        amplitude_ma=draw(hnp.arrays(np.float32, n, elements=nonneg32)),
        pulse_width_us=draw(hnp.arrays(np.float32, n, elements=nonneg32)),
    )


@st.composite
def crank_sets(draw, max_readings: int = 64) -> Crank:
    n = draw(st.integers(0, max_readings))
    return Crank(
        time_s=draw(hnp.arrays(np.float64, n, elements=finite64)),
        angle_deg=draw(hnp.arrays(np.float32, n, elements=st.floats(0.0, 360.0, exclude_max=True, width=32))),
        cadence_rpm=draw(hnp.arrays(np.float32, n, elements=finite32)),
        torque_nm=draw(hnp.arrays(np.float32, n, elements=finite32)),
    )


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
statuses = st.builds(Status, st.dictionaries(st.text(max_size=12), json_values, max_size=8))

# (kind, body) pairs covering every body kind, EMG chunks also as TRUTH.
bodies = st.one_of(
    st.tuples(st.just(Kind.EMG), emg_chunks(16, 8)),
    st.tuples(st.just(Kind.TRUTH), emg_chunks(16, 8)),
    st.tuples(st.just(Kind.COMMAND), commands(32)),
    st.tuples(st.just(Kind.PULSES), pulse_sets(32)),
    st.tuples(st.just(Kind.CRANK), crank_sets(32)),
    st.tuples(st.just(Kind.STATUS), statuses),
)
messages = st.builds(
    lambda kb, seq, t: encode(seq, t, kb[1], kind=kb[0] if kb[0] is Kind.TRUTH else None),
    bodies,
    seqs,
    finite64,
)


# ---------------------------------------------------------------- helpers


def same_array(decoded: np.ndarray, original: np.ndarray, dtype) -> None:
    """Exact equality: dtype, shape and bit pattern (so -0.0 and 0.0 differ)."""
    expected = np.asarray(original, dtype=dtype)
    assert decoded.dtype == expected.dtype
    assert decoded.shape == expected.shape
    assert decoded.tobytes() == expected.tobytes()


def rejected(frames: list[bytes]) -> MalformedMessage:
    """decode must raise MalformedMessage (any other exception fails the test)."""
    with pytest.raises(MalformedMessage) as info:
        decode(frames)
    assert isinstance(info.value.reason, str) and info.value.reason
    return info.value


def header(kind: int, seq: int = 1, send_time: float = 0.5, magic: bytes = MAGIC, version: int = VERSION,
           reserved: int = 0) -> bytes:
    return HEADER.pack(magic, version, kind, reserved, seq, send_time)


def emg_payload(data, kind: Kind = Kind.EMG, t_first: float = 1.0, t_arrival: float = 1.01, fs: float = 2000.0,
                shape: tuple[int, int] | None = None) -> bytes:
    data = np.ascontiguousarray(data, dtype="<f4")
    n_samples, n_channels = shape if shape is not None else data.shape
    return header(kind) + EMG_HEAD.pack(10, t_first, t_arrival, fs, n_samples, n_channels) + data.tobytes()


def command_payload(intensity, gate, reason, newest: float = 1.0, n: int | None = None) -> bytes:
    intensity = np.asarray(intensity, dtype="<f4")
    return (
        header(Kind.COMMAND)
        + COMMAND_HEAD.pack(newest, len(intensity) if n is None else n)
        + intensity.tobytes()
        + np.asarray(gate, dtype=np.uint8).tobytes()
        + np.asarray(reason, dtype=np.uint8).tobytes()
    )


def pulses_payload(channel, time_s, amplitude, width, n: int | None = None) -> bytes:
    return (
        header(Kind.PULSES)
        + PULSES_HEAD.pack(len(channel) if n is None else n)
        + np.asarray(channel, dtype="<u2").tobytes()
        + np.asarray(time_s, dtype="<f8").tobytes()
        + np.asarray(amplitude, dtype="<f4").tobytes()
        + np.asarray(width, dtype="<f4").tobytes()
    )


def crank_payload(time_s, angle, cadence, torque, n: int | None = None) -> bytes:
    return (
        header(Kind.CRANK)
        + CRANK_HEAD.pack(len(time_s) if n is None else n)
        + np.asarray(time_s, dtype="<f8").tobytes()
        + np.asarray(angle, dtype="<f4").tobytes()
        + np.asarray(cadence, dtype="<f4").tobytes()
        + np.asarray(torque, dtype="<f4").tobytes()
    )


def status_frames(body: bytes) -> list[bytes]:
    return [b"status", header(Kind.STATUS) + body]


def assert_safe(message: Message) -> None:
    """What a receiver relies on for any message decode lets through."""
    assert np.isfinite(message.header.send_time_s)
    body = message.body
    if isinstance(body, EmgChunk):
        assert message.header.kind in (Kind.EMG, Kind.TRUTH)
        assert body.data.ndim == 2 and body.data.size > 0
        assert np.isfinite(body.data).all()
        assert math.isfinite(body.first_sample_time_s) and math.isfinite(body.arrival_time_s)
        assert MIN_SAMPLING_RATE_HZ <= body.sampling_rate_hz <= MAX_SAMPLING_RATE_HZ
    elif isinstance(body, Command):
        assert message.header.kind is Kind.COMMAND
        assert math.isfinite(body.newest_emg_time_s)
        assert len(body.intensity) == len(body.gate_open) == len(body.gate_reason) > 0
        assert np.isfinite(body.intensity).all()
        assert ((body.intensity >= 0) & (body.intensity <= 1)).all()
        assert (body.gate_open == (body.gate_reason == GateReason.OPEN)).all()
        assert set(body.gate_reason.tolist()) <= {int(r) for r in GateReason}
    elif isinstance(body, Pulses):
        assert message.header.kind is Kind.PULSES
        n = len(body.channel)
        assert len(body.time_s) == len(body.amplitude_ma) == len(body.pulse_width_us) == n
        for values in (body.time_s, body.amplitude_ma, body.pulse_width_us):
            assert np.isfinite(values).all()
        assert (body.amplitude_ma >= 0).all() and (body.pulse_width_us >= 0).all()
    elif isinstance(body, Crank):
        assert message.header.kind is Kind.CRANK
        n = len(body.time_s)
        assert len(body.angle_deg) == len(body.cadence_rpm) == len(body.torque_nm) == n
        for values in (body.time_s, body.angle_deg, body.cadence_rpm, body.torque_nm):
            assert np.isfinite(values).all()
        assert ((body.angle_deg >= 0) & (body.angle_deg < 360)).all()
    else:
        assert isinstance(body, Status)
        assert message.header.kind is Kind.STATUS
        assert isinstance(body.fields, dict)
        # Everything accepted can be re-encoded (finite, JSON-representable).
        json.dumps(body.fields, allow_nan=False)


# ---------------------------------------------------------------- round trips


@given(kind=st.sampled_from([Kind.EMG, Kind.TRUTH]), seq=seqs, send_time=finite64, chunk=emg_chunks())
def test_emg_and_truth_round_trip(kind, seq, send_time, chunk):
    frames = encode(seq, send_time, chunk, kind=kind)
    assert frames[0] == TOPICS[kind]
    message = decode(frames)
    assert message.header.kind is kind
    assert message.header.seq == seq
    assert message.header.send_time_s == send_time
    body = message.body
    assert isinstance(body, EmgChunk)
    assert body.first_sample_index == chunk.first_sample_index
    assert body.first_sample_time_s == chunk.first_sample_time_s
    assert body.arrival_time_s == chunk.arrival_time_s
    assert body.sampling_rate_hz == chunk.sampling_rate_hz
    same_array(body.data, chunk.data, np.float32)


@settings(max_examples=50)
@given(kind=st.sampled_from([Kind.EMG, Kind.TRUTH]), chunks=st.lists(emg_chunks(), min_size=2, max_size=6))
def test_a_reused_emg_encoder_encodes_each_chunk_as_a_fresh_one_does(kind, chunks):
    """Bigger and smaller chunks in turn through one buffer: nothing of an earlier chunk shows."""
    encoder = EmgEncoder(kind)
    for seq, chunk in enumerate(chunks, start=1):
        topic, payload = encoder.encode(seq, 1.5, chunk)
        assert topic == TOPICS[kind]
        assert bytes(payload) == encode(seq, 1.5, chunk, kind=kind)[1]
        same_array(decode([topic, payload]).body.data, chunk.data, np.float32)


def test_emg_encoder_refuses_other_kinds():
    with pytest.raises(ValueError, match="EMG or TRUTH"):
        EmgEncoder(Kind.COMMAND)


def test_emg_default_kind_is_emg():
    chunk = EmgChunk(0, 0.0, 0.0, 2000.0, np.zeros((2, 3), np.float32))
    frames = encode(0, 0.0, chunk)
    assert frames[0] == b"emg"
    assert decode(frames).header.kind is Kind.EMG


@given(seq=seqs, send_time=finite64, command=commands())
def test_command_round_trip(seq, send_time, command):
    frames = encode(seq, send_time, command)
    assert frames[0] == b"command"
    message = decode(frames)
    assert message.header == type(message.header)(Kind.COMMAND, seq, send_time)
    body = message.body
    assert isinstance(body, Command)
    assert body.newest_emg_time_s == command.newest_emg_time_s
    same_array(body.intensity, command.intensity, np.float32)
    same_array(body.gate_open, command.gate_open, bool)
    same_array(body.gate_reason, command.gate_reason, np.uint8)


@given(seq=seqs, send_time=finite64, pulses=pulse_sets())
def test_pulses_round_trip(seq, send_time, pulses):
    frames = encode(seq, send_time, pulses)
    assert frames[0] == b"pulses"
    message = decode(frames)
    assert message.header == type(message.header)(Kind.PULSES, seq, send_time)
    body = message.body
    assert isinstance(body, Pulses)
    same_array(body.channel, pulses.channel, np.uint16)
    same_array(body.time_s, pulses.time_s, np.float64)
    same_array(body.amplitude_ma, pulses.amplitude_ma, np.float32)
    same_array(body.pulse_width_us, pulses.pulse_width_us, np.float32)


@given(seq=seqs, send_time=finite64, crank=crank_sets())
def test_crank_round_trip(seq, send_time, crank):
    frames = encode(seq, send_time, crank)
    assert frames[0] == b"crank"
    message = decode(frames)
    assert message.header == type(message.header)(Kind.CRANK, seq, send_time)
    body = message.body
    assert isinstance(body, Crank)
    same_array(body.time_s, crank.time_s, np.float64)
    same_array(body.angle_deg, crank.angle_deg, np.float32)
    same_array(body.cadence_rpm, crank.cadence_rpm, np.float32)
    same_array(body.torque_nm, crank.torque_nm, np.float32)


@given(seq=seqs, send_time=finite64, status=statuses)
def test_status_round_trip(seq, send_time, status):
    frames = encode(seq, send_time, status)
    assert frames[0] == b"status"
    message = decode(frames)
    assert message.header == type(message.header)(Kind.STATUS, seq, send_time)
    assert isinstance(message.body, Status)
    assert message.body.fields == status.fields
    # Same JSON text, so float bit patterns (e.g. -0.0) survive too.
    assert json.dumps(message.body.fields) == json.dumps(status.fields)


@given(frames=messages)
def test_every_generated_message_decodes_safely(frames):
    assert_safe(decode(frames))


# ---------------------------------------------------------------- framing and header


@settings(deadline=None)
@given(frames=messages)
def test_every_truncation_is_rejected(frames):
    topic, payload = frames
    for length in range(len(payload)):
        rejected([topic, payload[:length]])


@given(frames=messages, extra=st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_rejected_for_binary_bodies(frames, extra):
    topic, payload = frames
    assume(topic != b"status")  # JSON allows trailing whitespace; binary bodies have exact sizes
    rejected([topic, payload + extra])


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_wrong_frame_count_is_rejected(count):
    frames = encode(1, 0.0, Status({"ok": True}))
    padded = (frames + [b""] * 4)[:count] if count <= 2 else frames + [b"x"] * (count - 2)
    rejected(padded)


@given(frames=messages, magic=st.binary(min_size=4, max_size=4))
def test_wrong_magic_is_rejected(frames, magic):
    assume(magic != MAGIC)
    topic, payload = frames
    error = rejected([topic, magic + payload[4:]])
    assert "magic" in error.reason


@given(frames=messages, version=st.integers(0, 255))
def test_wrong_version_is_rejected(frames, version):
    assume(version != VERSION)
    topic, payload = frames
    error = rejected([topic, payload[:4] + bytes([version]) + payload[5:]])
    assert "version" in error.reason


@given(frames=messages, topic=st.binary(max_size=16))
def test_unknown_topic_is_rejected(frames, topic):
    assume(topic not in TOPICS.values())
    error = rejected([topic, frames[1]])
    assert "topic" in error.reason


@given(frames=messages, other=st.sampled_from(list(Kind)))
def test_payload_under_another_topic_is_rejected(frames, other):
    topic, payload = frames
    assume(TOPICS[other] != topic)
    rejected([TOPICS[other], payload])


@given(frames=messages, kind=st.integers(0, 255))
def test_kind_byte_not_matching_topic_is_rejected(frames, kind):
    topic, payload = frames
    assume(kind != payload[5])
    rejected([topic, payload[:5] + bytes([kind]) + payload[6:]])


@given(frames=messages, reserved=st.integers(1, 2**16 - 1))
def test_nonzero_reserved_field_is_rejected(frames, reserved):
    topic, payload = frames
    rejected([topic, payload[:6] + struct.pack("<H", reserved) + payload[8:]])


@pytest.mark.parametrize("bad", NON_FINITE)
def test_non_finite_send_time_is_rejected(bad):
    topic, payload = encode(1, 0.0, Status({}))
    rejected([topic, payload[:16] + struct.pack("<d", bad) + payload[24:]])


def test_header_size_matches_layout():
    assert HEADER_SIZE == HEADER.size == 24


# ---------------------------------------------------------------- EMG body


@given(
    chunk=emg_chunks(8, 4),
    kind=st.sampled_from([Kind.EMG, Kind.TRUTH]),
    bad=st.sampled_from(NON_FINITE),
    data=st.data(),
)
def test_non_finite_emg_sample_is_rejected(chunk, kind, bad, data):
    values = chunk.data.copy()
    i = data.draw(st.integers(0, values.shape[0] - 1))
    j = data.draw(st.integers(0, values.shape[1] - 1))
    values[i, j] = bad
    bad_chunk = EmgChunk(
        chunk.first_sample_index, chunk.first_sample_time_s, chunk.arrival_time_s, chunk.sampling_rate_hz, values
    )
    error = rejected(encode(1, 0.0, bad_chunk, kind=kind))
    assert "EMG data" in error.reason


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("field", ["t_first", "t_arrival"])
def test_non_finite_emg_times_are_rejected(field, bad):
    rejected([b"emg", emg_payload(np.zeros((4, 2)), **{field: bad})])


@pytest.mark.parametrize("fs", [0.0, -2000.0, math.nan, math.inf, -math.inf, 9.99, 100_000.1, 1e300])
def test_bad_sampling_rate_is_rejected(fs):
    """1e300 Hz passed and killed the controller (its filters cannot be designed at that rate)."""
    error = rejected([b"emg", emg_payload(np.zeros((4, 2)), fs=fs)])
    assert "EMG sampling rate" in error.reason and "not within 10..100000 Hz" in error.reason


@pytest.mark.parametrize(
    "shape", [(0, 2), (4, 0), (0, 0), (MAX_SAMPLES + 1, 1), (1, MAX_CHANNELS + 1), (2**32 - 1, 2**32 - 1)]
)
def test_emg_shape_out_of_range_is_rejected(shape):
    rejected([b"emg", emg_payload(np.zeros((1, 1)), shape=shape)])


@pytest.mark.parametrize("shape", [(3, 2), (5, 2), (4, 1), (4, 3), (8, 1), (1, 8), (2, 4)])
def test_emg_sample_count_not_matching_body_is_rejected(shape):
    # 4 x 2 samples on the wire; the header claims another shape (some with equal product).
    payload = emg_payload(np.ones((4, 2)), shape=shape)
    if shape[0] * shape[1] == 8:
        message = decode([b"emg", payload])  # same byte count: a valid reshaped chunk
        assert message.body.data.shape == shape
    else:
        rejected([b"emg", payload])


def test_emg_at_maximum_shape_edges_is_accepted():
    for shape in [(MAX_SAMPLES, 1), (1, MAX_CHANNELS)]:
        chunk = EmgChunk(0, 0.0, 0.0, 2000.0, np.zeros(shape, np.float32))
        assert decode(encode(0, 0.0, chunk)).body.data.shape == shape


# ---------------------------------------------------------------- command body


@given(command=commands(8), bad=st.sampled_from(NON_FINITE), data=st.data())
def test_non_finite_intensity_is_rejected(command, bad, data):
    intensity = command.intensity.copy()
    intensity[data.draw(st.integers(0, len(intensity) - 1))] = bad
    rejected(encode(1, 0.0, Command(command.newest_emg_time_s, intensity, command.gate_open, command.gate_reason)))


@given(
    command=commands(8),
    bad=st.one_of(
        st.floats(max_value=0.0, exclude_max=True, allow_nan=False, allow_infinity=False, width=32),
        st.floats(min_value=1.0, exclude_min=True, allow_nan=False, allow_infinity=False, width=32),
    ),
    data=st.data(),
)
def test_intensity_outside_unit_range_is_rejected(command, bad, data):
    intensity = command.intensity.copy()
    intensity[data.draw(st.integers(0, len(intensity) - 1))] = bad
    error = rejected(
        encode(1, 0.0, Command(command.newest_emg_time_s, intensity, command.gate_open, command.gate_reason))
    )
    assert "0..1" in error.reason


def test_intensity_edges_are_accepted():
    body = decode([b"command", command_payload([0.0, 1.0, -0.0], [1, 1, 1], [0, 0, 0])]).body
    assert body.intensity.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("bad", NON_FINITE)
def test_non_finite_newest_emg_time_is_rejected(bad):
    rejected([b"command", command_payload([0.5], [1], [0], newest=bad)])


@pytest.mark.parametrize(
    "gate, reason",
    [
        ([1], [GateReason.NO_EMG]),  # open but with a closing reason
        ([0], [GateReason.OPEN]),  # closed without a reason
        ([1, 0], [GateReason.OPEN, GateReason.OPEN]),
        ([1, 1], [GateReason.OPEN, GateReason.SHUTDOWN]),
        ([2], [GateReason.OPEN]),  # flag is not 0/1
        ([255], [GateReason.STALE_EMG]),
        ([0], [max(GateReason) + 1]),  # unknown reason
        ([0], [255]),
    ],
)
def test_gate_flag_and_reason_disagreement_is_rejected(gate, reason):
    rejected([b"command", command_payload([0.0] * len(gate), gate, [int(r) for r in reason])])


@given(command=commands(8), data=st.data())
def test_any_gate_disagreement_is_rejected(command, data):
    i = data.draw(st.integers(0, len(command.intensity) - 1))
    gate = command.gate_open.copy()
    gate[i] = not gate[i]
    rejected(encode(1, 0.0, Command(command.newest_emg_time_s, command.intensity, gate, command.gate_reason)))


@pytest.mark.parametrize("claimed", [0, 1, 2, 4, 5, MAX_CHANNELS + 1, 2**32 - 1])
def test_command_channel_count_mismatch_is_rejected(claimed):
    # three channels on the wire
    rejected([b"command", command_payload([0.1, 0.2, 0.3], [1, 1, 1], [0, 0, 0], n=claimed)])


def test_command_arrays_of_unequal_length_are_rejected():
    rejected(encode(1, 0.0, Command(0.0, np.array([0.1, 0.2], np.float32), np.array([True]), np.array([0], np.uint8))))


# ---------------------------------------------------------------- pulses body


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("field", ["time_s", "amplitude", "width"])
def test_non_finite_pulse_values_are_rejected(field, bad):
    values = {"time_s": [1.0, 2.0], "amplitude": [10.0, 20.0], "width": [300.0, 300.0]}
    values[field] = [values[field][0], bad]
    rejected([b"pulses", pulses_payload([0, 1], values["time_s"], values["amplitude"], values["width"])])


@pytest.mark.parametrize("field", ["amplitude", "width"])
def test_negative_pulse_amplitude_or_width_is_rejected(field):
    values = {"amplitude": [10.0], "width": [300.0]}
    values[field] = [-1e-3]
    rejected([b"pulses", pulses_payload([0], [1.0], values["amplitude"], values["width"])])


@pytest.mark.parametrize("claimed", [0, 1, 3, MAX_PULSES + 1, 2**32 - 1])
def test_pulse_count_mismatch_is_rejected(claimed):
    rejected([b"pulses", pulses_payload([0, 1], [1.0, 2.0], [1.0, 1.0], [300.0, 300.0], n=claimed)])


def test_empty_pulse_list_is_accepted():
    body = decode([b"pulses", pulses_payload([], [], [], [])]).body
    assert isinstance(body, Pulses) and len(body.channel) == 0


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("field", ["time_s", "angle", "cadence", "torque"])
def test_non_finite_crank_values_are_rejected(field, bad):
    values = {"time_s": [1.0, 2.0], "angle": [10.0, 20.0], "cadence": [40.0, 40.0], "torque": [1.0, 1.0]}
    values[field] = [values[field][0], bad]
    rejected([b"crank", crank_payload(values["time_s"], values["angle"], values["cadence"], values["torque"])])


@pytest.mark.parametrize("angle", [-1e-3, 360.0, 720.0])
def test_crank_angle_outside_a_turn_is_rejected(angle):
    rejected([b"crank", crank_payload([1.0], [angle], [40.0], [0.0])])


@pytest.mark.parametrize("claimed", [0, 2, MAX_PULSES + 1, 2**32 - 1])
def test_crank_count_mismatch_is_rejected(claimed):
    rejected([b"crank", crank_payload([1.0], [10.0], [40.0], [0.0], n=claimed)])


# ---------------------------------------------------------------- status body


def test_status_at_size_limit_is_accepted_and_one_byte_more_rejected():
    base = b'{"pad":"'
    body = base + b"x" * (MAX_STATUS_BYTES - len(base) - 2) + b'"}'
    assert len(body) == MAX_STATUS_BYTES
    assert decode(status_frames(body)).body.fields["pad"] == "x" * (MAX_STATUS_BYTES - len(base) - 2)
    body = base + b"x" * (MAX_STATUS_BYTES - len(base) - 1) + b'"}'
    error = rejected(status_frames(body))
    assert "too large" in error.reason


def test_oversize_status_is_rejected_even_if_encoder_produces_it():
    frames = encode(1, 0.0, Status({"pad": "x" * MAX_STATUS_BYTES}))
    rejected(frames)


@pytest.mark.parametrize("body", [b"[]", b"[1,2]", b"1", b"1.5", b'"text"', b"null", b"true", b"false"])
def test_non_object_json_status_is_rejected(body):
    error = rejected(status_frames(body))
    assert "object" in error.reason


@pytest.mark.parametrize(
    "body",
    [
        b'{"x":NaN}',
        b'{"x":Infinity}',
        b'{"x":-Infinity}',
        b'{"x":[1,{"y":NaN}]}',
        b'{"x":1e999}',  # overflows to inf without a NaN/Infinity literal
        b'{"x":-1e999}',
        b'{"x":[0.5,{"y":1E400}]}',
    ],
)
def test_non_finite_number_in_status_is_rejected(body):
    rejected(status_frames(body))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"a":1',
        b"{'a':1}",
        b'{"a":1}}',
        b"\xff\xfe\x00",
        b"\xc3\x28",  # invalid UTF-8
        b'{"a":"\xff"}',
        b"\x00{",  # looks like UTF-16
        b"[" * 100_000,  # over the size limit
        b"[" * 50_000 + b"]" * 10_000,  # deep nesting within the size limit
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b'{"a":' + b"9" * 5000 + b"}",  # integer longer than Python's int-parsing limit
        b'{"a":-' + b"1" * 10_000 + b"}",
    ],
)
def test_invalid_json_status_is_rejected(body):
    rejected(status_frames(body))


def test_status_with_large_but_parsable_values_is_accepted():
    body = b'{"a":' + b"9" * 4000 + b',"b":1e308,"c":-0.0,"d":' + b"[" * 100 + b"]" * 100 + b"}"
    fields = decode(status_frames(body)).body.fields
    assert fields["a"] == int("9" * 4000) and fields["b"] == 1e308


# ---------------------------------------------------------------- fuzz


def decodes_or_rejects(frames: list[bytes]) -> None:
    try:
        message = decode(frames)
    except MalformedMessage:
        return
    assert isinstance(message, Message)
    assert_safe(message)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.sampled_from(list(TOPICS.values())), payload=st.binary(max_size=512))
def test_fuzz_arbitrary_payload(topic, payload):
    decodes_or_rejects([topic, payload])


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(Kind)), seq=seqs, send_time=finite64, body=st.binary(max_size=512))
def test_fuzz_valid_header_arbitrary_body(kind, seq, send_time, body):
    decodes_or_rejects([TOPICS[kind], header(kind, seq, send_time) + body])


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(list(Kind)),
    body=st.one_of(
        st.text(max_size=300).map(str.encode),
        st.from_regex(rb"\A[\[\]{}\":,0-9eE+\-.a-zA-Z \\]{0,300}\Z"),
        json_values.map(lambda v: json.dumps(v).encode()),
    ),
)
def test_fuzz_json_like_bodies(kind, body):
    decodes_or_rejects([TOPICS[kind], header(kind) + body])


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(frames=messages, data=st.data())
def test_fuzz_mutated_valid_messages(frames, data):
    topic, payload = frames
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(HEADER_SIZE, len(mutated) - 1)) if len(mutated) > HEADER_SIZE else None
        if position is None:
            break
        mutated[position] = data.draw(st.integers(0, 255))
    decodes_or_rejects([topic, bytes(mutated)])
