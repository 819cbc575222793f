"""Per-chunk cost of the controller's EmgEstimator (the live and replay code path).

For 16 and 64 channels, 2 and 4 kHz, 1 and 10 ms chunks: p50/p99/max of the time to
process one chunk, and CPU share = mean cost / chunk period. Two chains: the default
(pulse blanking, filters, envelope, onsets) and the full one (plus detection in the
signal of 30 Hz artifacts, adaptive residual removal locked to them, rail/flat/motion contamination).

Run: python benchmarks/bench_controller.py [--seconds S]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from controller.estimator import EmgEstimator
from fesloop.config import Muscle, load_config
from fesloop.protocol import EmgChunk


def _config(n_channels: int, full: bool):
    config = load_config()
    config = replace(
        config,
        muscles=tuple(Muscle(f"m{i}", i, 3.0, 240.0, 1.0) for i in range(n_channels)),
        stimulation=(),
    )
    if full:
        cc = config.controller
        cc = replace(
            cc,
            blanking=replace(cc.blanking, detect=True, post_ms=5.0),
            residual=replace(cc.residual, method="adaptive"),
            contamination=replace(cc.contamination, rail_uv=1e5, flat_uv=0.01, motion_uv=2000.0),
            onset=replace(cc.onset, mode="rest_sd"),
        )
        config = replace(config, controller=cc)
    return config


def bench(n_channels: int, fs_hz: float, chunk_ms: float, full: bool, seconds: float) -> tuple[float, float, float, float]:
    chunk = int(round(chunk_ms * 1e-3 * fs_hz))
    estimator = EmgEstimator(_config(n_channels, full), fs_hz, n_channels)
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(int(fs_hz), n_channels)) * 50.0).astype(np.float32)
    if full:  # 30 Hz artifacts, so detection fires and every channel's canceller works
        for start in (np.arange(0.0, 1.0 - 0.01, 1 / 30.0) * fs_hz).astype(int):
            data[start : start + 3] += 8000.0
    pulse_s = np.arange(0.0, seconds + 1.0, 1 / 30.0)
    estimator.add_pulses(pulse_s, np.zeros(len(pulse_s), dtype=int))
    costs = []
    for k in range(int(seconds * fs_hz / chunk)):
        start = k * chunk
        block = data[start % len(data) : start % len(data) + chunk]
        if len(block) < chunk:
            block = data[:chunk]
        message = EmgChunk(start, start / fs_hz, 0.0, fs_hz, block)
        t0 = time.perf_counter()
        estimator.process(message)
        costs.append(time.perf_counter() - t0)
        estimator.events.clear()
    costs_us = np.array(costs[len(costs) // 10 :]) * 1e6
    period_us = chunk / fs_hz * 1e6
    return float(np.median(costs_us)), float(np.percentile(costs_us, 99)), float(costs_us.max()), float(costs_us.mean() / period_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="signal seconds per case")
    args = parser.parse_args()
    print(f"{'chain':7} {'ch':>3} {'fs':>5} {'chunk':>6} {'p50 us':>8} {'p99 us':>8} {'max us':>8} {'CPU %':>6}")
    for full in (False, True):
        for n_channels in (16, 64):
            for fs_hz in (2000.0, 4000.0):
                for chunk_ms in (1.0, 10.0):
                    p50, p99, worst, share = bench(n_channels, fs_hz, chunk_ms, full, args.seconds)
                    print(
                        f"{'full' if full else 'default':7} {n_channels:3d} {fs_hz:5.0f} {chunk_ms:4.0f}ms "
                        f"{p50:8.0f} {p99:8.0f} {worst:8.0f} {100 * share:6.1f}"
                    )


if __name__ == "__main__":
    main()
