"""The sample clock (index -> local time from read times) and the wall-clock step watch (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acquisition.sample_clock import Line, RateOffNominal, SampleClock, WallClockWatch
from acquisition.sources import SourceError, advance_sample_clock

pytestmark = pytest.mark.timeout(60)


def reads(fs_hz: float, ppm: float, latency_s: np.ndarray, read_every_s: float = 0.002) -> list[tuple[int, float]]:
    """(stop index, read time) of a loop that wakes every ``read_every_s`` and takes every sample that
    an amplifier running ``ppm`` off its nominal rate has taken so far (sample i at i * true period);
    read k learns of its newest sample ``latency_s[k]`` after it was taken."""
    period_s = 1.0 / (fs_hz * (1.0 + ppm * 1e-6))
    out, next_index = [], 0
    for k, wake_s in enumerate(np.arange(1, latency_s.size + 1) * read_every_s):
        stop = int(wake_s / period_s) + 1
        if stop > next_index:
            out.append((stop, (stop - 1) * period_s + latency_s[k]))
            next_index = stop
    return out


def delivered(fs_hz: float, ppm: float, latency_s_at, duration_s: float, read_every_s: float = 0.002):
    """(stop index, read time) of a loop waking every ``read_every_s`` that takes every sample delivered
    so far; sample i is taken at i * true period and delivered ``latency_s_at(taken_s)`` later, in order."""
    period_s = 1.0 / (fs_hz * (1.0 + ppm * 1e-6))
    taken_s = np.arange(int(duration_s / period_s)) * period_s
    arrival_s = np.maximum.accumulate(taken_s + np.vectorize(latency_s_at)(taken_s))
    out, next_index = [], 0
    for wake_s in np.arange(1, int(duration_s / read_every_s)) * read_every_s:
        stop = int(np.searchsorted(arrival_s, wake_s, side="right"))
        if stop > next_index:
            out.append((stop, float(wake_s)))
            next_index = stop
    return out


def stamped(clock: SampleClock, schedule: list[tuple[int, float]]) -> list[tuple[int, Line]]:
    """Each read's first index and the line its samples were stamped with."""
    out, first = [], 0
    for stop, read_s in schedule:
        out.append((first, clock.advance(stop, read_s)))
        first = stop
    return out


@pytest.mark.timeout(30)
@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=60), st.floats(0.0, 0.05), st.floats(1.0, 1e4))
def test_regular_reads_give_exactly_the_sample_times_plus_the_latency(sizes, latency_s, t0_s) -> None:
    """No jitter, nominal rate: every sample at t0 + latency + i / fs, whatever the read sizes."""
    fs_hz = 500.0
    clock = SampleClock(fs_hz)
    stops = np.cumsum(sizes)
    lines = stamped(clock, [(int(stop), t0_s + latency_s + (stop - 1) / fs_hz) for stop in stops])
    for first, line in lines:
        assert line.time_of(first) == pytest.approx(t0_s + latency_s + first / fs_hz, abs=1e-9)
        assert line.period_s == pytest.approx(1.0 / fs_hz, rel=1e-9)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("fs_hz", "ppm"), [(1000.0, 200.0), (1000.0, -300.0), (250.0, 220.0)])
def test_the_clock_follows_the_amplifier_drift_and_not_the_read_jitter(seed: int, fs_hz: float, ppm: float) -> None:
    """An amplifier a few hundred ppm off its nominal rate, reads 0..2 ms late at random: after 30 s
    every stamp is within 0.15 ms of the sample's true time plus the mean latency (1 ms), and the
    fitted period within 10 ppm of the true one; chunk times follow the indices and never go back."""
    latency_s = np.random.default_rng(seed).uniform(0.0, 0.002, 60000)
    clock = SampleClock(fs_hz)
    lines = stamped(clock, reads(fs_hz, ppm, latency_s))
    true_period_s = 1.0 / (fs_hz * (1.0 + ppm * 1e-6))
    settled = [(first, line) for first, line in lines if first * true_period_s > 30.0]

    errors_s = np.array([line.time_of(first) - first * true_period_s - 0.001 for first, line in settled])
    assert np.abs(errors_s).max() < 150e-6
    assert clock.period_s == pytest.approx(true_period_s, rel=10e-6)
    firsts_s = np.array([line.time_of(first) for first, line in lines])
    sizes = np.diff([first for first, _ in lines])
    assert np.all(np.diff(firsts_s) > 0)
    assert np.abs(np.diff(firsts_s) - sizes / fs_hz).max() < 0.01 * sizes.min() / fs_hz


@pytest.mark.timeout(30)
def test_consecutive_lines_join_exactly() -> None:
    """A read's line ends where the next one starts: chunk times never jump between reads."""
    latency_s = np.random.default_rng(7).uniform(0.0, 0.004, 5000)
    lines = stamped(SampleClock(1000.0), reads(1000.0, 150.0, latency_s))
    for (_, line), (next_first, next_line) in zip(lines, lines[1:]):
        assert next_line.time_s == pytest.approx(line.time_of(next_first), abs=1e-12)
        assert next_line.index == next_first and next_line.jump_s == 0.0


@pytest.mark.timeout(30)
def test_a_late_read_pulls_the_line_no_more_than_an_outlier() -> None:
    """A read 150 ms late (a delivery stall) moves the line by at most sqrt(2) * omega * outlier_s, and
    leaves the period alone (a clipped pull integrated would wind the loop up)."""
    fs_hz = 1000.0
    clock = SampleClock(fs_hz)
    stamped(clock, [(2 * k, (2 * k - 1) / fs_hz) for k in range(1, 501)])  # locked: sample i at i / fs
    line = clock.advance(1004, 1.003 + 0.150)
    omega = 2 * math.pi * clock.bandwidth_hz * 4 / fs_hz
    assert line.time_of(1004) - 1.004 == pytest.approx(math.sqrt(2) * omega * clock.outlier_s, rel=1e-6)
    assert line.jump_s == 0.0 and line.time_of(1000) == pytest.approx(1.0, abs=1e-9)
    assert clock.period_s == pytest.approx(1.0 / fs_hz, rel=1e-12)


@pytest.mark.timeout(30)
def test_a_read_far_earlier_than_the_line_anchors_it_again_and_reports_the_jump() -> None:
    """Samples cannot arrive 0.3 s before they were taken: the line was wrong (e.g. the index jumped
    over samples that were not lost); it goes through the read from there on, the jump reported."""
    fs_hz = 1000.0
    clock = SampleClock(fs_hz)
    stamped(clock, [(2 * k, (2 * k - 1) / fs_hz) for k in range(1, 501)])
    line = clock.advance(1300, 1.002)
    assert line.jump_s == pytest.approx(1.002 - 1.299, abs=1e-9)
    assert line.time_of(1299) == pytest.approx(1.002, abs=1e-9)
    assert clock.advance(1302, 1.004).time_of(1300) == pytest.approx(1.003, abs=1e-9)


def test_index_at_inverts_the_line() -> None:
    clock = SampleClock(1000.0)
    assert clock.index_at(5.0) is None
    clock.advance(100, 10.0)  # sample 99 read at 10 s
    assert clock.index_at(10.0) == pytest.approx(99.0)
    assert clock.index_at(10.5) == pytest.approx(599.0)


def test_a_wall_clock_step_is_reported_and_slewing_is_not() -> None:
    """The offset local - wall, measured at every read: +2 s on the wall clock is a step of +2 s;
    NTP slewing (500 ppm, 1 us per 2 ms read) never adds up to a report."""
    watch = WallClockWatch()
    assert watch.update(100.0) == 0.0
    offsets = 100.0 - 1e-6 * np.arange(1, 20001)
    assert all(watch.update(offset) == 0.0 for offset in offsets)
    assert watch.update(offsets[-1] - 2.0) == pytest.approx(2.0)
    assert watch.update(offsets[-1] - 2.0) == 0.0
    assert watch.update(offsets[-1] + 3600.0) == pytest.approx(-3602.0)


def time_errors_s(lines: list[tuple[int, Line]], schedule: list[tuple[int, float]], fs_hz: float, latency_s: float):
    """Per read: its time, and how far the line puts its first sample from when it was taken plus ``latency_s``."""
    read_s = np.array([read for _, read in schedule])
    return read_s, np.array([line.time_of(first) - first / fs_hz - latency_s for first, line in lines])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("first_latency_s", [0.090, -0.057])
def test_late_or_early_first_reads_are_followed_within_a_second_with_one_reported_jump(first_latency_s) -> None:
    """The samples of the first 50 ms arrive 90 ms late (or the line starts 57 ms too late: the first
    read 3 ms, then a steady 60 ms): one reported re-anchor, and from 1 s on every read's samples
    within 2 ms of their true time plus the latency, without overshoot; times never go back elsewhere."""
    fs_hz = 1000.0
    steady_s = 0.003 if first_latency_s > 0 else 0.060
    early_s = first_latency_s if first_latency_s > 0 else 0.003
    schedule = delivered(fs_hz, 0.0, lambda t: early_s if t < 0.05 else steady_s, 10.0)
    lines = stamped(SampleClock(fs_hz), schedule)
    read_s, errors_s = time_errors_s(lines, schedule, fs_hz, steady_s)

    jumps = [k for k, (_, line) in enumerate(lines) if line.jump_s]
    assert len(jumps) == 1 and read_s[jumps[0]] < 1.0
    assert np.abs(errors_s[read_s >= 1.0]).max() < 0.002
    firsts_s = np.array([line.time_of(first) for first, line in lines])
    assert np.all(np.delete(np.diff(firsts_s), jumps[0] - 1) > 0)


@pytest.mark.timeout(30)
def test_a_lasting_latency_step_is_followed_within_a_second_with_one_reported_jump() -> None:
    """The delivery latency steps from 3 to 83 ms at 5 s: one re-anchor of about +80 ms before 6 s,
    and every read from 6 s on within 2 ms of the true sample time plus the new latency."""
    fs_hz = 1000.0
    schedule = delivered(fs_hz, 0.0, lambda t: 0.003 if t < 5.0 else 0.083, 15.0)
    lines = stamped(SampleClock(fs_hz), schedule)
    read_s, errors_s = time_errors_s(lines, schedule, fs_hz, 0.083)

    jumps = [(read_s[k], line.jump_s) for k, (_, line) in enumerate(lines) if line.jump_s]
    assert len(jumps) == 1 and 5.0 < jumps[0][0] < 6.0 and jumps[0][1] == pytest.approx(0.080, abs=0.002)
    assert np.abs(errors_s[read_s >= 6.0]).max() < 0.002


@pytest.mark.timeout(30)
def test_a_backlog_that_catches_up_within_a_tenth_of_a_second_is_no_reanchor() -> None:
    """A 60 ms delivery stall caught up over the next 0.1 s (dozens of reads beyond the outlier
    limit, all late) is read jitter, not a lasting offset: no jump."""
    fs_hz = 1000.0
    schedule = delivered(fs_hz, 0.0, lambda t: 0.063 if 2.0 <= t < 2.1 else 0.003, 5.0)
    lines = stamped(SampleClock(fs_hz), schedule)
    read_s, errors_s = time_errors_s(lines, schedule, fs_hz, 0.003)
    late_reads = np.count_nonzero((read_s > 2.0) & (read_s < 2.2) & (read_s - np.array(
        [(stop - 1) / fs_hz for stop, _ in schedule]) > 0.013))

    assert late_reads > 20
    assert not any(line.jump_s for _, line in lines)
    assert np.abs(errors_s).max() < 0.002


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ppm", [-20000.0, -12000.0, 15000.0, 30000.0])
def test_an_amplifier_off_its_rate_beyond_the_loop_reach_is_a_source_error_naming_both_rates(ppm: float) -> None:
    """250 Hz nominal, 1.2 to 3 % off (the line would drift or re-anchor again and again): within 5 s the
    clock gives up (SourceError, which closes the gates), naming the measured rate (within 0.2 % of the
    true one) and the nominal one; the re-anchors before it are reported."""
    fs_hz = 250.0
    true_hz = fs_hz * (1.0 + ppm * 1e-6)
    clock, events = SampleClock(fs_hz), []
    with pytest.raises(SourceError) as raised:
        for stop, read_s in delivered(fs_hz, ppm, lambda t: 0.003, 5.0):
            advance_sample_clock(clock, stop, read_s, events, "amp")
    text = str(raised.value)
    assert text.startswith("amp: samples arrive at ") and "nominal rate is 250 Hz" in text
    measured_hz = float(text.split("arrive at ")[1].split(" Hz")[0])
    assert measured_hz == pytest.approx(true_hz, rel=0.002)
    assert events and all(event.marker.startswith("sample clock anchored again") for event in events)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ppm", [-500.0, 500.0, -5000.0])
def test_an_amplifier_within_reach_never_raises_nor_jumps(ppm: float) -> None:
    """250 Hz, 0.05 to 0.5 % off, latency 3..7 ms at random, 12-sample packets read every 2 ms: 60 s
    without a re-anchor or a RateOffNominal."""
    rng = np.random.default_rng(3)
    clock = SampleClock(250.0)
    schedule = delivered(250.0, ppm, lambda t: 0.003 + rng.uniform(0.0, 0.004), 60.0)
    packets = [(stop - stop % 12, read_s) for stop, read_s in schedule]
    packets = [p for p, q in zip(packets, [(0, 0.0), *packets]) if p[0] > q[0]]
    assert not any(line.jump_s for _, line in stamped(clock, packets))
    assert clock.period_s == pytest.approx(1.0 / (250.0 * (1.0 + ppm * 1e-6)), rel=100e-6)


def test_rate_off_nominal_says_both_rates() -> None:
    assert "245.0 Hz" in str(RateOffNominal(245.0, 250.0)) and "250 Hz" in str(RateOffNominal(245.0, 250.0))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stall_s", [0.3, 1.0])
def test_a_long_backlog_draining_over_many_reads_is_no_reanchor(stall_s: float) -> None:
    """Delivery stalls 300 ms or 1 s, then the link catches up at twice the rate (a Bluetooth
    hiccup): the reads are late for as long again, less and less. That is no step in the latency:
    no jump (it was taken for one after 0.2 s, anchored there, and anchored back once caught up),
    and every read before and after the backlog within 2 ms of the true sample time."""
    fs_hz = 1000.0
    stall_start_s = 2.0

    def latency_s(t: float) -> float:  # sample t arrives at max(t + 3 ms, resume + (t - stall start) / 2)
        return max(0.003, stall_start_s + stall_s + (t - stall_start_s) / 2.0 - t) if t >= stall_start_s else 0.003

    schedule = delivered(fs_hz, 0.0, latency_s, 6.0)
    lines = stamped(SampleClock(fs_hz), schedule)
    read_s, errors_s = time_errors_s(lines, schedule, fs_hz, 0.003)

    assert not any(line.jump_s for _, line in lines)
    caught_up_s = stall_start_s + 2 * stall_s + 0.1
    assert np.abs(errors_s[(read_s < stall_start_s) | (read_s > caught_up_s)]).max() < 0.002
