"""M-wave amplitude estimator: scripted M-waves against a scipy one-shot reference, window
edges, chunk boundaries, late pulses, gaps, other channels, the fresh reference, and the
estimator's parallel path on the simulated patient."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from acquisition.patient import recruitment
from controller.estimator import EmgEstimator
from controller.mwave import MWaveEstimator
from fesloop.config import Contraction, MWaveConfig, load_config
from fesloop.protocol import EmgChunk
from tests.conftest import CONFIGS
from tests.controller.stimulated_patient import stimulated_emg

FS_HZ = 2000.0
START, END = 10, 40  # window_start_ms = 5, window_end_ms = 20 at 2 kHz, in samples
CFG = MWaveConfig(window_start_ms=5.0, window_end_ms=20.0, highpass_hz=10.0, smoothing_pulses=1000, reference_pulses=3)


def _estimator(cfg: MWaveConfig = CFG, reference_uv: tuple[float, ...] = (1000.0, 0.0)) -> MWaveEstimator:
    return MWaveEstimator(cfg, FS_HZ, {0: 0, 1: 1}, np.array(reference_uv))


def _feed(estimator: MWaveEstimator, emg_uv: np.ndarray, sizes: list[int], first_index: int = 0) -> None:
    start, i = 0, 0
    while start < len(emg_uv):
        data = emg_uv[start : start + sizes[i % len(sizes)]]
        index = first_index + start
        estimator.process(index, index / FS_HZ, data)
        start += len(data)
        i += 1


def _scripted(n: int, pulses: np.ndarray, peaks_uv: np.ndarray, seed: int = 0) -> np.ndarray:
    """Two channels: noise on a DC offset, a big zero-area artifact at each pulse (outside the window)
    and on channel 0 a one-cycle sine M-wave 6-12 ms after it."""
    rng = np.random.default_rng(seed)
    emg = rng.normal(size=(n, 2)) * 2.0 + 500.0
    cycle = np.sin(2 * np.pi * np.arange(12) / 12)
    for p, peak in zip(pulses, peaks_uv):
        emg[p : p + 3] += 5000.0 * np.array([1.0, -1.5, 0.5])[:, None]
        emg[p + 12 : p + 24, 0] += peak * cycle
    return emg


def _reference(emg_uv: np.ndarray, pulses: np.ndarray, channel: int, method: str = "peak_to_peak") -> np.ndarray:
    """One-shot scipy: high-pass from the steady state of the first sample, then each window."""
    sos = signal.butter(2, CFG.highpass_hz, "highpass", fs=FS_HZ, output="sos")
    filtered = signal.sosfilt(sos, emg_uv[:, channel], zi=signal.sosfilt_zi(sos) * emg_uv[0, channel])[0]
    windows = [filtered[p + START : p + END + 1] for p in pulses]
    if method == "rms":
        return np.array([np.sqrt(np.mean(w**2)) for w in windows])
    return np.array([np.ptp(w) for w in windows])


PULSES = np.arange(100, 1900, 67)  # 30 Hz
PEAKS_UV = np.linspace(800.0, 400.0, len(PULSES))  # a fatiguing M-wave


@pytest.mark.parametrize("method", ["peak_to_peak", "rms"])
def test_each_pulse_is_measured_as_the_one_shot_reference(method: str) -> None:
    emg = _scripted(2000, PULSES, PEAKS_UV)
    estimator = _estimator(replace(CFG, method=method, smoothing_pulses=4))
    estimator.add_pulses(PULSES / FS_HZ, np.zeros(len(PULSES), dtype=int), np.full(len(PULSES), 9.0))
    _feed(estimator, emg, [2000])
    expected = _reference(emg, PULSES, 0, method)
    assert estimator.measured.tolist() == [len(PULSES), 0]
    np.testing.assert_allclose(estimator.recent_uv[0], expected[-4:], rtol=1e-12)
    assert estimator.amplitude_uv[0] == pytest.approx(expected[-4:].mean(), rel=1e-12)
    assert estimator.normalized[0] == pytest.approx(expected[-4:].mean() / 1000.0, rel=1e-12)
    # The high-pass leaves a one-cycle 167 Hz M-wave almost untouched: 2 x peak, or peak / sqrt(2) over 6 of 15.5 ms.
    scale = 2.0 if method == "peak_to_peak" else np.sqrt(0.5 * 12 / (END - START + 1))
    np.testing.assert_allclose(expected, scale * PEAKS_UV, rtol=0.03)
    taken = estimator.take_measurements()  # each pulse's own window, for LSL and replay
    assert [(m.pulse_time_s, m.muscle) for m in taken] == [(p / FS_HZ, 0) for p in PULSES]
    np.testing.assert_allclose([m.amplitude_uv for m in taken], expected, rtol=1e-12)
    np.testing.assert_allclose([m.normalized for m in taken], expected / 1000.0, rtol=1e-12)
    assert estimator.take_measurements() == []
    assert np.isnan(estimator.amplitude_uv[1]) and np.isnan(estimator.normalized[1])


def test_window_edges_are_inclusive_to_the_sample() -> None:
    """A spike on the window's first or last sample counts; one sample outside does not."""
    pulses = np.array([200, 400, 600, 800])
    emg = np.zeros((1000, 2))
    for p, offset in zip(pulses, (START, END, START - 1, END + 1)):
        emg[p + offset, 0] = 1000.0
    estimator = _estimator()
    estimator.add_pulses(pulses / FS_HZ, np.zeros(4, dtype=int))
    _feed(estimator, emg, [1000])
    inside, outside = np.array(estimator.recent_uv[0])[:2], np.array(estimator.recent_uv[0])[2:]
    assert np.all(inside > 950.0), inside
    assert np.all(outside < 0.1 * inside.min()), outside  # only the high-pass's tail of the spike
    np.testing.assert_allclose(estimator.recent_uv[0], _reference(emg, pulses, 0), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 90), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_chunked_equals_one_shot(sizes: list[int], seed: int) -> None:
    """Windows spanning any chunk boundaries give what one block gives, with the same reference."""
    emg = _scripted(2000, PULSES, PEAKS_UV, seed)
    results = []
    for chunking in (sizes, [len(emg)]):
        estimator = _estimator(replace(CFG, smoothing_pulses=5), reference_uv=(0.0, 0.0))
        estimator.add_pulses(PULSES / FS_HZ, np.zeros(len(PULSES), dtype=int))
        _feed(estimator, emg, chunking)
        results.append((list(estimator.recent_uv[0]), estimator.reference_uv.copy(), estimator.measured.copy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-9)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-9)
    np.testing.assert_array_equal(results[0][2], results[1][2])
    np.testing.assert_allclose(results[0][0], _reference(emg, PULSES, 0)[-5:], rtol=1e-9)


def test_a_window_is_measured_only_once_its_last_sample_arrived() -> None:
    emg = _scripted(400, np.array([100]), np.array([600.0]))
    estimator = _estimator()
    estimator.add_pulses(np.array([100 / FS_HZ]), np.array([0]))
    _feed(estimator, emg[: 100 + END], [7])
    assert estimator.measured[0] == 0  # one sample short
    estimator.process(100 + END, (100 + END) / FS_HZ, emg[100 + END : 101 + END])
    assert estimator.measured[0] == 1
    assert estimator.recent_uv[0][0] == pytest.approx(_reference(emg, np.array([100]), 0)[0], rel=1e-12)


def test_a_pulse_message_arriving_after_its_window_started_is_still_measured() -> None:
    emg = _scripted(600, np.array([100]), np.array([600.0]))
    estimator = _estimator()
    _feed(estimator, emg[:130], [13])  # the window (110..140) is under way
    estimator.add_pulses(np.array([100 / FS_HZ]), np.array([0]))
    _feed(estimator, emg[130:], [13], first_index=130)
    assert estimator.recent_uv[0][0] == pytest.approx(_reference(emg, np.array([100]), 0)[0], rel=1e-12)


def test_pulses_on_other_channels_and_zero_charge_are_ignored() -> None:
    """Device channel 1 stimulates muscle 1: its pulses measure channel 1 only; channel 7 is no one's."""
    emg = _scripted(2000, PULSES, PEAKS_UV)
    estimator = _estimator()
    n = len(PULSES)
    channels = np.where(np.arange(n) % 3 == 0, 0, np.where(np.arange(n) % 3 == 1, 1, 7))
    charge = np.where(np.arange(n) % 6 == 3, 0.0, 9.0)  # every other pulse of channel 0 delivered nothing
    estimator.add_pulses(PULSES / FS_HZ, channels, charge)
    _feed(estimator, emg, [50])
    mine = (channels == 0) & (charge > 0)
    other = channels == 1
    assert estimator.measured.tolist() == [mine.sum(), other.sum()]
    np.testing.assert_allclose(estimator.recent_uv[0], _reference(emg, PULSES[mine], 0), rtol=1e-9)
    np.testing.assert_allclose(estimator.recent_uv[1], _reference(emg, PULSES[other], 1), rtol=1e-9)
    assert max(estimator.recent_uv[1]) < 40.0  # channel 1 carries no M-wave


def test_only_stimulated_muscles_are_filtered_each_in_its_own_column() -> None:
    """Four muscles, two stimulated (device 5 -> muscle 3, device 2 -> muscle 1): each is measured as the
    one-shot reference of its own column, the unstimulated ones (here carrying the M-waves) are not filtered."""
    emg = _scripted(2000, PULSES, PEAKS_UV)
    four = np.column_stack([emg[:, 0], emg[:, 1], emg[:, 1] * 0.5, emg[:, 0] * 0.25])
    estimator = MWaveEstimator(CFG, FS_HZ, {5: 3, 2: 1}, np.zeros(4))
    n = len(PULSES)
    channels = np.where(np.arange(n) % 2 == 0, 5, 2)
    estimator.add_pulses(PULSES / FS_HZ, channels, np.full(n, 9.0))
    _feed(estimator, four, [4])
    to_3, to_1 = channels == 5, channels == 2
    assert estimator.measured.tolist() == [0, to_1.sum(), 0, to_3.sum()]
    taken = estimator.take_measurements()
    np.testing.assert_allclose([m.amplitude_uv for m in taken if m.muscle == 3], _reference(four, PULSES[to_3], 3), rtol=1e-9)
    np.testing.assert_allclose([m.amplitude_uv for m in taken if m.muscle == 1], _reference(four, PULSES[to_1], 1), rtol=1e-9)
    assert estimator._highpass._zi.shape[0] == 2  # two filtered columns, not four


def test_windows_touching_lost_samples_are_missed() -> None:
    emg = _scripted(2000, PULSES, PEAKS_UV)
    estimator = _estimator()
    estimator.add_pulses(PULSES / FS_HZ, np.zeros(len(PULSES), dtype=int))
    lost = slice(PULSES[5] + 20, PULSES[5] + 30)  # inside the sixth window only
    _feed(estimator, emg[: lost.start], [32])
    _feed(estimator, emg[lost.stop :], [32], first_index=lost.stop)
    assert estimator.measured[0] == len(PULSES) - 1 and estimator.missed[0] == 1


def test_fresh_reference_is_the_mean_of_the_first_steady_m_waves() -> None:
    """The ramp's rising charges do not count; the first 3 pulses at one charge (within 1 %) do."""
    emg = _scripted(2000, PULSES, PEAKS_UV)
    charge = np.array([3.0, 5.0, 7.0, 9.0, 9.05, 8.99] + [9.0] * (len(PULSES) - 6))
    estimator = _estimator(replace(CFG, smoothing_pulses=2), reference_uv=(0.0, 0.0))
    estimator.add_pulses(PULSES / FS_HZ, np.zeros(len(PULSES), dtype=int), charge)
    _feed(estimator, emg[: PULSES[5] + END], [40])
    assert np.isnan(estimator.reference_uv[0]) and np.isnan(estimator.normalized[0])
    _feed(estimator, emg[PULSES[5] + END :], [40], first_index=PULSES[5] + END)
    measured = _reference(emg, PULSES, 0)
    assert estimator.reference_uv[0] == pytest.approx(measured[3:6].mean(), rel=1e-12)
    assert estimator.normalized[0] == pytest.approx(measured[-2:].mean() / measured[3:6].mean(), rel=1e-12)
    assert estimator.normalized[0] < 0.6  # the scripted M-wave fell from 800 to 400 uV


def test_a_flat_line_gives_no_fresh_reference_and_no_nan() -> None:
    """A lead off (exact zeros) during the first steady pulses measured M-waves of 0: the reference
    became 0, the normalized M-wave NaN then inf, and M-wave tracking sent NaN intensities (the
    stimulator dropped every command: a deadline FAULT instead of a closed gate)."""
    emg = _scripted(2000, PULSES, PEAKS_UV)
    emg[: PULSES[6], 0] = 0.0  # off until the 7th pulse
    estimator = _estimator(reference_uv=(0.0, 0.0))
    estimator.add_pulses(PULSES / FS_HZ, np.zeros(len(PULSES), dtype=int), np.full(len(PULSES), 9.0))
    _feed(estimator, emg[: PULSES[5] + END + 1], [40])
    assert estimator.measured[0] >= 3 and np.isnan(estimator.reference_uv[0]) and np.isnan(estimator.normalized[0])
    _feed(estimator, emg[PULSES[5] + END + 1 :], [40], first_index=PULSES[5] + END + 1)
    assert estimator.reference_uv[0] > 0 and np.isfinite(estimator.normalized[0])
    normalized = [m.normalized for m in estimator.take_measurements()]
    assert not np.isinf(normalized).any() and np.isfinite(normalized[-1])  # NaN only until the reference


def test_emg_estimator_measures_the_patients_m_wave_before_blanking_without_touching_activation() -> None:
    """On the simulated patient (contracting, so the voluntary path has work), the measured M-wave
    is 2 x the patient's peak (recruitment x fatigue), although blanking removes those samples
    from the activation; the activation is the same whether or not M-waves are measured."""
    config = load_config(CONFIGS / "tracking_mwave.toml")
    patient_cfg = replace(
        config.acquisition.simulated, contractions=(Contraction("quadriceps_l", 0.2, 5.0, 0.4),), mains_uv=0.0
    )
    pulse_s = np.arange(0.1, 1.9, 1 / 30)
    emg, amplitude_ma, width_us = stimulated_emg(patient_cfg, ["quadriceps_l"], pulse_s, 32.0, 4000)
    envelopes = []
    for amplitude in (amplitude_ma, np.zeros(len(pulse_s))):  # zero charge: no M-wave is measured
        estimator = EmgEstimator(config, FS_HZ, 1)
        estimator.add_pulses(pulse_s, np.zeros(len(pulse_s), dtype=int), amplitude, width_us)
        chunks = []
        for start in range(0, 4000, 4):
            estimator.process(EmgChunk(start, start / FS_HZ, 0.0, FS_HZ, emg[start : start + 4]))
            chunks.append(estimator.envelope_uv.copy())
        envelopes.append(np.vstack(chunks))
    np.testing.assert_array_equal(envelopes[0], envelopes[1])
    assert estimator.mwave.measured[0] == 0
    charge_before = np.arange(len(pulse_s))[-5:] * 32.0 * 300.0 * 1e-3
    expected_uv = 2 * patient_cfg.mwave_max_uv * recruitment(32.0, patient_cfg) * np.exp(-charge_before / patient_cfg.fatigue_charge_uc)
    # (rest noise, the voluntary EMG at 0.4 and the artifact's tail ride on the M-wave: a few %)
    estimator = EmgEstimator(config, FS_HZ, 1)
    estimator.add_pulses(pulse_s, np.zeros(len(pulse_s), dtype=int), amplitude_ma, width_us)
    for start in range(0, 4000, 4):
        estimator.process(EmgChunk(start, start / FS_HZ, 0.0, FS_HZ, emg[start : start + 4]))
    assert estimator.mwave.measured[0] == len(pulse_s)
    assert estimator.mwave.amplitude_uv[0] == pytest.approx(expected_uv.mean(), rel=0.08)
    assert estimator.blanker is not None and estimator.blanker.blanked_samples > 0


def test_replay_writes_each_pulses_m_wave(tmp_path) -> None:
    """`fesloop replay` with a pulse file writes mwave.csv: one row per pulse, at the pulse time, with
    the window's amplitude (the one-shot reference) and its normalization once the fresh reference exists."""
    from fesloop.replay_cli import replay

    config = load_config(CONFIGS / "tracking_mwave.toml")
    emg = _scripted(2000, PULSES, PEAKS_UV)[:, :1].astype(np.float32)
    replay(config, emg, FS_HZ, (PULSES / FS_HZ, np.zeros(len(PULSES), dtype=int)), tmp_path)
    rows = np.genfromtxt(tmp_path / "mwave.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    expected = _reference(emg.astype(np.float64), PULSES, 0)
    np.testing.assert_allclose(rows["time_s"], PULSES / FS_HZ, atol=1e-6)
    assert set(rows["muscle"]) == {config.muscles[0].name}
    np.testing.assert_allclose(rows["amplitude_uv"], expected, atol=1e-3)
    reference_pulses = config.controller.mwave.reference_pulses
    assert np.isnan(rows["normalized"][: reference_pulses - 1]).all()
    fresh_uv = expected[:reference_pulses].mean()
    np.testing.assert_allclose(rows["normalized"][reference_pulses - 1 :], expected[reference_pulses - 1 :] / fresh_uv,
                               atol=1e-4)
