"""Streaming filters against scipy's one-shot reference; blanking; envelope; law."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from controller.blanking import Blanker
from controller.dsp import (
    EnvelopeEstimator,
    StreamingSos,
    design_emg_sos,
    Normalization,
)
from controller.laws import proportional
from fesloop.config import FilterConfig, ProportionalLaw

FS_HZ = 2000.0


def _chunks(n: int, sizes: list[int]) -> list[slice]:
    out, start, i = [], 0, 0
    while start < n:
        size = sizes[i % len(sizes)]
        out.append(slice(start, min(start + size, n)))
        start += size
        i += 1
    return out


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 97), min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_chunked_filter_equals_one_shot_sosfilt(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1500, 3)) * 50 + 1000.0  # DC offset as a real amplifier has
    sos = design_emg_sos(FS_HZ, FilterConfig())
    reference, _ = signal.sosfilt(sos, x, axis=0, zi=signal.sosfilt_zi(sos)[:, :, None] * x[0])
    stream = StreamingSos(sos, 3, steady_start=True)
    chunked = np.vstack([stream.process(x[s]).copy() for s in _chunks(len(x), sizes)])  # outputs are reused buffers
    np.testing.assert_allclose(chunked, reference, rtol=1e-10, atol=1e-9)


def test_design_clips_cutoffs_below_nyquist_and_notches_mains() -> None:
    fs_hz = 250.0  # BrainFlow's synthetic board: the 20-450 Hz band must be clipped
    sos = design_emg_sos(fs_hz, FilterConfig(notch_hz=50.0, notch_harmonics=3))
    _, response = signal.sosfreqz(sos, worN=[50.0, 100.0, 80.0], fs=fs_hz)
    mains, harmonic, band = np.abs(response)
    assert mains < 1e-6 and harmonic < 1e-6  # mains and its harmonic below Nyquist removed
    assert band > 0.7  # EMG band kept
    assert np.isfinite(sos).all()


def test_hold_keeps_the_last_valid_sample_across_blanked_ones_and_blocks() -> None:
    envelope = EnvelopeEstimator(FS_HZ, 2, FilterConfig())

    def hold(x: np.ndarray, valid: list[bool]) -> np.ndarray:
        return envelope.hold(x, envelope.valid_runs(np.array(valid)))

    first = hold(np.array([[7.0, -1.0], [1.0, 10.0]]), [True, False]).copy()
    np.testing.assert_array_equal(first, [[7.0, -1.0], [7.0, -1.0]])
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    second = hold(x, [False, True, False, False])
    np.testing.assert_array_equal(second, [[7.0, -1.0], [2.0, 20.0], [2.0, 20.0], [2.0, 20.0]])
    np.testing.assert_array_equal(hold(x[:1], [False]), [[2.0, 20.0]])


def test_blanker_marks_exactly_the_window_samples() -> None:
    blanker = Blanker(pre_s=0.001, post_s=0.005)
    t0 = 100.0
    blanker.add_pulses(np.array([t0 + 0.010]))  # sample 20 at 2 kHz
    valid = blanker.valid_mask(t0, FS_HZ, 60)
    blanked = np.flatnonzero(~valid)
    np.testing.assert_array_equal(blanked, np.arange(18, 31))  # 9.0 ms .. 15.0 ms inclusive
    # The window spanning two blocks is blanked in both.
    blanker.add_pulses(np.array([t0 + 0.0295]))
    first = blanker.valid_mask(t0 + 0.010, FS_HZ, 40).copy()  # samples at 10..29.5 ms
    second = blanker.valid_mask(t0 + 0.030, FS_HZ, 20)
    assert not first[-2:].any() and not second[:10].any() and second[10:].all()


def test_envelope_ignores_blanked_artifacts() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    emg = rng.normal(size=(n, 1)) * 20.0 + 500.0
    with_artifacts = emg.copy()
    pulse_idx = np.arange(100, n, 66)  # ~30 Hz
    for i in pulse_idx:
        with_artifacts[i : i + 6, 0] += 5000.0 * np.exp(-np.arange(6) / 2.0)
    valid = np.ones(n, dtype=bool)
    for i in pulse_idx:
        valid[i - 2 : i + 40] = False
    clean = EnvelopeEstimator(FS_HZ, 1, FilterConfig()).process(emg, valid)
    blanked = EnvelopeEstimator(FS_HZ, 1, FilterConfig()).process(with_artifacts, valid)
    unblanked = EnvelopeEstimator(FS_HZ, 1, FilterConfig()).process(with_artifacts, np.ones(n, dtype=bool))
    steady = slice(1000, None)
    np.testing.assert_allclose(blanked[steady], clean[steady], rtol=1e-9)  # artifacts never reach it
    assert unblanked[steady].mean() > 5 * clean[steady].mean()  # ... and they would have


def test_envelope_tracks_amplitude_of_band_limited_noise() -> None:
    rng = np.random.default_rng(2)
    sos = signal.butter(4, [30, 300], "bandpass", fs=FS_HZ, output="sos")
    x = signal.sosfilt(sos, rng.normal(size=(8000, 1)), axis=0)
    x *= 100.0 / x.std()  # 100 uV rms
    env = EnvelopeEstimator(FS_HZ, 1, FilterConfig()).process(x, np.ones(len(x), dtype=bool))
    # Rectified mean of Gaussian noise is rms * sqrt(2/pi); the band filter passes most of it.
    assert env[4000:].mean() == pytest.approx(100.0 * np.sqrt(2 / np.pi), rel=0.15)


def test_normalize_maps_rest_to_zero_and_mvc_to_one() -> None:
    out = Normalization(np.full(5, 3.0), np.full(5, 10.0))(np.array([1.0, 3.0, 6.5, 10.0, 50.0]))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize(
    ("activation", "expected"),
    [(0.0, 0.0), (0.1, 0.0), (0.2, 0.15), (0.5, 0.6), (0.9, 1.0)],
)
def test_proportional_law_edges(activation: float, expected: float) -> None:
    law = ProportionalLaw(gain=1.5, offset=0.1, max_intensity=1.0)
    assert proportional(activation, law) == pytest.approx(expected)


def test_tkeo_is_the_causal_teager_operator_by_hand_and_chunking_does_not_matter() -> None:
    estimator = EnvelopeEstimator(FS_HZ, 1, FilterConfig(tkeo=True))
    x = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    # x[n-1]^2 - x[n] x[n-2] with zero history: 0 - 1*0, 1 - 2*0, 4 - 3*1, 9 - 4*2, 16 - 5*3
    np.testing.assert_array_equal(estimator._teager(x)[:, 0], [0.0, 1.0, 1.0, 1.0, 1.0])
    signal_uv = np.random.default_rng(3).normal(0, 50, (997, 2))
    one_shot = EnvelopeEstimator(FS_HZ, 2, FilterConfig(tkeo=True))._teager(signal_uv)
    chunked = EnvelopeEstimator(FS_HZ, 2, FilterConfig(tkeo=True))
    pieces = [chunked._teager(signal_uv[s]).copy() for s in _chunks(len(signal_uv), [1, 7, 64, 3])]
    np.testing.assert_allclose(np.vstack(pieces), one_shot, rtol=0, atol=1e-12)


def test_tkeo_of_a_sine_is_flat_where_the_rectified_sine_ripples() -> None:
    """Teager's identity: for A sin(w n), x[n-1]^2 - x[n] x[n-2] = A^2 sin^2(w), a constant. So the
    sqrt|TKEO| envelope has no ripple at twice the signal frequency, unlike |x|."""
    amplitude_uv, f_hz = 200.0, 80.0
    n = np.arange(4000)
    x = amplitude_uv * np.sin(2 * np.pi * f_hz / FS_HZ * n)[:, None]
    teager = EnvelopeEstimator(FS_HZ, 1, FilterConfig(tkeo=True))._teager(x)[2:, 0]
    np.testing.assert_allclose(teager, amplitude_uv * np.sin(2 * np.pi * f_hz / FS_HZ), rtol=1e-9)
    config = FilterConfig(tkeo=True, highpass_hz=10.0, notch_harmonics=1, envelope_lowpass_hz=20.0)
    valid = np.ones(len(n), dtype=bool)
    with_tkeo = EnvelopeEstimator(FS_HZ, 1, config).process(x, valid)[2000:, 0]
    rectified = EnvelopeEstimator(FS_HZ, 1, FilterConfig(highpass_hz=10.0, notch_harmonics=1, envelope_lowpass_hz=20.0))
    with_abs = rectified.process(x, valid)[2000:, 0]
    assert np.ptp(with_tkeo) < 0.1 * np.ptp(with_abs)
