"""The estimator as a whole: chunk invariance, artifact windows, residual removal, contamination, onsets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acquisition.patient import SimulatedPatient
from controller.artifacts import ArtifactFinder
from controller.estimator import EmgEstimator
from controller.onset import OnsetDetector
from fesloop.config import Contraction, load_config
from fesloop.protocol import EmgChunk, GateReason
from tests.conftest import CONFIGS
from tests.controller.stimulated_patient import stimulated_emg

FS_HZ = 2000.0


def _config(**controller_tables):
    config = load_config(CONFIGS / "demo.toml")
    cc = config.controller
    return replace(config, controller=replace(cc, **{k: replace(getattr(cc, k), **v) for k, v in controller_tables.items()}))


def _run(estimator: EmgEstimator, emg_uv: np.ndarray, sizes: list[int], t0_s: float = 0.0) -> np.ndarray:
    """Feed ``emg_uv`` in chunks of the given sizes (cycled); the envelope of every sample."""
    out, start, i = [], 0, 0
    while start < len(emg_uv):
        data = emg_uv[start : start + sizes[i % len(sizes)]]
        estimator.process(EmgChunk(start, t0_s + start / estimator.fs_hz, 0.0, estimator.fs_hz, data))
        out.append(estimator.envelope_uv.copy())
        start += len(data)
        i += 1
    return np.vstack(out)


def _spiky_emg(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two channels of noise on a DC offset with 30 Hz artifacts and a flat stretch on channel 1."""
    rng = np.random.default_rng(seed)
    emg = rng.normal(size=(n, 2)) * 30.0 + 2000.0
    pulses = np.arange(300, n - 40, 67)
    for p in pulses:
        emg[p : p + 4] += 8000.0 * np.exp(-np.arange(4) / 1.5)[:, None]
        emg[p + 12 : p + 24] += 400.0 * np.sin(np.linspace(0, 2 * np.pi, 12))[:, None]  # an M-wave
    emg[n // 2 : n // 2 + 400, 1] = 2000.0  # lead-off
    return emg.astype(np.float32), pulses


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 120), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_whole_estimator_is_chunk_invariant(sizes: list[int], seed: int) -> None:
    """Detection, blanking from pulses, adaptive removal, contamination and onsets all carry state
    across chunks: any chunking gives the same envelope (to float rounding) and the same events."""
    emg, pulses = _spiky_emg(3000, seed)
    config = _config(
        blanking={"detect": True, "detect_slope_uv_per_ms": 4000.0, "post_ms": 5.0},
        residual={"method": "adaptive", "window_ms": 30.0},
        contamination={"flat_uv": 0.01, "flat_ms": 20.0, "holdoff_ms": 50.0},
    )
    results = []
    for chunking in (sizes, [len(emg)]):
        estimator = EmgEstimator(config, FS_HZ, 2)
        estimator.add_pulses(pulses[::3] / FS_HZ, np.zeros(len(pulses[::3]), dtype=int))
        results.append((_run(estimator, emg, chunking), sorted((round(e.time_s, 9), e.channel, e.kind) for e in estimator.events)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("finish", ["before_next_pulses", "by_next_update"])
def test_update_then_finish_is_process(finish: str) -> None:
    """The live controller sends its command between ``update`` and ``finish`` and pulses may come in
    between: activations, events (onsets included) and each pulse's M-wave are those of ``process``."""
    config = _config()
    contractions = (Contraction("quadriceps_l", 0.5, 1.0, 0.6), Contraction("tibialis_l", 1.2, 0.8, 0.4))
    patient_cfg = replace(config.acquisition.simulated, contractions=contractions, schedule_period_s=100.0)
    pulse_s = np.arange(0.3, 1.6, 1 / 30.0)
    emg, amplitude_ma, width_us = stimulated_emg(patient_cfg, ["quadriceps_l", "tibialis_l"], pulse_s, 30.0, 6000)
    runs = []
    for split in (False, True):
        estimator = EmgEstimator(config, FS_HZ, 2)
        activations, measurements = [], []
        for start in range(0, len(emg), 4):
            chunk = EmgChunk(start, start / FS_HZ, 0.0, FS_HZ, emg[start : start + 4])
            estimator.update(chunk) if split else estimator.process(chunk)
            activations.append(estimator.activation.copy())
            arrived = (pulse_s >= start / FS_HZ) & (pulse_s < (start + 4) / FS_HZ)  # delivered during this chunk
            estimator.add_pulses(pulse_s[arrived], np.zeros(arrived.sum(), dtype=int), amplitude_ma[arrived], width_us[arrived])
            if split and finish == "before_next_pulses":
                estimator.finish()
            measurements.extend(estimator.mwave.take_measurements())
        estimator.finish()
        measurements.extend(estimator.mwave.take_measurements())
        runs.append((np.array(activations), list(estimator.events), measurements))
    (activation, events, mwaves), (split_activation, split_events, split_mwaves) = runs
    np.testing.assert_array_equal(split_activation, activation)
    assert split_events == events
    np.testing.assert_array_equal(np.array(split_mwaves), np.array(mwaves))  # (NaN normalized before the reference)
    assert {e.kind for e in events} >= {"onset", "offset"} and len(mwaves) > 30


def test_detected_artifacts_are_blanked_from_pre_to_post() -> None:
    finder = ArtifactFinder(1, FS_HZ, pre_s=0.001, post_s=0.005, slope_uv_per_ms=1000.0, sync_threshold=None)
    x = np.zeros((100, 1))
    x[40:43, 0] = 5000.0  # steep rise at 40 (and fall at 43)
    delayed, valid, new = finder.process(x, 0)
    np.testing.assert_array_equal(new, [40])  # one artifact, not one per steep sample
    assert finder.delay == 2
    np.testing.assert_array_equal(delayed[2:, 0], x[:-2, 0])  # the signal leaves delayed by pre
    # Delayed sample m is sample m - 2 of the input: blanked from 40 - 2 (pre) to 43 + 10 (post after last steep).
    np.testing.assert_array_equal(np.flatnonzero(~valid) - finder.delay, np.arange(38, 54))


def test_sync_channel_rising_edges_are_artifacts() -> None:
    finder = ArtifactFinder(1, FS_HZ, 0.0, 0.002, slope_uv_per_ms=None, sync_threshold=0.5)
    sync = np.zeros(200)
    sync[[50, 51, 52, 150]] = 1.0
    _, valid, new = finder.process(np.zeros((200, 1)), 1000, sync)
    np.testing.assert_array_equal(new, [1050, 1150])
    assert (~valid).sum() == 2 * 5  # a 2 ms window (5 samples) per rising edge, whatever the pulse length


def _patient_recording(method: str, seconds: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Activation and true drive at 100 Hz for the simulated patient stimulated at 30 Hz, 35 mA,
    with 5 ms blanking (the artifact is gone, the M-wave at 6-12 ms is not)."""
    config = _config(blanking={"post_ms": 5.0, "pre_ms": 0.5}, residual={"method": method, "window_ms": 30.0})
    contractions = (Contraction("quadriceps_l", 2.0, 2.0, 0.6), Contraction("quadriceps_l", 5.0, 2.0, 0.3))
    patient_cfg = replace(config.acquisition.simulated, contractions=contractions, schedule_period_s=100.0)
    patient = SimulatedPatient(patient_cfg, ["quadriceps_l", "tibialis_l"], {0: 0, 1: 1}, 0.0)
    n = int(seconds * FS_HZ)
    pulse_s = np.arange(1.0, seconds, 1 / 30.0)
    ones = np.ones(len(pulse_s))
    patient.add_pulses(np.zeros(len(pulse_s), dtype=int), pulse_s, 35.0 * ones, 300.0 * ones)
    emg = np.zeros((n, 2), dtype=np.float32)
    drive = np.zeros((n, 2))
    patient.render(0, emg)
    patient.drive(0, drive)
    estimator = EmgEstimator(config, FS_HZ, 2)
    estimator.add_pulses(pulse_s, np.zeros(len(pulse_s), dtype=int))
    activation = []
    for start in range(0, n, 20):
        estimator.process(EmgChunk(start, start / FS_HZ, 0.0, FS_HZ, emg[start : start + 20]))
        activation.append(estimator.activation[0])
    return np.array(activation), drive[19::20, 0]


def test_residual_removal_tracks_drive_under_m_waves() -> None:
    """Stimulating the quadriceps at 30 Hz with M-waves of ~1 mV that 5 ms blanking leaves.
    Error = mean |activation - drive| from 1.5 s (stimulation on, filters settled) to the end,
    the drive shifted by 60 ms (envelope delay at 6 Hz plus blanking). Measured (seeded, so
    deterministic): none 0.67 (M-waves saturate it), comb 0.12, adaptive 0.10, in activation
    units (drive levels 0.3 and 0.6). The residue is mostly the envelope's ripple and the
    ramps; bound 0.15 leaves 25 % for changes, and removal must cut the error at least 4x."""
    errors = {}
    for method in ("none", "comb", "adaptive"):
        activation, drive = _patient_recording(method)
        lagged = np.concatenate((np.zeros(6), drive[:-6]))
        errors[method] = float(np.mean(np.abs(activation[150:] - lagged[150:])))
    assert errors["comb"] < 0.15 and errors["adaptive"] < 0.15, errors
    assert errors["none"] > 4 * max(errors["comb"], errors["adaptive"]), errors


def test_contamination_closes_the_gate_of_dependent_channels_with_holdoff() -> None:
    config = _config(contamination={"rail_uv": 5000.0, "rail_fraction": 0.9, "holdoff_ms": 100.0})
    estimator = EmgEstimator(config, FS_HZ, 2)
    rng = np.random.default_rng(4)
    emg = (rng.normal(size=(2000, 2)) * 20.0).astype(np.float32)
    emg[1000:1010, 1] = 4800.0  # tibialis channel at its rail for 5 ms
    gate = np.zeros(2, dtype=np.uint8)
    reasons = []
    for start in range(0, 2000, 20):
        estimator.process(EmgChunk(start, start / FS_HZ, 0.0, FS_HZ, emg[start : start + 20]))
        estimator.gate_reasons(gate)
        reasons.append(gate.copy())
    reasons = np.array(reasons)
    closed = np.flatnonzero(reasons[:, 1] == GateReason.CONTAMINATED)
    assert (reasons[:, 0] == GateReason.OPEN).all()  # the quadriceps channel does not depend on it
    # Every chunk holding a contaminated sample: from the one with the rail (50) to the one with
    # sample 1209, the end of the 100 ms hold-off.
    assert closed[0] == 50 and closed[-1] == 60 and len(closed) == 11
    marks = [e for e in estimator.events if e.kind.startswith("contamination")]
    assert [(e.channel, e.kind) for e in marks] == [("tibialis_l", "contamination_start"), ("tibialis_l", "contamination_end")]
    assert marks[1].time_s - marks[0].time_s == pytest.approx((10 + 200) / FS_HZ)


def test_contamination_shorter_than_a_chunk_still_closes_the_gate() -> None:
    """Rail and hold-off both end inside one chunk: that chunk's command must not go out OPEN
    (the rail transient is in its envelope). Large chunks come from LSL sources and slow boards."""
    config = _config(contamination={"rail_uv": 5000.0, "rail_fraction": 0.9, "holdoff_ms": 5.0})
    config = replace(config, controller=replace(config.controller, stale_ms=10.0))  # the hold-off's least
    estimator = EmgEstimator(config, FS_HZ, 2)
    emg = (np.random.default_rng(5).normal(size=(400, 2)) * 20.0).astype(np.float32)
    emg[205:215, 0] = 4800.0  # 5 ms at the rail, then 10 ms of hold-off: all within samples 200-239
    gate = np.zeros(2, dtype=np.uint8)
    reasons = []
    for start in range(0, 400, 40):  # 20 ms chunks
        estimator.process(EmgChunk(start, start / FS_HZ, 0.0, FS_HZ, emg[start : start + 40]))
        estimator.gate_reasons(gate)
        reasons.append(gate.copy())
    assert [int(r[0]) for r in reasons] == [GateReason.OPEN] * 5 + [GateReason.CONTAMINATED] + [GateReason.OPEN] * 4


def test_flat_line_is_lead_off() -> None:
    config = _config(contamination={"flat_uv": 0.01, "flat_ms": 50.0, "holdoff_ms": 0.0})
    estimator = EmgEstimator(config, FS_HZ, 2)
    emg = (np.random.default_rng(5).normal(size=(4000, 2)) * 20.0).astype(np.float32)
    emg[2000:, 0] = 123.0
    estimator.process(EmgChunk(0, 0.0, 0.0, FS_HZ, emg))
    start = [e for e in estimator.events if e.kind == "contamination_start"]
    assert [e.channel for e in start] == ["quadriceps_l"]
    assert abs(start[0].time_s - (2000 + 100) / FS_HZ) <= 1 / FS_HZ  # after 50 ms of flat line


def test_onset_hysteresis_and_minimum_duration() -> None:
    detector = OnsetDetector(np.array([10.0]), np.array([5.0]), tick=2, min_on=20, min_off=20)
    envelope = np.zeros((400, 1))
    envelope[50:60] = 20.0  # too short: 10 samples < 20
    envelope[100:300] = 20.0
    envelope[200:210] = 7.0  # dips between the thresholds do not end it
    events = detector.process(envelope, 0)
    assert events == [(100, 0, True), (300, 0, False)]


def _onset_reference(
    envelope: np.ndarray, first_index: int, on: np.ndarray, off: np.ndarray, tick: int, min_on: int, min_off: int
):
    """The detector's rule, one channel and one tick (absolute sample index a multiple of
    ``tick``) at a time: a change lasting its minimum is declared, dated at its first tick."""
    events = []
    for channel in range(envelope.shape[1]):
        active, run = False, 0
        for local in range(-first_index % tick, len(envelope), tick):
            value = envelope[local, channel]
            run = run + 1 if (value < off[channel] if active else value > on[channel]) else 0
            needed = -(-(min_off if active else min_on) // tick)
            if run >= needed:
                active, run = not active, 0
                events.append((first_index + local - (needed - 1) * tick, channel, active))
    return sorted(events)


@settings(max_examples=40, deadline=None)
@given(
    levels=st.lists(st.tuples(st.sampled_from([0.0, 6.0, 12.0]), st.integers(1, 60)), min_size=1, max_size=20),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=10),
    tick=st.integers(1, 4),
    min_on=st.integers(1, 30),
    min_off=st.integers(1, 30),
    first_index=st.integers(0, 10**9),
)
def test_onset_detector_follows_its_rule_in_any_chunking(levels, sizes, tick, min_on, min_off, first_index) -> None:
    """Against a per-tick reference: blocks where no change can be pending take the vectorized
    shortcut, the others the walk; both must give the reference's events, whatever the chunks
    and wherever the stream's sample index starts. The last channel is uncalibrated (infinite
    thresholds: never an onset)."""
    one = np.concatenate([np.full(length, level) for level, length in levels])
    envelope = np.column_stack((one, one[::-1], np.roll(one, 7), one))
    on, off = np.array([10.0, 10.0, 5.0, np.inf]), np.array([5.0, 5.0, 1.0, np.inf])
    detector = OnsetDetector(on, off, tick, min_on, min_off)
    found, start, k = [], 0, 0
    while start < len(envelope):
        stop = start + sizes[k % len(sizes)]
        found.extend(detector.process(envelope[start:stop], first_index + start))
        start, k = stop, k + 1
    assert sorted(found) == _onset_reference(envelope, first_index, on, off, tick, min_on, min_off)