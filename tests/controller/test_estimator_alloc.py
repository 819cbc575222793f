"""The estimator's hot loop does not accumulate memory: traced allocations stay bounded per chunk.

tracemalloc counts Python-level allocations (numpy's included). After a warm-up,
N more chunks (with 30 Hz pulses being blanked) may leave less residue than one
byte per chunk, and the temporaries alive at once stay small. Not timed: the bounds
are in bytes. The loop is not allocation-free (numpy temporaries per chunk), but
what it allocates is freed within the chunk.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from controller.estimator import EmgEstimator
from fesloop.config import Muscle, load_config
from fesloop.protocol import EmgChunk
from tests.conftest import CONFIGS

FS_HZ = 2000.0
N_CHANNELS = 16
CHUNK = 4  # 2 ms at 2 kHz, as the live loop gets it
PULSE_HZ = 30.0
N_CHUNKS = 5000  # 10 s of EMG
RESIDUE_BYTES = 4 * 1024  # allowed after N chunks (a leak of one byte per chunk would exceed it)
PEAK_BYTES_PER_CHUNK = 64 * 1024  # temporaries alive at once while one chunk is processed


def _estimator(full: bool) -> EmgEstimator:
    config = load_config(CONFIGS / "demo.toml")
    config = replace(
        config, muscles=tuple(Muscle(f"m{i}", i, 3.0, 240.0, 1.0) for i in range(N_CHANNELS)), stimulation=()
    )
    if full:  # artifact detection in the signal, adaptive residual removal, contamination checks
        cc = config.controller
        cc = replace(
            cc,
            blanking=replace(cc.blanking, detect=True),
            residual=replace(cc.residual, method="adaptive"),
            contamination=replace(cc.contamination, rail_uv=1e5, flat_uv=0.01, motion_uv=2000.0),
        )
        config = replace(config, controller=cc)
    return EmgEstimator(config, FS_HZ, N_CHANNELS)


class _Feed:
    """Consecutive 2 ms chunks of noise with a pulse (and its artifact) every 1/30 s."""

    def __init__(self, estimator: EmgEstimator) -> None:
        self.estimator = estimator
        self.data = (np.random.default_rng(0).normal(size=(int(FS_HZ), N_CHANNELS)) * 50.0).astype(np.float32)
        for start in (np.arange(0.0, 1.0 - 0.01, 1 / PULSE_HZ) * FS_HZ).astype(int):
            self.data[start : start + 3] += 8000.0
        self.index = 0

    def run(self, n_chunks: int) -> None:
        for _ in range(n_chunks):
            start = self.index % len(self.data)
            if start % int(FS_HZ / PULSE_HZ) < CHUNK:
                self.estimator.add_pulses(np.array([self.index / FS_HZ]), np.array([0]))
            message = EmgChunk(self.index, self.index / FS_HZ, 0.0, FS_HZ, self.data[start : start + CHUNK])
            self.estimator.process(message)
            self.estimator.events.clear()  # as the controller does after reading them
            self.index += CHUNK


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
