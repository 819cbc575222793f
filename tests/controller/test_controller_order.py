"""The controller sends a chunk's command before the work no command waits for (onsets, M-waves,
EMG telemetry), unless a law is steered by M-waves; that work is never skipped."""

from __future__ import annotations

import numpy as np
import pytest

from controller.loop import Controller
from fesloop.config import load_config
from fesloop.protocol import EmgChunk

FS_HZ = 2000.0


def _chunks(n: int, seed: int = 1) -> list[np.ndarray]:
    """2 ms chunks of two channels: 40 ms at rest, then a contraction (200 uV noise)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(4, 2)) * (200.0 if k >= 20 else 1.0)).astype(np.float32) for k in range(n)]


def _first_onset(controller: Controller, send: bool) -> tuple[int, str]:
    """Feed chunks until the onset is counted; (chunk index, "on_emg" or "send": the call that counted it)."""
    now_s = controller.rt.clock.now()
    for k, data in enumerate(_chunks(300)):
        controller.on_emg(EmgChunk(4 * k, now_s + 4 * k / FS_HZ, now_s, FS_HZ, data), now_s)
        if controller.event_counts.get("onset"):
            return k, "on_emg"
        if send:
            controller.publish_command(now_s)
            if controller.event_counts.get("onset"):
                return k, "send"
    raise AssertionError("no onset in 600 ms of contraction")


@pytest.mark.timeout(30)
def test_onsets_are_found_after_the_command_goes_out_or_with_the_next_chunk(write_config) -> None:
    found = {}
    for send in (True, False):  # without a send between chunks (the rate limit), the next chunk finishes the last
        controller = Controller(load_config(write_config("demo.toml", name=f"send{send}.toml")))
        try:
            found[send] = _first_onset(controller, send)
        finally:
            controller.rt.close()
    k, when = found[True]
    assert when == "send" and k > 20
    assert found[False] == (k + 1, "on_emg")


@pytest.mark.timeout(30)
def test_an_m_wave_law_gets_each_chunks_m_waves_before_its_command(write_config) -> None:
    """tracking_mwave: a window completed by a chunk is measured when the chunk is taken, before compute."""
    controller = Controller(load_config(write_config("tracking_mwave.toml")))
    try:
        now_s = controller.rt.clock.now()
        counted_at = None
        t0_s = now_s
        for k, data in enumerate(_chunks(60)):
            controller.on_emg(EmgChunk(4 * k, t0_s + 4 * k / FS_HZ, now_s, FS_HZ, data[:, :1]), now_s)
            if k == 0:  # a pulse at sample 20
                controller.estimator.add_pulses(np.array([t0_s + 0.01]), np.array([0]), np.array([20.0]), np.array([300.0]))
            if controller.estimator.mwave.measured[0]:
                counted_at = k
                break
            controller.publish_command(now_s)
    finally:
        controller.rt.close()
    window_end_ms = controller.config.controller.mwave.window_end_ms
    assert counted_at == int((10 + window_end_ms) * 1e-3 * FS_HZ) // 4
