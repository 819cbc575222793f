"""LslSource fed by a real pylsl outlet on loopback (machine scope)."""

from __future__ import annotations

import re
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import pylsl
import pytest

from acquisition.lsl_source import LslSource
from acquisition.sources import Block, SourceError
from fesloop.config import parse_config
from fesloop.lsl import configure_machine_scope

FS_HZ = 500.0
N_CHANNELS = 3


def make_outlet(source_id: str) -> pylsl.StreamOutlet:
    configure_machine_scope()
    info = pylsl.StreamInfo("test-amp", "EMG", N_CHANNELS, FS_HZ, pylsl.cf_float32, source_id)
    return pylsl.StreamOutlet(info)


def source_for(source_id: str) -> LslSource:
    return LslSource(parse_config(
        f'[acquisition]\nsource = "lsl"\n[acquisition.lsl_inlet]\nsource_id = "{source_id}"\nscale_uv = 2.0\n'
        '[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
        '[[muscles]]\nname = "b"\nemg_channel = 1\nrest_uv = 1.0\nmvc_uv = 60.0\n'
    ))


def push(outlet: pylsl.StreamOutlet, indices: np.ndarray, t0_s: float, nan: np.ndarray | None = None) -> None:
    """Sample k carries value k on every channel (NaN where ``nan``), stamped t0 + k / fs."""
    values = np.repeat(indices[:, None], N_CHANNELS, axis=1).astype(np.float32)
    if nan is not None:
        values[nan] = np.nan
    outlet.push_chunk(values, (t0_s + indices / FS_HZ).tolist())


def read_while(source: LslSource, busy: Callable[[list[Block]], bool], timeout_s: float = 5.0) -> list[Block]:
    """Read every 2 ms while ``busy(blocks so far)`` holds (at most ``timeout_s``), copying each block."""
    blocks: list[Block] = []
    deadline = time.monotonic() + timeout_s
    while busy(blocks) and time.monotonic() < deadline:
        time.sleep(0.002)
        blocks += [Block(b.first_sample_index, b.first_sample_time_s, b.emg_uv.copy(), b.lost_samples)
                   for b in source.read(pylsl.local_clock())]
    return blocks


def read_until(source: LslSource, n: int, timeout_s: float = 5.0) -> list[Block]:
    return read_while(source, lambda blocks: sum(len(b.emg_uv) for b in blocks) < n, timeout_s)


@pytest.mark.timeout(60)
def test_lsl_inlet_gaps_from_timestamps_and_recovery_after_the_outlet_is_lost() -> None:
    """After 2.2 s of stream (the source learns its jitter for 2 s), 3 and then 50 samples are lost:
    the index jumps over each gap exactly; the outlet goes away and comes back 100 samples on."""
    source_id = f"test-amp-{uuid.uuid4().hex[:8]}"
    outlet = make_outlet(source_id)
    source = source_for(source_id)
    try:
        source.start(pylsl.local_clock())
        assert source.sampling_rate_hz == FS_HZ and source.n_channels == 2
        t0_s = pylsl.local_clock()
        for lead in np.arange(0, 1100).reshape(11, 100):  # in pieces: the inlet buffers 1 s
            push(outlet, lead, t0_s)
            read_until(source, lead.size)
        sent = np.concatenate((np.arange(1100, 1200), np.arange(1203, 1300), np.arange(1350, 1400)))  # 3, 50 lost
        push(outlet, sent, t0_s)
        blocks = read_until(source, sent.size)
        index = np.concatenate([b.first_sample_index + np.arange(len(b.emg_uv)) for b in blocks])
        values = np.vstack([b.emg_uv for b in blocks])

        assert np.array_equal(index, sent)  # the index jumps over each gap, exactly
        assert np.array_equal(values, 2.0 * np.repeat(sent[:, None], 2, axis=1).astype(np.float32))
        assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(1203, 3), (1350, 50)]
        assert blocks[0].first_sample_time_s == pytest.approx(t0_s + 1100 / FS_HZ, abs=1e-3)

        del outlet  # the amplifier app goes away
        with pytest.raises(SourceError, match="lost"):
            for _ in range(500):
                source.read(pylsl.local_clock())
                time.sleep(0.005)
        outlet = make_outlet(source_id)  # and comes back on the same clock
        source.restart(pylsl.local_clock())
        push(outlet, np.arange(1500, 1550), t0_s)
        after = read_until(source, 50)
        assert after[0].first_sample_index == 1500 and after[0].lost_samples == 100  # 1400..1499
        assert sum(len(b.emg_uv) for b in after) == 50
    finally:
        source.stop()


def test_no_matching_stream_is_a_source_error_naming_the_query() -> None:
    source = LslSource(parse_config(
        '[acquisition]\nsource = "lsl"\n[acquisition.lsl_inlet]\nname = "nobody-here"\nresolve_timeout_s = 0.2\n'
        '[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
    ))
    with pytest.raises(SourceError, match="no LSL stream matches name='nobody-here' and type='EMG'"):
        source.start(0.0)


def test_fesloops_own_emg_outlet_is_never_picked_up() -> None:
    own = make_outlet(f"fesloop-demo-emg-{uuid.uuid4().hex[:8]}")
    source = LslSource(parse_config(
        '[acquisition]\nsource = "lsl"\n[acquisition.lsl_inlet]\nname = "test-amp"\nresolve_timeout_s = 0.5\n'
        '[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
    ))
    with pytest.raises(SourceError, match="no LSL stream matches"):
        source.start(0.0)
    del own


@pytest.mark.timeout(60)
def test_non_finite_samples_from_the_stream_are_dropped_as_lost_and_counted() -> None:
    """A real float64 outlet sends NaN at sample 20, inf at 40 and 1e300 (inf in float32) at 60 in
    channel b: those samples are lost (one each, the index jumps over them) and counted; every
    value handed over is finite."""
    source_id = f"test-amp-{uuid.uuid4().hex[:8]}"
    configure_machine_scope()
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo("test-amp", "EMG", N_CHANNELS, FS_HZ, pylsl.cf_double64, source_id))
    source = source_for(source_id)
    try:
        source.start(pylsl.local_clock())
        t0_s = pylsl.local_clock()
        sent = np.arange(100)
        values = np.repeat(sent[:, None], N_CHANNELS, axis=1).astype(np.float64)
        values[[20, 40, 60], 1] = [np.nan, np.inf, 1e300]
        outlet.push_chunk(values, (t0_s + sent / FS_HZ).tolist())
        blocks = read_until(source, 97)
        index = np.concatenate([b.first_sample_index + np.arange(len(b.emg_uv)) for b in blocks])
        emg_uv = np.vstack([b.emg_uv for b in blocks])
    finally:
        source.stop()
        del outlet

    kept = np.setdiff1d(sent, [20, 40, 60])
    assert np.isfinite(emg_uv).all()
    assert np.array_equal(index, kept)
    assert np.array_equal(emg_uv[:, 0], 2.0 * kept.astype(np.float32))
    assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(21, 1), (41, 1), (61, 1)]
    assert source.non_finite_samples == 3


@pytest.mark.timeout(60)
def test_timestamp_jitter_is_no_gap_and_chunk_times_follow_the_indices() -> None:
    """A real outlet at 500 Hz pushing 20-sample chunks stamped as liblsl stamps a chunk pushed
    without times (the last sample at the push, the others back-dated by 1/fs), each push late by
    0..1.6 ms at random (OS wake-up jitter), one chunk's stamps 6 ms early, and 10 samples lost
    once after the 2 s the source learns the jitter: exactly that gap (was: a false gap, and the index pushed on, whenever a push came over
    half a period late), the early chunk counted as timestamps going back, and the chunk times
    follow the sample indices (within 1 % of n / fs)."""
    source_id = f"test-amp-{uuid.uuid4().hex[:8]}"
    outlet = make_outlet(source_id)
    source = source_for(source_id)
    rng = np.random.default_rng(3)
    chunks = [np.arange(start, start + 20) for start in [*range(0, 1500, 20), *range(1510, 2010, 20)]]
    blocks: list[Block] = []
    try:
        source.start(pylsl.local_clock())
        t0_s = pylsl.local_clock()
        for k, chunk in enumerate(chunks):
            late_s = -0.006 if k == 30 else rng.uniform(0.0, 0.0016)
            values = np.repeat(chunk[:, None], N_CHANNELS, axis=1).astype(np.float32)
            outlet.push_chunk(values, (t0_s + chunk / FS_HZ + late_s).tolist())
            blocks += read_until(source, len(chunk))
    finally:
        source.stop()
        del outlet
    index = np.concatenate([b.first_sample_index + np.arange(len(b.emg_uv)) for b in blocks])
    firsts = np.array([b.first_sample_index for b in blocks])
    times_s = np.array([b.first_sample_time_s for b in blocks])

    assert np.array_equal(index, np.concatenate(chunks))
    assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(1510, 10)]
    assert source.timestamps_back == 1
    assert np.all(np.abs(np.diff(times_s) - np.diff(firsts) / FS_HZ) <= 0.01 * np.diff(firsts) / FS_HZ)


@contextmanager
def streaming() -> Iterator[tuple[pylsl.StreamOutlet, LslSource, float]]:
    """A fresh outlet, a source started on it, and the time to stamp from; the source stopped after."""
    source_id = f"test-amp-{uuid.uuid4().hex[:8]}"
    outlet = make_outlet(source_id)
    source = source_for(source_id)
    source.start(pylsl.local_clock())
    try:
        yield outlet, source, pylsl.local_clock()
    finally:
        source.stop()


@pytest.mark.timeout(60)
def test_a_reanchor_of_the_streams_sample_clock_is_reported() -> None:
    """The sender's timestamps step back 300 ms after sample 300 (a re-sync): the stream's sample
    clock anchors again and the source reports it, as BrainFlowSource does (it reported nothing)."""
    with streaming() as (outlet, source, t0_s):
        push(outlet, np.arange(0, 300), t0_s)
        read_until(source, 300)
        assert source.take_events() == []
        push(outlet, np.arange(300, 400), t0_s - 0.3)
        read_until(source, 100)
        events = source.take_events()

    assert len(events) == 1 and events[0].marker.startswith("sample clock anchored again: EMG times jump ")
    assert float(events[0].marker.split("jump ")[1].removesuffix(" ms")) == pytest.approx(-300.0, abs=1.0)


@pytest.mark.timeout(60)
def test_non_finite_samples_ending_a_pull_are_reported_lost_in_the_next_block() -> None:
    """Sample 19 (the last pushed) is NaN, then a whole pull 20..39 is NaN: the block that comes next
    (index 40) says 21 lost, as counted (a dropped sample at the end of a pull was never reported)."""
    with streaming() as (outlet, source, t0_s):
        push(outlet, np.arange(0, 20), t0_s, nan=np.arange(20) == 19)
        blocks = read_while(source, lambda _: source.non_finite_samples < 1)
        push(outlet, np.arange(20, 40), t0_s, nan=np.ones(20, dtype=bool))
        blocks += read_while(source, lambda _: source.non_finite_samples < 21)
        push(outlet, np.arange(40, 60), t0_s)
        blocks += read_until(source, 20)

    assert source.non_finite_samples == 21
    assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(40, 21)]
    assert sum(len(b.emg_uv) for b in blocks) == 39


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rate_hz", [1e6, 5.0])
def test_a_stream_at_a_rate_no_emg_amplifier_has_is_refused(rate_hz: float) -> None:
    """The acquisition passed any positive nominal rate on: a stream declaring 1e300 Hz killed the
    controller (its filters cannot be designed there); the wire now refuses such chunks too."""
    source_id = f"test-amp-{uuid.uuid4().hex[:8]}"
    configure_machine_scope()
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo("test-amp", "EMG", N_CHANNELS, rate_hz, pylsl.cf_float32, source_id))
    source = source_for(source_id)
    try:
        with pytest.raises(SourceError, match=re.escape(f"nominal rate of {rate_hz:g} Hz: EMG needs 10..100000 Hz")):
            source.start(pylsl.local_clock())
    finally:
        source.stop()
        del outlet
