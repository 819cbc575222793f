"""The RehaStim2 driver against the protocol emulator over a real pseudo-terminal (pyserial)."""

from __future__ import annotations

import os
import re
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from fesloop.config import StimulationChannel
from stimulator import sciencemode2 as sm2
from stimulator.drivers.base import DriverFault
from stimulator.drivers.rehastim2 import ACK_TIMEOUT_S, MAX_REFUSED_STOPS, WRITE_TIMEOUT_S, RehaStim2Driver, SerialLink
from stimulator.rehastim2_emulator import (
    WATCHDOG_TIMEOUT_S,
    EmulatedMotomed,
    EmulatedPulse,
    PtyEmulator,
    RehaStim2Emulator,
)

pytestmark = pytest.mark.timeout(30)

QUAD = StimulationChannel(
    name="quad", muscle="quad", device_channel=0, electrode_area_cm2=25.0,
    threshold_ma=12.0, max_ma=40.0, pulse_width_us=300.0, frequency_hz=30.0,
)  # fmt: skip
TIB = StimulationChannel(
    name="tib", muscle="tib", device_channel=4, electrode_area_cm2=16.0,
    threshold_ma=10.0, max_ma=30.0, pulse_width_us=250.0, frequency_hz=30.0,
)  # fmt: skip
WIDTHS_US = np.array([300.0, 250.0])
PERIOD_S = 0.0335  # 30 Hz -> t1 code 65 -> 33.5 ms


@pytest.fixture
def emulator() -> Iterator[PtyEmulator]:
    with PtyEmulator() as emu:
        yield emu


@pytest.fixture
def driver(emulator: PtyEmulator) -> Iterator[RehaStim2Driver]:
    drv = RehaStim2Driver([QUAD, TIB], SerialLink(emulator.path), time.monotonic)
    try:
        yield drv
    finally:
        drv.close()


class Loop:
    """Drives the driver as the stimulator loop does: every 2 ms service it; optionally
    set an output and feed the keep-alive (as after a fresh command)."""

    def __init__(self, driver: RehaStim2Driver) -> None:
        self.driver = driver
        self.pulses: list[tuple[int, float, float, float]] = []

    def run(self, seconds: float, output_ma: list[float] | None = None, fresh: bool = True) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = time.monotonic()
            if output_ma is not None:
                self.driver.set_output(np.array(output_ma), WIDTHS_US, now)
            if fresh:
                self.driver.keep_alive(now)
            self.service(now)
            time.sleep(0.002)

    def service(self, now: float) -> None:
        pulses = self.driver.deliver_due(now)
        if pulses is not None:
            for i in range(len(pulses.channel)):
                self.pulses.append(
                    (int(pulses.channel[i]), float(pulses.time_s[i]), float(pulses.amplitude_ma[i]), float(pulses.pulse_width_us[i]))
                )

    def until(self, predicate, timeout_s: float, what: str, output_ma: list[float] | None = None) -> None:
        end = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > end:
                pytest.fail(f"timed out waiting for {what}")
            self.run(0.01, output_ma)


def emulated(emulator: PtyEmulator) -> list[EmulatedPulse]:
    with emulator.lock:
        return list(emulator.device.pulses)


def commands(emulator: PtyEmulator) -> list[int]:
    with emulator.lock:
        return [p.command for p in emulator.device.commands]


def connected(loop: Loop) -> Loop:
    loop.until(loop.driver.ready, 2.0, "the Init/InitAck handshake")
    return loop


def stimulating(loop: Loop, emulator: PtyEmulator, output_ma: list[float]) -> None:
    loop.until(lambda: emulator.device.stimulating, 1.0, "stimulation to start", output_ma)
    loop.run(0.3, output_ma)


def corrupting_writes(driver: RehaStim2Driver) -> Callable[[], None]:
    """Make every packet the driver writes fail its checksum; returns the undo."""
    real_write = driver.link.write
    driver.link.write = lambda data: real_write(data[:2] + bytes([data[2] ^ 0x01]) + data[3:])  # type: ignore[method-assign]
    return lambda: setattr(driver.link, "write", real_write)


def wait_for(predicate, emulator: PtyEmulator, what: str, timeout_s: float = 2.0) -> None:
    """Until the emulator (which serves the pty in its own thread) shows ``predicate``; the driver is not serviced."""
    end = time.monotonic() + timeout_s
    while True:
        with emulator.lock:
            if predicate():
                return
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


@contextmanager
def first_start_held(driver: RehaStim2Driver, emulator: PtyEmulator) -> Iterator[None]:
    """The driver sets the channel list up and writes its first Start (20 mA on quad) while the
    emulator reads nothing: it holds the emulator's lock until the block ends."""
    driver.set_output(np.array([20.0, 0.0]), WIDTHS_US, time.monotonic())  # InitChannelListMode goes out
    wait_for(lambda: emulator.device.mode is sm2.StimulationMode.INITIALIZED, emulator, "the channel list set up")
    with emulator.lock:
        deadline = time.monotonic() + 2.0
        while driver.mode is not sm2.StimulationMode.INITIALIZED:  # its ack read: the Start goes out
            assert time.monotonic() < deadline, "no ack to InitChannelListMode"
            driver.deliver_due(time.monotonic())
        yield


def test_handshake_answers_the_devices_init(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = Loop(driver)
    assert not driver.ready()
    with pytest.raises(DriverFault, match="device not ready.*quad"):
        driver.set_output(np.array([10.0, 0.0]), WIDTHS_US, time.monotonic())
    connected(loop)
    with emulator.lock:
        assert emulator.device.connected and not emulator.device.stimulating
    assert driver.protocol_version == 1 and driver.status()["device"] == "connected"
    # A starting driver's one Stop (ignored by a device not connected yet), then the answer to Init.
    assert commands(emulator)[:2] == [sm2.Cmd.STOP_CHANNEL_LIST_MODE, sm2.Cmd.INIT_ACK]
    assert sm2.Cmd.INIT_CHANNEL_LIST_MODE not in commands(emulator)  # nothing is set up before output


def test_start_delivers_what_the_driver_publishes(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    loop.run(0.5, [20.0, 0.0])
    device = emulated(emulator)
    assert commands(emulator)[2:4] == [sm2.Cmd.INIT_CHANNEL_LIST_MODE, sm2.Cmd.START_CHANNEL_LIST_MODE]
    with emulator.lock:
        init = emulator.device.channel_list
    assert init is not None and init.active_mask == 0b10001 and init.main_interval_ms == PERIOD_S * 1e3
    assert {(p.channel, p.current_ma, p.pulse_width_us) for p in device} == {(0, 20, 300)}
    published = [p for p in loop.pulses if p[1] <= device[-1].time_s]
    assert {(c, a, w) for c, _, a, w in published} == {(0, 20.0, 300.0)}
    assert abs(len(published) - len(device)) <= 1
    # Published times follow the channel-list timing: the same period, offset by the ack's travel.
    times = np.array([t for _, t, _, _ in published])
    np.testing.assert_allclose(np.diff(times), PERIOD_S, atol=1e-9)
    offsets = times[: len(device)] - np.array([p.time_s for p in device])[: len(times)]
    assert np.all(np.abs(offsets) < 0.01), offsets


def test_update_changes_parameters_without_a_new_init(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    loop.run(0.3, [25.7, 15.0])
    device = emulated(emulator)
    assert {(p.channel, p.current_ma) for p in device[-4:]} == {(0, 25), (4, 15)}  # floored to 1 mA
    # Channel 5 (module B) pulses in the second 1.5 ms slot of the list.
    last_list = [p for p in device if p.time_s >= device[-1].time_s - 0.002]
    assert [round((p.time_s - last_list[0].time_s) * 1e3, 3) for p in last_list] == [0.0, 1.5]
    sent = commands(emulator)
    assert sent.count(sm2.Cmd.INIT_CHANNEL_LIST_MODE) == 1 and sent.count(sm2.Cmd.START_CHANNEL_LIST_MODE) == 2
    assert {(c, a) for c, _, a, _ in loop.pulses[-4:]} == {(0, 25.0), (4, 15.0)}


def test_all_zero_stops_and_output_starts_again(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    loop.until(lambda: not emulator.device.stimulating, 0.2, "stop", [0.0, 0.0])
    n = len(emulated(emulator))
    loop.run(0.3, [0.0, 0.0])
    assert len(emulated(emulator)) == n
    published = len(loop.pulses)
    loop.run(0.1, [0.0, 0.0])
    assert len(loop.pulses) == published
    stimulating(loop, emulator, [20.0, 10.0])
    assert [c for c in commands(emulator) if c != sm2.Cmd.WATCHDOG][-3:] == [
        sm2.Cmd.GET_STIMULATION_MODE, sm2.Cmd.INIT_CHANNEL_LIST_MODE, sm2.Cmd.START_CHANNEL_LIST_MODE,
    ]  # fmt: skip


def test_zero_sends_stop_at_once(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    driver.zero()
    loop.until(lambda: not emulator.device.stimulating, 0.1, "stop after zero()", None)
    loop.run(0.2, [0.0, 0.0])
    assert driver.stale_acks <= 1 and driver.mode is not sm2.StimulationMode.STARTED


def test_zero_does_not_repeat_a_stop_on_its_way(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    """A loop failing on every step calls zero() every step: one Stop goes out, its ack decides;
    repeating it would keep the device's watchdog fed."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    with emulator.lock:
        emulator.device.drop_acks = True  # the Stop's ack is slow to come
    n_sent = len(commands(emulator))
    for _ in range(20):
        driver.zero()
    wait_for(lambda: not emulator.device.stimulating, emulator, "the Stop")
    time.sleep(0.05)
    assert commands(emulator)[n_sent:] == [sm2.Cmd.STOP_CHANNEL_LIST_MODE]
    with emulator.lock:
        emulator.device.drop_acks = False


def test_keep_alive_only_after_fresh_commands_lets_the_device_watchdog_stop_output(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    loop.run(2.0, [20.0, 10.0])  # fresh commands for longer than the watchdog: stays on
    with emulator.lock:
        assert emulator.device.stimulating
    assert driver.watchdogs_sent >= 5
    # The loop still runs but no fresh command arrives: no keep-alive, no packet at all.
    last_sent = driver.last_sent_s
    with pytest.raises(DriverFault, match="sent Init during stimulation"):  # the device reset itself
        loop.run(1.8, [20.0, 10.0], fresh=False)
    with emulator.lock:
        device = emulator.device
        stopped = [t for t, what in device.events if "watchdog" in what]
        last_pulse = device.pulses[-1].time_s
        assert not device.stimulating
    assert len(stopped) == 1
    after_s = stopped[0] - last_sent
    print(f"emulator watchdog stopped output {after_s * 1e3:.1f} ms after the driver's last packet")
    assert WATCHDOG_TIMEOUT_S <= after_s <= WATCHDOG_TIMEOUT_S + 0.01
    assert last_pulse <= stopped[0]


def test_dead_loop_lets_the_watchdog_fire_and_the_devices_init_faults_it(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    last_sent = driver.last_sent_s
    time.sleep(WATCHDOG_TIMEOUT_S + 0.2)  # the loop is dead: nothing is called at all
    with emulator.lock:
        assert not emulator.device.stimulating and not emulator.device.connected
    with pytest.raises(DriverFault, match="sent Init during stimulation.*quad \\(device channel 1\\)"):
        loop.service(time.monotonic())
    assert driver.ready()  # the Init was answered: a fresh session after reset
    assert emulator.device.events[-1][0] - last_sent >= WATCHDOG_TIMEOUT_S


@pytest.mark.parametrize(
    ("code", "cause"),
    [(-1, "emergency switch activated or not connected"), (-2, "electrode error"), (-3, "stimulation module error")],
)
def test_stimulation_error_faults_naming_cause_and_channels(
    emulator: PtyEmulator, driver: RehaStim2Driver, code: int, cause: str
) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    with emulator.lock:
        emulator.device.inject_stimulation_error(code, time.monotonic())
    with pytest.raises(DriverFault) as error:
        loop.until(lambda: False, 0.5, "the StimulationError", [20.0, 0.0])
    message = str(error.value)
    assert f"StimulationError {code}: {cause}" in message and "the device stopped" in message
    assert error.value.channels == ("quad (device channel 1)",)
    assert "tib" not in message  # at 0 mA: not concerned
    assert driver.mode is sm2.StimulationMode.START
    n_sent = len(commands(emulator))
    driver.zero()  # the device already stopped: nothing to send
    assert len(commands(emulator)) == n_sent


@pytest.mark.parametrize(("byte", "garble"), [(2, 0x01), (0, 0xF0)], ids=["checksum", "start byte"])
def test_a_garbled_stimulation_error_is_found_by_asking_the_mode(
    emulator: PtyEmulator, driver: RehaStim2Driver, byte: int, garble: int
) -> None:
    """Section 5.3: a report with a transfer error -> the PC asks the mode. The garbled report was
    dropped: the driver went on publishing pulses the stopped device never gave, and fed its watchdog."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    with emulator.lock:
        emulator.device.inject_stimulation_error(-2, time.monotonic())
        emulator.device.outbox[byte] ^= garble
    with pytest.raises(DriverFault) as error:
        loop.until(lambda: False, 0.5, "the mode check", [20.0, 0.0])
    assert "RehaStim2 is in START mode: it stopped on its own" in str(error.value)
    assert error.value.channels == ("quad (device channel 1)",)
    assert sm2.Cmd.GET_STIMULATION_MODE in commands(emulator) and driver.mode is sm2.StimulationMode.START
    assert driver.status()["frame_errors"] + driver.status()["garbage_bytes"] >= 1


def test_a_stimulation_error_sent_as_command_33_is_found_by_asking_the_mode(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """The PDF's StimulationError table gives command 33 (StartChannelListModeAck), section 3.3 gives
    38: a firmware sending 33 looked like a stale ack, and the stopped device went unnoticed."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    with emulator.lock:
        emulator.device.inject_stimulation_error(-2, time.monotonic())
        emulator.device.outbox.clear()
        emulator.device.outbox += sm2.encode(201, sm2.Cmd.START_CHANNEL_LIST_MODE_ACK, bytes((sm2.to_byte(-2),)))
    with pytest.raises(DriverFault, match="RehaStim2 is in START mode: it stopped on its own"):
        loop.until(lambda: False, 0.5, "the mode check", [20.0, 0.0])
    assert driver.status()["stale_acks"] >= 1


def test_a_cut_does_not_wait_for_the_mode_asked_after_garbled_bytes(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    """The mode query after line noise was a command in flight that a gate closing did not pre-empt:
    with its answer lost too, the closed channel was stimulated until the 100 ms ack timeout."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 20.0])
    with emulator.lock:
        emulator.device.outbox += b"\x55\x81"  # two bytes of line noise
        emulator.device.drop_acks = True  # and the answers after them are lost
    loop.until(lambda: driver._in_flight is not None and driver._in_flight.command is sm2.Cmd.GET_STIMULATION_MODE,
               1.0, "the mode query", [20.0, 20.0])
    cut_s = time.monotonic()
    with pytest.raises(DriverFault, match="no answer"):  # the lost answers fault it in the end
        loop.until(lambda: False, 0.5, "the ack timeout", [0.0, 20.0])
    late = [p for p in emulated(emulator) if p.channel == 0 and p.time_s > cut_s + 0.005]
    assert late == []  # the cut went out at once


def test_a_channel_list_started_again_waits_out_the_period(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    """Every channel at 0 stops the device; a Start right after began a new list, pulsing at once: an
    output flickering to 0 (a gate, or pulse-width modulation switching a channel off below 20 us)
    pulsed faster than the configured frequency and above the electrode's rms limit."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    for _ in range(10):
        loop.run(0.004, [0.0, 0.0])
        loop.run(0.05, [20.0, 0.0])
    times = np.array([p.time_s for p in emulated(emulator) if p.channel == 0])
    with emulator.lock:
        starts = [t for t, what in emulator.device.events if what == "stimulation started"]
    assert len(starts) >= 6  # it does start again after each stop, once the period has passed
    assert np.diff(times).min() >= PERIOD_S - 0.001


def test_an_unknown_command_report_names_the_channels_on(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    emulator.inject_line_bytes(sm2.encode(200, sm2.Cmd.UNKNOWN_COMMAND, bytes((99,))))
    with pytest.raises(DriverFault) as error:
        loop.until(lambda: False, 0.5, "the report", [20.0, 0.0])
    assert "does not know command 99" in str(error.value) and error.value.channels == ("quad (device channel 1)",)


def test_a_restarted_stimulator_stops_the_device_at_once(emulator: PtyEmulator) -> None:
    """The stimulator process died while the device stimulated and was started again: its new driver
    waited for an Init the connected device never sends, so the old channel list ran on until the
    device's watchdog fired (1.2 s). Now the new driver's first packet is a Stop."""
    first = RehaStim2Driver([QUAD, TIB], SerialLink(emulator.path), time.monotonic)
    loop = connected(Loop(first))
    stimulating(loop, emulator, [20.0, 0.0])
    restarted_s = time.monotonic()  # the first driver is gone (never serviced again); a new one on the port
    second = RehaStim2Driver([QUAD, TIB], first.link, time.monotonic)  # (a pty closed once cannot be opened again)
    try:
        wait_for(lambda: not emulator.device.stimulating, emulator, "the device to stop", timeout_s=0.5)
        stopped_s = time.monotonic()
    finally:
        second.close()
    assert stopped_s - restarted_s < 0.1  # the device's own watchdog would take 1.2 s


def test_ack_timeout_faults_then_the_driver_stays_silent_until_the_device_resets(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    with emulator.lock:
        emulator.device.drop_acks = True
    sent_s = time.monotonic()
    with pytest.raises(DriverFault, match="no answer to START_CHANNEL_LIST_MODE within 100 ms.*quad"):
        loop.until(lambda: False, 1.0, "the ack timeout", [30.0, 0.0])
    assert ACK_TIMEOUT_S <= time.monotonic() - sent_s <= ACK_TIMEOUT_S + 0.05
    assert not driver.ready()
    n_sent = len(commands(emulator))
    driver.zero()  # the device may be stimulating: one Stop, then silence
    loop.run(0.5, [0.0, 0.0])
    assert commands(emulator)[n_sent:] == [sm2.Cmd.STOP_CHANNEL_LIST_MODE]
    with emulator.lock:
        emulator.device.drop_acks = False
    loop.until(driver.ready, 2.0, "the device's Init after its watchdog", [0.0, 0.0])
    with emulator.lock:
        assert not emulator.device.stimulating


def test_garbage_on_the_line_is_dropped_both_ways(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    broken = bytearray(sm2.encode(200, sm2.Cmd.START_CHANNEL_LIST_MODE_ACK, b"\x00"))
    broken[2] ^= 0xFF
    emulator.inject_line_bytes(b"\x00\x13\x0f\x55" + bytes(broken) + b"\xf0\x81" + b"\x01" * 200)
    driver.link.write(b"\xff\x0f\xf0\x00" + sm2.encode(7, sm2.Cmd.STOP_CHANNEL_LIST_MODE)[:-1])  # no stop byte
    loop.run(0.5, [21.0, 10.0])
    with emulator.lock:
        assert emulator.device.stimulating
        assert emulator.device.decoder.frame_errors >= 1 and emulator.device.decoder.garbage_bytes >= 1
        assert emulator.device.settings[0].current_ma == 21
    status = driver.status()
    assert status["garbage_bytes"] >= 4 and status["frame_errors"] >= 2
    assert sm2.Cmd.GET_STIMULATION_MODE in commands(emulator)  # asked, found running: no fault


def test_a_refused_update_leaves_the_device_running_until_zero_stops_it(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """A refused Start changed nothing on the device: it still stimulates, so the driver must
    still count it as stimulating and zero() (the loop's failure path) must send Stop."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    restore = corrupting_writes(driver)
    with pytest.raises(DriverFault, match="refused START_CHANNEL_LIST_MODE: -1 \\(transfer error\\)"):
        loop.until(lambda: False, 0.5, "the transfer error", [25.0, 0.0])
    restore()
    with emulator.lock:
        assert emulator.device.stimulating and emulator.device.settings[0].current_ma == 20
    assert driver.mode is sm2.StimulationMode.STARTED
    driver.zero()
    loop.until(lambda: not emulator.device.stimulating, 0.5, "the Stop sent by zero()", None)
    loop.run(0.3, [0.0, 0.0], fresh=False)
    with emulator.lock:
        assert not emulator.device.stimulating


def test_a_refused_stop_goes_out_again_until_the_device_stops(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    restore = corrupting_writes(driver)
    with pytest.raises(DriverFault, match="refused STOP_CHANNEL_LIST_MODE: -1"):
        loop.until(lambda: False, 0.5, "the transfer error", [0.0, 0.0])
    restore()
    with emulator.lock:
        assert emulator.device.stimulating  # the corrupted Stop did nothing
    n_sent = len(commands(emulator))
    loop.until(lambda: not emulator.device.stimulating, 0.5, "the Stop sent again", [0.0, 0.0])
    assert sm2.Cmd.STOP_CHANNEL_LIST_MODE in commands(emulator)[n_sent:]


def test_a_first_start_overtaken_by_a_refused_stop_still_counts_as_stimulating(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """The first Start is on the line when the output drops to zero; the Stop that overtakes it
    is corrupted and refused. The Start did reach the device, which stimulates: the driver must
    count it as stimulating, so zero() (the loop's failure path) sends Stop."""
    loop = connected(Loop(driver))
    with first_start_held(driver, emulator):  # the emulator reads nothing until both packets are on the line
        restore = corrupting_writes(driver)
        driver.set_output(np.zeros(2), WIDTHS_US, time.monotonic())  # the Stop overtakes the Start
        restore()
    with pytest.raises(DriverFault, match="refused STOP_CHANNEL_LIST_MODE: -1.*quad"):
        loop.until(lambda: False, 0.5, "the refused Stop", None)
    with emulator.lock:
        assert emulator.device.stimulating  # the Start took effect
    driver.zero()
    loop.until(lambda: not emulator.device.stimulating, 0.5, "the Stop sent by zero()", None)


def test_a_first_start_left_unanswered_is_stopped_after_the_ack_timeout(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """The device runs the first Start but its ack is lost: after the 100 ms ack timeout the
    Start counts as applied, the fault names its channels, and zero() sends the one Stop."""
    loop = connected(Loop(driver))
    with first_start_held(driver, emulator):
        emulator.device.drop_acks = True  # from the Start on
    with pytest.raises(DriverFault, match="no answer to START_CHANNEL_LIST_MODE within 100 ms.*quad"):
        loop.until(lambda: False, 0.5, "the ack timeout", [20.0, 0.0])
    with emulator.lock:
        assert emulator.device.stimulating
    driver.zero()
    wait_for(lambda: not emulator.device.stimulating, emulator, "the Stop sent by zero()", 0.5)
    with emulator.lock:
        emulator.device.drop_acks = False


def test_cuts_overtaking_each_other_do_not_put_off_the_ack_timeout(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """The device answers nothing while two gates close in turn: every cut overtakes the
    unanswered update, but the 100 ms count runs from the first unanswered command."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    with emulator.lock:
        emulator.device.drop_acks = True
    started = time.monotonic()
    driver.set_output(np.array([21.0, 10.0]), WIDTHS_US, started)
    with pytest.raises(DriverFault, match="no answer to START_CHANNEL_LIST_MODE within 100 ms"):
        for k in range(100):  # 1 s of gates flipping every 10 ms
            loop.run(0.01, [0.0, 10.0] if k % 2 else [21.0, 0.0])
    assert time.monotonic() - started < 0.5
    with emulator.lock:
        emulator.device.drop_acks = False


def test_the_ack_timeout_counts_from_the_write_not_from_a_stale_loop_time(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """A loop step whose time was read 150 ms before it wrote an update (the process descheduled):
    the update's ack, read at once, had "timed out" (CI: a FAULT 1 ms after a write stamped 98 ms early)."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    with emulator.lock:  # the device answers nothing until the update has been checked for its ack
        driver.set_output(np.array([25.0, 0.0]), WIDTHS_US, time.monotonic() - 0.15)
        driver.deliver_due(time.monotonic())  # raised "no answer ... within 100 ms": 0 ms after the write
    loop.run(0.2, [25.0, 0.0])
    with emulator.lock:
        assert emulator.device.settings[0].current_ma == 25


def test_pulses_are_never_stamped_before_their_start_was_written(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    """The first Start's ack read in a step whose time was taken 200 ms before the Start went out: the
    channel list was anchored there and published pulses 200 ms before the device's first one."""
    loop = connected(Loop(driver))
    stale_s = time.monotonic() - 0.2
    with first_start_held(driver, emulator):
        pass
    wait_for(lambda: emulator.device.stimulating, emulator, "the device to run the Start")
    deadline_s = time.monotonic() + 1.0
    while driver.mode is not sm2.StimulationMode.STARTED:  # its ack, read in the stale step
        assert time.monotonic() < deadline_s, "no ack to the Start"
        loop.service(stale_s)
    loop.run(0.2, [20.0, 0.0])
    first_device_s = emulated(emulator)[0].time_s
    first_published_s = loop.pulses[0][1]
    assert first_device_s - 0.005 <= first_published_s <= first_device_s + 0.01


def test_a_write_the_os_completes_slowly_is_no_timeout(emulator: PtyEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process descheduled for 20 ms inside a complete write: pyserial's wall-clock write timeout
    raised "Write timeout" though every byte had gone (a FAULT on a loaded host, seen in CI)."""
    link = SerialLink(emulator.path)
    real_write = os.write

    def descheduled(fd: int, data: bytes) -> int:
        if fd == link.port.fileno():
            time.sleep(2 * WRITE_TIMEOUT_S)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", descheduled)
    try:
        link.write(sm2.encode(1, sm2.Cmd.WATCHDOG))
    finally:
        monkeypatch.undo()
        link.close()
    wait_for(lambda: [p.command for p in emulator.device.commands] == [sm2.Cmd.WATCHDOG], emulator, "the packet")


def test_a_port_that_trickles_fails_the_write_at_its_deadline(emulator: PtyEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port taking a byte every 9 ms: each byte restarted the timeout, and a 130-byte write held the
    loop 1.2 s (no deadline, no fault: the device's watchdog time). Now the whole packet has one."""
    link = SerialLink(emulator.path)
    real_write = os.write

    def trickle(fd: int, data: bytes) -> int:
        if fd == link.port.fileno():
            time.sleep(0.009)
            return real_write(fd, bytes(data[:1]))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", trickle)
    started = time.monotonic()
    try:
        with pytest.raises(DriverFault, match=r"serial write timed out: \d+ of 130 bytes written in 16 ms"):
            link.write(bytes(130))
    finally:
        monkeypatch.undo()
        link.close()
    assert time.monotonic() - started < 0.2


def test_a_port_that_takes_no_byte_fails_the_write_after_the_timeout() -> None:
    """Nobody reads the device side: once the port's buffers are full, the write that cannot go on fails
    after WRITE_TIMEOUT_S, saying how much of the packet went out."""
    master, slave = os.openpty()
    tty.setraw(slave)
    link = SerialLink(os.ttyname(slave))
    packet = bytes(range(100))
    try:
        for _ in range(100_000):  # a pty holds some kB
            started = time.monotonic()
            try:
                link.write(packet)
            except DriverFault as exc:
                assert time.monotonic() - started >= WRITE_TIMEOUT_S
                assert re.fullmatch(r"serial write timed out: \d+ of 100 bytes written in 15 ms", exc.cause)
                break
        else:
            pytest.fail("the port never filled up")
    finally:
        link.close()
        os.close(master)
        os.close(slave)


def test_an_init_ack_that_cannot_be_written_closes_the_link_once(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    def failing(_data: bytes) -> None:
        raise DriverFault("serial write failed: [Errno 5] Input/output error")

    driver.link.write = failing  # type: ignore[method-assign]
    loop, faults = Loop(driver), []
    end = time.monotonic() + 1.3  # the device repeats its Init every 500 ms
    while time.monotonic() < end:
        try:
            loop.run(0.01, None, fresh=False)
        except DriverFault as exc:
            faults.append(str(exc))
    assert len(faults) == 1 and "the serial link is closed" in faults[0]
    assert driver.link_lost and "serial link lost" in driver.status()["device"]


def test_every_packet_of_one_read_is_handled_and_each_fault_named(emulator: PtyEmulator, driver: RehaStim2Driver) -> None:
    """Two device reports arrive together: the first must not hide the second (nor the
    state change it carries: the electrode error stopped the device)."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    unknown = sm2.encode(200, sm2.Cmd.UNKNOWN_COMMAND, bytes((99,)))
    electrode = sm2.encode(201, sm2.Cmd.STIMULATION_ERROR, bytes((sm2.to_byte(-2),)))
    with emulator.lock:
        emulator.device.inject_stimulation_error(-2, time.monotonic())  # the device stops, as it would
        emulator.device.outbox.clear()  # its own report replaced by the pair below, in one write
        emulator.device.outbox += unknown + electrode
    with pytest.raises(DriverFault) as error:
        loop.until(lambda: False, 0.5, "the two reports", [20.0, 0.0])
    assert "does not know command 99" in str(error.value) and "StimulationError -2: electrode error" in str(error.value)
    assert driver.mode is sm2.StimulationMode.START


def test_an_unknown_stimulation_mode_faults_instead_of_asking_forever(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    loop.until(lambda: not emulator.device.stimulating, 0.5, "stop", [0.0, 0.0])
    with emulator.lock:
        emulator.device.mode = 7  # a mode the protocol does not have
    with pytest.raises(DriverFault, match="GetStimulationMode with no known mode"):
        loop.until(lambda: False, 0.5, "the answer to GetStimulationMode", [20.0, 0.0])
    assert commands(emulator).count(sm2.Cmd.GET_STIMULATION_MODE) == 1  # asked once; the fault stops the loop's output


def test_stops_refused_again_and_again_silence_the_driver_so_the_device_watchdog_stops_it(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """The line corrupts every packet from now on: each Stop is refused (transfer error) and
    the device keeps stimulating. After MAX_REFUSED_STOPS the driver sends nothing more, and
    the device's watchdog stops it 1.2 s after the last valid packet."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    corrupting_writes(driver)
    refusals = 0
    end = time.monotonic() + 2.0
    while not driver.silent_reason and time.monotonic() < end:
        try:
            loop.run(0.01, [0.0, 0.0], fresh=False)
        except DriverFault as exc:
            assert "refused STOP_CHANNEL_LIST_MODE: -1" in str(exc) and "quad" in str(exc)
            refusals += 1
            driver.zero()  # as the loop's failure path does
    assert refusals == MAX_REFUSED_STOPS and f"Stop refused {MAX_REFUSED_STOPS} times" in driver.silent_reason
    with emulator.lock:
        assert emulator.device.stimulating
        last_valid_s, packets = emulator.device.last_valid_s, emulator.device.transfer_errors
    loop.run(0.5, [0.0, 0.0], fresh=True)  # the loop goes on (even fed fresh commands): nothing goes out
    driver.zero()
    assert driver.mode is sm2.StimulationMode.STARTED  # still counted as stimulating: it is
    with emulator.lock:
        assert emulator.device.transfer_errors == packets  # not even a (corrupted) Stop since
    wait_for(lambda: not emulator.device.stimulating, emulator, "the device's watchdog", WATCHDOG_TIMEOUT_S)
    with emulator.lock:
        assert emulator.device.last_valid_s == last_valid_s  # the silence held: nothing valid since
        assert any("watchdog" in what for _, what in emulator.device.events)
    with pytest.raises(DriverFault, match="sent Init during stimulation"):  # and the driver learns of the reset
        loop.until(lambda: False, 1.0, "the device's Init", [0.0, 0.0])


def test_an_update_refused_for_the_wrong_mode_means_not_set_up_and_the_driver_starts_over(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """The device lost its set-up without saying so; an update comes back 'wrong mode'. It is not
    stimulating then: the driver forgets the set-up, and the next output asks its mode first."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    with emulator.lock:
        emulator.device.mode, emulator.device.channel_list = sm2.StimulationMode.START, None
    with pytest.raises(DriverFault, match="refused START_CHANNEL_LIST_MODE: -3 \\(wrong mode error\\)"):
        loop.until(lambda: False, 0.5, "the wrong-mode refusal", [21.0, 10.0])
    assert driver.mode is None
    n_sent = len(commands(emulator))
    stimulating(loop, emulator, [21.0, 10.0])
    assert [c for c in commands(emulator)[n_sent:] if c != sm2.Cmd.WATCHDOG][:3] == [
        sm2.Cmd.GET_STIMULATION_MODE, sm2.Cmd.INIT_CHANNEL_LIST_MODE, sm2.Cmd.START_CHANNEL_LIST_MODE,
    ]  # fmt: skip


def test_a_cut_to_zero_goes_out_without_waiting_for_the_ack_in_flight(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    """A gate closing (one channel to 0) or a disarm (all to 0) while a ramp update awaits its
    ack: the device gets the cut at once, not after the ack (up to 100 ms) or its timeout."""
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 10.0])
    with emulator.lock:
        emulator.device.drop_acks = True  # the ramp's update is never answered
    now = time.monotonic()
    driver.set_output(np.array([21.0, 10.0]), WIDTHS_US, now)
    wait_for(lambda: emulator.device.settings[0].current_ma == 21, emulator, "the unanswered update")
    driver.set_output(np.array([21.0, 0.0]), WIDTHS_US, now + 0.002)  # tib's gate closes
    wait_for(lambda: emulator.device.settings[1].current_ma == 0, emulator, "tib cut while an update is unanswered")
    with emulator.lock:
        assert emulator.device.stimulating and emulator.device.settings[0].current_ma == 21
    driver.set_output(np.zeros(2), WIDTHS_US, now + 0.004)  # disarm
    wait_for(lambda: not emulator.device.stimulating, emulator, "Stop while the cut is unanswered")
    with emulator.lock:
        emulator.device.drop_acks = False


def test_a_vanished_port_faults_once_naming_the_channels_then_stays_closed(
    emulator: PtyEmulator, driver: RehaStim2Driver
) -> None:
    loop = connected(Loop(driver))
    stimulating(loop, emulator, [20.0, 0.0])
    emulator.close()  # the USB cable is pulled: the device side of the port is gone
    with pytest.raises(DriverFault) as error:
        loop.until(lambda: False, 0.5, "the serial failure", [20.0, 0.0])
    assert "serial" in error.value.cause and "the serial link is closed" in error.value.cause
    assert error.value.channels == ("quad (device channel 1)",)
    assert not driver.ready() and "serial link lost" in driver.status()["device"]
    driver.zero()
    assert driver.deliver_due(time.monotonic()) is None  # no second fault per loop step
    with pytest.raises(DriverFault, match="device not ready: serial link lost"):
        driver.set_output(np.array([20.0, 0.0]), WIDTHS_US, time.monotonic())
    driver.set_output(np.zeros(2), WIDTHS_US, time.monotonic())  # zero is always accepted


def test_motomed_actual_values_reach_take_crank_every_20_ms() -> None:
    with PtyEmulator(RehaStim2Emulator(EmulatedMotomed(cadence_rpm=45.0, torque_nm=-12.5))) as emulator:
        driver = RehaStim2Driver([QUAD, TIB], SerialLink(emulator.path), time.monotonic)
        try:
            loop = connected(Loop(driver))
            readings = []
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                loop.run(0.01)
                crank = driver.take_crank()
                if crank is not None:
                    readings.append(crank)
            emulator.inject_line_bytes(sm2.encode(200, sm2.Cmd.ACTUAL_VALUES, bytes([0x01, 0x68, 0, 45, 0, 0])))
            loop.run(0.05)
            status = driver.status()
        finally:
            driver.close()
        with emulator.lock:
            sent = list(emulator.device.actual_values)
    angle = np.concatenate([c.angle_deg for c in readings])
    received_s = np.concatenate([c.time_s for c in readings])
    assert len(angle) >= 20  # 0.5 s at one reading per 20 ms
    assert [(v.angle_deg, v.speed_rpm, v.torque_dnm) for _, v in sent[: len(angle)]] == [
        (int(a), 45, -125) for a in angle
    ]
    assert np.all(np.concatenate([c.cadence_rpm for c in readings]) == 45.0)
    assert np.all(np.concatenate([c.torque_nm for c in readings]) == -12.5)  # sent in dNm
    np.testing.assert_allclose(np.median(np.diff(received_s)), 0.020, atol=0.003)
    assert status["bad_actual_values"] == 1  # the angle-360 reading: counted and dropped
    assert status["actual_values"] >= len(angle)
