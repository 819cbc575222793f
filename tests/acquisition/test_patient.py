"""The simulated patient: artifacts, M-waves, fatigue, drive schedule, noise model, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import welch

from acquisition.patient import SimulatedPatient, recruitment
from fesloop.config import SimulatedPatientConfig
from fesloop.schema import build

FS_HZ = 2000.0
START_S = 1234.5  # arbitrary shared-clock start; pulse times below are absolute
MUSCLES = ("quad", "tib")
CHANNELS = {0: 0, 5: 1}  # stimulator device channel -> muscle index
QUIET = {"rest_noise_uv": 0.0, "mains_uv": 0.0}  # with no contraction the EMG is exactly zero


def make_cfg(**overrides: object) -> SimulatedPatientConfig:
    return build(SimulatedPatientConfig, {"sampling_rate_hz": FS_HZ, **overrides})


def make_patient(cfg: SimulatedPatientConfig) -> SimulatedPatient:
    return SimulatedPatient(cfg, MUSCLES, CHANNELS, START_S)


def pulse_at(patient: SimulatedPatient, channel: int, sample: float, amplitude_ma: float) -> None:
    """Deliver one 300 us pulse at (fractional) sample index ``sample``."""
    patient.add_pulses(
        np.array([channel]), np.array([START_S + sample / FS_HZ]), np.array([amplitude_ma]), np.array([300.0])
    )


def render(patient: SimulatedPatient, n: int, first_index: int = 0) -> np.ndarray:
    emg_uv = np.empty((n, len(MUSCLES)), dtype=np.float32)
    patient.render(first_index, emg_uv)
    return emg_uv


def expected_mwave_peak_uv(amplitude_ma: float, mid_ma: float = 30.0, slope_ma: float = 5.0) -> float:
    return 1500.0 / (1.0 + math.exp(-(amplitude_ma - mid_ma) / slope_ma))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_artifact_starts_exactly_at_the_pulse_sample() -> None:
    patient = make_patient(make_cfg(mwave_max_uv=0.0, **QUIET))
    pulse_at(patient, 0, 100.0, 30.0)  # exactly on sample 100
    pulse_at(patient, 5, 300.4, 20.0)  # between samples 300 and 301
    emg_uv = render(patient, 500)

    assert np.all(emg_uv[:100] == 0.0)
    assert emg_uv[100, 0] == pytest.approx(60.0 * 30.0, rel=1e-6)
    assert emg_uv[100, 1] == pytest.approx(0.3 * 60.0 * 30.0, rel=1e-6)  # crosstalk
    assert emg_uv[100:120, 0].min() < 0.0  # biphasic: an undershoot follows
    assert np.all(emg_uv[100 + 20 : 301] == 0.0)  # gone within 10 ms, nothing before the next pulse
    assert emg_uv[301, 1] == pytest.approx(60.0 * 20.0, rel=1e-6)
    assert emg_uv[301, 0] == pytest.approx(0.3 * 60.0 * 20.0, rel=1e-6)


def test_overlapping_artifacts_add_up_to_their_shape_sample_by_sample() -> None:
    """Each artifact is (1 - x) exp(-x) (x in decay constants) over 10 decays, on every channel by crosstalk."""
    cfg = make_cfg(mwave_max_uv=0.0, **QUIET)
    patient = make_patient(cfg)
    pulse_at(patient, 0, 100.0, 30.0)
    pulse_at(patient, 5, 104.0, 20.0)  # starts inside the first one's window
    emg_uv = np.concatenate([render(patient, 7, first_index=i) for i in range(0, 210, 7)])

    decay_samples = cfg.artifact_decay_ms * 1e-3 * FS_HZ
    x = np.arange(math.ceil(10 * decay_samples) + 1) / decay_samples
    shape = (1.0 - x) * np.exp(-x)
    expected_uv = np.zeros((210, 2))
    expected_uv[100 : 100 + x.size] += 60.0 * 30.0 * shape[:, None] * np.array([1.0, 0.3])
    expected_uv[104 : 104 + x.size] += 60.0 * 20.0 * shape[:, None] * np.array([0.3, 1.0])
    np.testing.assert_allclose(emg_uv, expected_uv, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("amplitude_ma", [15.0, 25.0, 30.0, 35.0, 45.0])
def test_mwave_peak_follows_recruitment_curve(amplitude_ma: float) -> None:
    patient = make_patient(make_cfg(artifact_uv_per_ma=0.0, fatigue_charge_uc=1e12, **QUIET))
    pulse_at(patient, 5, 40.0, amplitude_ma)
    emg_uv = render(patient, 200)

    latency = 12  # 6 ms at 2 kHz
    assert np.all(emg_uv[:, 0] == 0.0)  # only the stimulated muscle
    assert np.all(emg_uv[: 40 + latency, 1] == 0.0)
    assert abs(emg_uv[40 + latency, 1]) < 1e-3 < emg_uv[40 + latency + 1, 1]  # starts from 0 at the latency
    assert np.all(emg_uv[40 + latency + 13 :, 1] == 0.0)  # 6 ms biphasic wave
    peak_uv = expected_mwave_peak_uv(amplitude_ma)
    assert emg_uv[:, 1].max() == pytest.approx(peak_uv, rel=1e-4)
    assert emg_uv[:, 1].min() == pytest.approx(-peak_uv, rel=1e-4)
    assert recruitment(amplitude_ma, make_cfg()) == pytest.approx(peak_uv / 1500.0, rel=1e-9)


def test_recruitment_is_a_sigmoid_around_mid() -> None:
    cfg = make_cfg(recruitment_mid_ma=20.0, recruitment_slope_ma=4.0)
    assert recruitment(20.0, cfg) == pytest.approx(0.5)
    assert recruitment(0.0, cfg) < 0.01 < 0.99 < recruitment(50.0, cfg)
    currents_ma = np.linspace(0.0, 60.0, 61)
    assert np.all(np.diff([recruitment(i, cfg) for i in currents_ma]) > 0.0)


def test_fatigue_lowers_the_mwave_after_much_charge() -> None:
    patient = make_patient(make_cfg(artifact_uv_per_ma=0.0, fatigue_charge_uc=500.0, **QUIET))
    pulse_at(patient, 0, 20.0, 40.0)  # 40 mA x 300 us = 12 uC
    fresh_uv = render(patient, 200)[:, 0].max()
    assert fresh_uv == pytest.approx(expected_mwave_peak_uv(40.0), rel=1e-4)

    # 50 more pulses long over (not rendered any more) still count as delivered charge.
    times_s = START_S + np.linspace(0.0, 0.04, 50)
    patient.add_pulses(np.zeros(50, dtype=int), times_s, np.full(50, 40.0), np.full(50, 300.0))
    pulse_at(patient, 0, 250.0, 40.0)
    pulse_at(patient, 5, 300.0, 40.0)  # the other muscle is fresh
    emg_uv = render(patient, 200, first_index=200)

    assert emg_uv[:90, 0].max() == pytest.approx(fresh_uv * math.exp(-(12.0 + 50 * 12.0) / 500.0), rel=1e-4)
    assert emg_uv[:, 1].max() == pytest.approx(fresh_uv, rel=1e-4)


def test_unknown_channels_and_zero_amplitude_are_ignored() -> None:
    patient = make_patient(make_cfg(**QUIET))
    patient.add_pulses(
        np.array([3, 99, -1, 0, 5]),
        START_S + np.array([0.01, 0.02, 0.03, 0.04, 0.05]),
        np.array([40.0, 40.0, 40.0, 0.0, 0.0]),
        np.full(5, 300.0),
    )
    assert np.all(render(patient, 400) == 0.0)


def demo_patient(seed: int) -> SimulatedPatient:
    """Noise, mains, a contraction and a pulse train on both channels, some pulses between samples."""
    cfg = make_cfg(seed=seed, contractions=[{"muscle": "quad", "start_s": 0.1, "duration_s": 0.3, "level": 0.5}])
    patient = make_patient(cfg)
    times_s = START_S + np.arange(0.01, 0.5, 1.0 / 33.0)
    channels = np.arange(times_s.size) % 2 * 5
    patient.add_pulses(channels, times_s, np.full(times_s.size, 32.0), np.full(times_s.size, 300.0))
    return patient


def test_same_seed_same_signal_other_seed_other_signal() -> None:
    first = render(demo_patient(1), 1000)
    assert np.array_equal(first, render(demo_patient(1), 1000))
    assert not np.allclose(first, render(demo_patient(2), 1000))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=80), min_size=1, max_size=60))
def test_output_independent_of_block_sizes(block_sizes: list[int]) -> None:
    whole = render(demo_patient(3), 1000)
    patient = demo_patient(3)
    blocks = np.empty_like(whole)
    first, block = 0, 0
    while first < 1000:
        n = min(block_sizes[block % len(block_sizes)], 1000 - first)
        patient.render(first, blocks[first : first + n])
        first, block = first + n, block + 1
    assert np.array_equal(whole, blocks)


def test_late_pulse_contributes_only_its_remaining_samples() -> None:
    reference = demo_patient(4)
    pulse_at(reference, 0, 95.5, 40.0)
    expected_uv = render(reference, 300)

    late = demo_patient(4)
    head_uv = render(late, 100)
    pulse_at(late, 0, 95.5, 40.0)  # arrives after samples 96..99 were rendered
    tail_uv = render(late, 200, first_index=100)

    assert np.array_equal(head_uv, render(demo_patient(4), 100))
    assert np.array_equal(tail_uv, expected_uv[100:])


def test_render_refuses_a_gap() -> None:
    patient = make_patient(make_cfg())
    render(patient, 10)
    with pytest.raises(ValueError, match="expects sample 10"):
        render(patient, 10, first_index=11)


def test_mains_and_dc_offset() -> None:
    patient = make_patient(make_cfg(rest_noise_uv=0.0, mains_uv=5.0, mains_hz=60.0, dc_offset_uv=100.0))
    emg_uv = render(patient, 300)
    expected_uv = 100.0 + 5.0 * np.sin(2 * np.pi * 60.0 * np.arange(300) / FS_HZ)
    np.testing.assert_allclose(emg_uv[:, 0], expected_uv, atol=1e-4)
    np.testing.assert_allclose(emg_uv[:, 1], expected_uv, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rest_and_contraction_rms_match_config(seed: int) -> None:
    cfg = make_cfg(
        seed=seed,
        rest_noise_uv=3.0,
        full_drive_uv=300.0,
        mains_uv=0.0,
        schedule_period_s=20.0,
        contractions=[{"muscle": "quad", "start_s": 2.5, "duration_s": 4.0, "level": 0.5}],
    )
    emg_uv = render(make_patient(cfg), int(7.0 * FS_HZ))
    rest_uv = rms(emg_uv[: int(2.4 * FS_HZ), 0])
    active_uv = rms(emg_uv[int(2.6 * FS_HZ) : int(6.4 * FS_HZ), 0])

    assert rest_uv == pytest.approx(3.0, rel=0.05)
    assert active_uv == pytest.approx(math.hypot(3.0, 0.5 * 300.0), rel=0.05)
    assert active_uv / rest_uv == pytest.approx(math.hypot(3.0, 150.0) / 3.0, rel=0.05)
    assert rms(emg_uv[int(2.6 * FS_HZ) : int(6.4 * FS_HZ), 1]) == pytest.approx(3.0, rel=0.05)  # tib stays at rest


def test_drive_follows_schedule_with_wraparound() -> None:
    cfg = make_cfg(
        schedule_period_s=2.0,
        drive_ramp_ms=50.0,
        contractions=[
            {"muscle": "quad", "start_s": 1.5, "duration_s": 1.0, "level": 0.8},  # runs over the period end
            {"muscle": "tib", "start_s": 0.2, "duration_s": 0.5, "level": 0.4},
        ],
    )
    patient = make_patient(cfg)
    drive = np.empty((int(5.0 * FS_HZ), 2), dtype=np.float32)
    patient.drive(0, drive)

    def at(t_s: float, muscle: int) -> float:
        return float(drive[round(t_s * FS_HZ), muscle])

    # No wrap into the first period before the first start; ramp midpoints at +-25 ms of the window edges.
    quad = {0.2: 0.0, 1.0: 0.0, 1.5: 0.0, 1.525: 0.4, 1.8: 0.8, 2.2: 0.8, 2.475: 0.4, 2.5: 0.0}
    quad |= {2.6: 0.0, 3.5: 0.0, 3.8: 0.8, 4.2: 0.8, 4.6: 0.0}  # the next repetition
    for t_s, level in quad.items():
        assert at(t_s, 0) == pytest.approx(level, abs=1e-6), t_s
    tib = {0.1: 0.0, 0.45: 0.4, 1.0: 0.0, 2.45: 0.4, 4.45: 0.4, 4.8: 0.0}
    for t_s, level in tib.items():
        assert at(t_s, 1) == pytest.approx(level, abs=1e-6), t_s
    assert drive.min() >= 0.0 and drive.max() <= 0.8 + 1e-6

    later = np.empty((1000, 2), dtype=np.float32)
    patient.drive(7000, later)  # any start index, no state
    assert np.array_equal(later, drive[7000:8000])


SCHEDULES = {
    "wraparound": (2.0, 50.0, [("quad", 1.5, 1.0, 0.8), ("tib", 0.2, 0.5, 0.4)]),
    "windows overlap": (0.5, 20.0, [("quad", 0.1, 1.2, 0.7)]),  # each window runs into the next two
    "steps": (1.0, 0.0, [("quad", 0.25, 0.5, 0.6), ("quad", 0.5, 0.1, 0.9)]),  # no ramp, same muscle twice
}


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(sorted(SCHEDULES)), st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=40))
def test_drive_in_blocks_equals_the_per_sample_formula(schedule: str, block_sizes: list[int]) -> None:
    """Blocks outside every window or on a plateau skip the formula: the values must not change."""
    period_s, ramp_ms, contractions = SCHEDULES[schedule]
    cfg = make_cfg(
        schedule_period_s=period_s,
        drive_ramp_ms=ramp_ms,
        contractions=[{"muscle": m, "start_s": s, "duration_s": d, "level": lv} for m, s, d, lv in contractions],
    )
    n = int(3.0 * FS_HZ)
    whole = np.empty((n, 2), dtype=np.float32)
    make_patient(cfg).drive(0, whole)  # one block spanning every window: the formula on every sample
    patient = make_patient(cfg)
    blocks = np.empty_like(whole)
    first, block = 0, 0
    while first < n:
        size = min(block_sizes[block % len(block_sizes)], n - first)
        patient.drive(first, blocks[first : first + size])
        first, block = first + size, block + 1
    assert np.array_equal(whole, blocks)
    assert whole.max() == pytest.approx(max(c[3] for c in contractions))  # the plateaus were reached


@pytest.mark.parametrize("fs_hz", [2000.0, 800.0])
def test_voluntary_emg_power_lies_in_the_emg_band(fs_hz: float) -> None:
    cfg = build(
        SimulatedPatientConfig,
        {
            "sampling_rate_hz": fs_hz,
            "rest_noise_uv": 0.0,
            "mains_uv": 0.0,
            "schedule_period_s": 20.0,
            "contractions": [{"muscle": "quad", "start_s": 0.0, "duration_s": 10.0, "level": 1.0}],
        },
    )
    patient = SimulatedPatient(cfg, MUSCLES, CHANNELS, START_S)
    emg_uv = np.empty((int(5.0 * fs_hz), 2), dtype=np.float32)
    patient.render(0, emg_uv)
    freq_hz, power = welch(emg_uv[int(1.0 * fs_hz) :, 0], fs=fs_hz, nperseg=512)

    in_band = (freq_hz >= 20.0) & (freq_hz <= min(450.0, 0.45 * fs_hz))
    assert power[in_band].sum() / power.sum() > 0.9
    assert rms(emg_uv[int(1.0 * fs_hz) :, 0]) == pytest.approx(300.0, rel=0.05)
