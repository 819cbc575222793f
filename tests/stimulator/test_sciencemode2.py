"""ScienceMode2 packet codec: byte vectors worked out by hand from the protocol PDF v1.24."""

from __future__ import annotations

import pytest

from stimulator import sciencemode2 as sm2
from stimulator.sciencemode2 import Cmd


def bitwise_crc8(data: bytes) -> int:
    """CRC-8 poly 0x07 written as polynomial division over the message bits (reference)."""
    register = 0
    for bit in [(byte >> (7 - i)) & 1 for byte in data for i in range(8)] + [0] * 8:
        top = register >> 7
        register = ((register << 1) | bit) & 0xFF
        if top:
            register ^= 0x07
    return register


def test_crc8_check_value_and_reference() -> None:
    assert sm2.crc8(b"123456789") == 0xF4  # catalogue check value of CRC-8 (poly 0x07, init 0)
    for data in (b"", b"\x00", b"\x00\x04", bytes(range(256))):
        assert sm2.crc8(data) == bitwise_crc8(data)


def test_watchdog_packet_bytes() -> None:
    # payload 00 04 (packet 0, Watchdog): CRC-8 = 0x1C by hand, length 2
    assert sm2.encode(0, Cmd.WATCHDOG) == bytes([0xF0, 0x81, 0x1C ^ 0x55, 0x81, 0x02 ^ 0x55, 0x00, 0x04, 0x0F])
    assert sm2.encode(0, Cmd.WATCHDOG) == bytes.fromhex("F0 81 49 81 57 00 04 0F")


def test_pdf_example_start_byte_in_data_is_stuffed_to_81_a5() -> None:
    packet = sm2.encode(7, Cmd.START_CHANNEL_LIST_MODE, bytes([0x00, 0x01, 0xF0, 0x28]))
    body = bytes([7, 32, 0x00, 0x01, 0x81, 0xA5, 0x28])  # 240 us written as 01 F0: F0 escaped
    assert packet == bytes([0xF0, 0x81, sm2.crc8(body) ^ 0x55, 0x81, len(body) ^ 0x55]) + body + b"\x0f"


@pytest.mark.parametrize(
    ("raw", "sent"),
    [(0xF0, b"\x81\xa5"), (0x0F, b"\x81\x5a"), (0x81, b"\x81\xd4"), (0x55, b"\x55"), (0x0A, b"\x0a"), (0x00, b"\x00")],
)
def test_only_start_stop_and_stuffing_bytes_are_escaped(raw: int, sent: bytes) -> None:
    assert sm2.stuff(bytes([raw])) == sent
    assert sm2.unstuff(sent) == bytes([raw])


def test_packet_number_and_command_are_stuffed_with_the_prefix() -> None:
    packet = sm2.encode(0xF0, 0x0F)  # not the in-place XOR pysciencemode uses
    assert packet[5:-1] == b"\x81\xa5\x81\x5a"
    assert packet[4] ^ 0x55 == 4  # length counts stuffed bytes
    assert sm2.Decoder().feed(packet) == [sm2.Packet(0xF0, 0x0F, b"")]


def test_checksum_and_length_are_over_the_stuffed_bytes() -> None:
    packet = sm2.encode(1, Cmd.START_CHANNEL_LIST_MODE, b"\x81")
    body = b"\x01\x20\x81\xd4"
    assert packet[2] ^ 0x55 == sm2.crc8(body) != sm2.crc8(b"\x01\x20\x81")
    assert packet[4] ^ 0x55 == 4


def test_init_channel_list_mode_bytes() -> None:
    # 30 Hz on channels 1 and 2: t1 = 65 * 0.5 + 1 = 33.5 ms, t2 = 13 * 0.5 + 1.5 = 8 ms
    init = sm2.ChannelListInit(0, 0b11, 0, 13, 65)
    assert init.to_bytes() == bytes([0, 0x03, 0, 13, 0x00, 0x41, 0])
    assert sm2.ChannelListInit(3, 0xFF, 0x80, 13, 1998).to_bytes()[4:6] == bytes([0x07, 0xCE])  # MSB first
    assert sm2.ChannelListInit.from_bytes(init.to_bytes()) == init
    assert init.main_interval_ms == 33.5 and init.inter_pulse_ms == 8.0 and init.channels == [0, 1]


def test_start_channel_list_mode_bytes_msb_first() -> None:
    settings = [sm2.ChannelSetting(0, 300, 40), sm2.ChannelSetting(0, 500, 130)]
    data = sm2.start_data(settings)
    assert data == bytes([0, 0x01, 0x2C, 40, 0, 0x01, 0xF4, 130])
    assert sm2.parse_start_data(data, 2) == settings


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (bytes([3, 0x01, 0xF5, 10]), "mode 3"),
        (bytes([0, 0x01, 0xF5, 10]), "501 us"),
        (bytes([0, 0x01, 0xF4, 131]), "131 mA"),
        (bytes([0, 0x01, 0xF4]), "4 data bytes"),
    ],
)
def test_start_data_out_of_range_is_a_parameter_error(data: bytes, match: str) -> None:
    with pytest.raises(sm2.ParameterError, match=match):
        sm2.parse_start_data(data, 1)


def test_pulse_width_below_20_us_becomes_20_as_the_device_does() -> None:
    assert sm2.parse_start_data(bytes([0, 0, 19, 5]), 1) == [sm2.ChannelSetting(0, 20, 5)]


@pytest.mark.parametrize(
    ("init", "match"),
    [
        (bytes([8, 1, 0, 13, 0, 65, 0]), "low frequency factor"),
        (bytes([0, 1, 0, 12, 0, 65, 0]), "inter pulse interval 7.5 ms"),
        (bytes([0, 1, 0, 13, 0, 13, 0]), "main interval 7.5 ms"),
        (bytes([0, 1, 0, 13, 0x08, 0x01, 0]), "main interval code 2049 > 2048"),
        (bytes([0, 1, 0, 13, 0, 65, 2]), "channel execution"),
        (bytes([0, 1, 0, 13, 0, 65]), "7 data bytes"),
    ],
)
def test_init_out_of_range_is_a_parameter_error(init: bytes, match: str) -> None:
    with pytest.raises(sm2.ParameterError, match=match):
        sm2.ChannelListInit.from_bytes(init)


def test_init_takes_the_longest_main_interval() -> None:
    """The PDF's range is [0, 2048] (1025 ms); 2048 was refused as beyond 11 bits."""
    assert sm2.ChannelListInit.from_bytes(bytes([0, 1, 0, 13, 0x08, 0x00, 0])).main_interval_ms == 1025.0


def test_signed_result_codes() -> None:
    assert [sm2.to_signed(b) for b in (0, 0xFF, 0xFE, 0xFD, 0xF8)] == [0, -1, -2, -3, -8]
    assert [sm2.to_byte(c) for c in (-1, -2, -3)] == [0xFF, 0xFE, 0xFD]


def _payload_with_checksum(target: int) -> bytes:
    for a in range(256):
        for b in range(256):
            if sm2.crc8(sm2.stuff(bytes([1, 32, a, b]))) == target:
                return bytes([a, b])
    raise AssertionError(f"no payload with checksum {target:#x}")


@pytest.mark.parametrize("checksum", [0x5A, 0xA5, 0xD4])  # sent as 0x0F, 0xF0, 0x81 after the XOR
def test_stuffed_checksum_equal_to_a_delimiter_is_not_taken_for_one(checksum: int) -> None:
    data = _payload_with_checksum(checksum)
    packet = sm2.encode(1, 32, data)
    assert packet[2] == checksum ^ 0x55
    assert sm2.Decoder().feed(packet) == [sm2.Packet(1, 32, data)]


def test_stuffed_length_equal_to_the_stop_byte_is_not_taken_for_one() -> None:
    data = b"\xf0" * 28 + b"\x01" * 32  # 28 escaped + 32 plain = 88 stuffed, +2 -> length 90 = 0x5A
    packet = sm2.encode(2, 32, data)
    assert packet[4] == 0x0F
    assert sm2.Decoder().feed(packet) == [sm2.Packet(2, 32, data)]


def test_decoder_byte_by_byte_with_garbage_between_packets() -> None:
    decoder = sm2.Decoder()
    stream = b"\x00\x55\x0f" + sm2.encode(3, Cmd.INIT, b"\x01") + b"\xaa" + sm2.encode(4, Cmd.WATCHDOG)
    out = [item for byte in stream for item in decoder.feed(bytes([byte]))]
    assert out == [sm2.Packet(3, 1, b"\x01"), sm2.Packet(4, 4, b"")]
    assert decoder.garbage_bytes == 4 and decoder.frame_errors == 0


def test_second_start_byte_drops_the_broken_frame_and_keeps_the_next() -> None:
    decoder = sm2.Decoder()
    good = sm2.encode(5, Cmd.WATCHDOG)
    out = decoder.feed(good[:6] + good)
    assert isinstance(out[0], sm2.FrameError) and "start byte inside a frame" in out[0].reason
    assert out[1:] == [sm2.Packet(5, 4, b"")]


def test_bad_checksum_is_a_transfer_error_naming_number_and_command() -> None:
    packet = bytearray(sm2.encode(9, Cmd.STOP_CHANNEL_LIST_MODE))
    packet[2] ^= 0x01
    (error,) = sm2.Decoder().feed(bytes(packet))
    assert isinstance(error, sm2.FrameError) and "checksum" in error.reason
    assert (error.number, error.command) == (9, Cmd.STOP_CHANNEL_LIST_MODE)


def test_wrong_length_is_a_transfer_error() -> None:
    packet = bytearray(sm2.encode(9, Cmd.WATCHDOG))
    packet[4] = 3 ^ 0x55
    (error,) = sm2.Decoder().feed(bytes(packet))
    assert isinstance(error, sm2.FrameError) and "length byte 3 but 2" in error.reason


def test_unstuffed_checksum_and_dangling_stuffing_byte_are_frame_errors() -> None:
    decoder = sm2.Decoder()
    assert isinstance(decoder.feed(bytes([0xF0, 0x1C, 0x81, 0x57, 0x00, 0x04, 0x00, 0x0F]))[0], sm2.FrameError)
    body = b"\x00\x04\x81"
    dangling = bytes([0xF0, 0x81, sm2.crc8(body) ^ 0x55, 0x81, 3 ^ 0x55]) + body + b"\x0f"
    assert isinstance(decoder.feed(dangling)[0], sm2.FrameError)
    assert decoder.frame_errors == 2


@pytest.mark.parametrize("fragment", [b"\xf0", b"\xf0\x00", b"\xf0\x81", b"\xf0\x81\x13", b"\xf0\x81\x13\x81"])
def test_a_fragment_does_not_take_the_next_packet_with_it(fragment: bytes) -> None:
    """Section 5.2: bytes are rejected up to the next start byte. A fragment of two or more bytes
    swallowed the packet after it (its start byte read as the fragment's checksum or length):
    a StimulationError behind line noise went unseen."""
    report = sm2.encode(7, Cmd.STIMULATION_ERROR, bytes((sm2.to_byte(-2),)))
    decoder = sm2.Decoder()
    out = decoder.feed(fragment + report)
    assert out[-1] == sm2.Packet(7, Cmd.STIMULATION_ERROR, bytes((sm2.to_byte(-2),)))
    assert all(isinstance(item, sm2.FrameError) for item in out[:-1]) and decoder.frame_errors == len(out) - 1


def test_a_frame_failing_its_check_is_scanned_again_for_the_next_start() -> None:
    """A frame cut short whose stuffed checksum and length happen to look whole: the start byte of
    the packet after it sits at the checksum's place; the failed frame is read again from there."""
    report = sm2.encode(8, Cmd.STIMULATION_ERROR, bytes((sm2.to_byte(-1),)))
    out = sm2.Decoder().feed(b"\xf0\x81" + report)
    assert out[-1] == sm2.Packet(8, Cmd.STIMULATION_ERROR, bytes((sm2.to_byte(-1),)))
    assert sm2.Decoder().feed(report + report) == [sm2.Packet(8, Cmd.STIMULATION_ERROR, bytes((sm2.to_byte(-1),)))] * 2


def test_run_without_stop_byte_is_bounded() -> None:
    decoder = sm2.Decoder()
    out = decoder.feed(b"\xf0\x81\x00\x81\x00" + b"\x01" * (2 * sm2.MAX_FRAME_BYTES))
    assert len(out) == 1 and "no stop byte" in out[0].reason
    assert decoder.feed(sm2.encode(1, Cmd.WATCHDOG)) == [sm2.Packet(1, 4, b"")]


def test_encode_refuses_what_the_protocol_cannot_carry() -> None:
    with pytest.raises(ValueError, match="at most 60"):
        sm2.encode(0, 32, bytes(61))
    with pytest.raises(ValueError, match="must be bytes"):
        sm2.encode(256, 32)


def test_actual_values_bytes_msb_first_and_signed() -> None:
    values = sm2.ActualValues(angle_deg=300, speed_rpm=-16, torque_dnm=125)
    assert values.to_bytes() == bytes([0x01, 0x2C, 0xFF, 0xF0, 0x00, 0x7D])  # 300 = 0x012C, -16 = 0xFFF0
    assert values.torque_nm == 12.5  # the PDF gives torque in dNm
    assert sm2.ActualValues.from_bytes(values.to_bytes()) == values
    framed = sm2.encode(7, Cmd.ACTUAL_VALUES, values.to_bytes())  # 0xF0 inside the data is stuffed
    assert b"\x81\xa5" in framed and sm2.Decoder().feed(framed)[0].data == values.to_bytes()


@pytest.mark.parametrize(
    ("data", "match"), [(bytes(5), "6 data bytes"), (bytes([0x01, 0x68, 0, 0, 0, 0]), "angle 360")]
)
def test_actual_values_out_of_range_is_a_parameter_error(data: bytes, match: str) -> None:
    with pytest.raises(sm2.ParameterError, match=match):
        sm2.ActualValues.from_bytes(data)
