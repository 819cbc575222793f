"""The estimator allocates no array data per chunk, and its memory does not grow.

tracemalloc counts Python-level allocations, numpy's array data and its internal
iteration buffers included. Per-sample work runs in buffers sized at the first
chunk (see controller/buffers.py); what remains per chunk is numpy's and Python's
bookkeeping of a fixed size (array views, ufunc iterators: ~0.1-2 kB), plus small
objects per event (an artifact, an onset). Not timed: the bounds are in bytes.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from controller.estimator import EmgEstimator
from fesloop.config import Muscle, load_config
from fesloop.protocol import EmgChunk
from tests.allocations import line_allocations
from tests.conftest import CONFIGS

FS_HZ = 2000.0
N_CHANNELS = 16
CHUNK = 4  # 2 ms at 2 kHz, as the live loop gets it
PULSE_HZ = 30.0
N_CHUNKS = 5000  # 10 s of EMG
RESIDUE_BYTES = 4 * 1024  # allowed after N chunks (a leak of one byte per chunk would exceed it)
PEAK_BYTES_PER_CHUNK = 16 * 1024  # alive at once while one chunk is processed (2-10 kB measured)
LONG_CHUNK = 8192  # samples: one column of it is 64 kB of float64, its mask 8 kB
LINE_LIMIT_BYTES = 6 * 1024  # any one line of the estimator, in any chunk (numpy's own bookkeeping ~3 kB at most)


def _estimator(full: bool, n_channels: int = N_CHANNELS, fs_hz: float = FS_HZ) -> EmgEstimator:
    config = load_config(CONFIGS / "demo.toml")
    channels = range(n_channels)[::-1] if full else range(n_channels)  # reversed: muscles picked column by column
    config = replace(
        config, muscles=tuple(Muscle(f"m{i}", c, 3.0, 240.0, 1.0) for i, c in enumerate(channels)), stimulation=()
    )
    if full:  # artifact detection in the signal, adaptive residual removal, contamination checks, TKEO
        cc = config.controller
        cc = replace(
            cc,
            blanking=replace(cc.blanking, detect=True),
            residual=replace(cc.residual, method="adaptive"),
            contamination=replace(cc.contamination, rail_uv=1e5, flat_uv=0.01, motion_uv=2000.0),
            filters=replace(cc.filters, tkeo=True),
        )
        config = replace(config, controller=cc)
    return EmgEstimator(config, fs_hz, n_channels)


class _Feed:
    """Consecutive chunks of noise with a pulse (and its artifact) every 1/30 s."""

    def __init__(self, estimator: EmgEstimator, chunk: int = CHUNK, pulse_hz: float = PULSE_HZ) -> None:
        self.estimator = estimator
        self.fs_hz = estimator.fs_hz
        self.chunk = chunk
        seconds = max(1, -(-chunk // int(self.fs_hz)))
        shape = (seconds * int(self.fs_hz), estimator.n_channels)
        self.data = (np.random.default_rng(0).normal(size=shape) * 50.0).astype(np.float32)
        self.period = int(self.fs_hz / pulse_hz)
        for start in range(0, len(self.data) - 20, self.period):
            self.data[start : start + 3] += 8000.0
        self.index = 0

    def run(self, n_chunks: int) -> None:
        for _ in range(n_chunks):
            start = self.index % (len(self.data) - self.chunk + 1)
            start -= start % self.period  # chunks start on the pulse grid, so the artifacts stay periodic
            pulses = np.arange(start - start % self.period, start + self.chunk, self.period)
            pulses = pulses[pulses >= start]
            self.estimator.add_pulses((self.index + pulses - start) / self.fs_hz, np.zeros(len(pulses), dtype=int))
            data = self.data[start : start + self.chunk]
            self.estimator.process(EmgChunk(self.index, self.index / self.fs_hz, 0.0, self.fs_hz, data))
            self.estimator.events.clear()  # as the controller does after reading them
            self.estimator.mwave.take_measurements()
            self.index += self.chunk


@pytest.mark.parametrize("full", [False, True], ids=["default", "full"])
def test_estimator_memory_stays_bounded_over_many_chunks(full: bool) -> None:
    feed = _Feed(_estimator(full))
    feed.run(1000)  # warm-up untraced: filters started, buffers and caches at their size
    tracemalloc.start()
    try:
        feed.run(1000)  # traced warm-up: state arrays replaced by new ones are now traced both ways
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        feed.run(N_CHUNKS)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"growth {after - before} B over {N_CHUNKS} chunks, peak {peak - before} B above the start")
    assert after - before < RESIDUE_BYTES
    assert peak - before < PEAK_BYTES_PER_CHUNK


@pytest.mark.parametrize("full", [False, True], ids=["default", "full"])
def test_no_line_allocates_per_sample_on_long_chunks(full: bool) -> None:
    """64 channels x 4 kHz in chunks of 2 s: a temporary the size of a column or a mask, or a buffer
    numpy makes for mixed layouts or broadcasting, would show on its line as >= 8 kB. Pulses at 2 Hz:
    what is kept per event (a list of a chunk's blanking windows, its artifacts) is not per sample."""
    feed = _Feed(_estimator(full, n_channels=64, fs_hz=4000.0), chunk=LONG_CHUNK, pulse_hz=2.0)
    feed.run(2)  # buffers sized
    worst = line_allocations(lambda: feed.run(3), ("/controller/",))
    offenders = {f"{path.rsplit('/', 1)[-1]}:{line}": size for (path, line), size in worst.items() if size > LINE_LIMIT_BYTES}
    assert len(worst) > 100  # the estimator's lines were traced
    assert not offenders, f"lines allocating per chunk (bytes): {offenders}"
