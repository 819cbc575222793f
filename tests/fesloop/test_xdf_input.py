"""XDF input: lost samples found from timestamps and kept as gaps; streams chosen or refused by name.

Whole recordings are replayed in tests/recording/test_recording.py.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fesloop.config import load_config
from fesloop.replay_cli import replay
from fesloop.xdf_session import Session, Stream
from fesloop.xdf_input import XdfInputError, _emg_stream, sample_indices, sample_times
from tests.conftest import CONFIGS

FS_HZ = 2000.0


def test_timestamps_without_loss_give_consecutive_indices() -> None:
    jitter_s = np.random.default_rng(1).uniform(-0.2, 0.2, 1000) / FS_HZ  # steps stay within 0.6..1.4 periods
    times = 100.0 + np.arange(1000) / FS_HZ + jitter_s
    assert np.array_equal(sample_indices(times, FS_HZ), np.arange(1000))


def test_a_timestamp_step_keeps_the_lost_samples_out_as_a_gap() -> None:
    kept = np.r_[0:300, 340:1000]  # 40 samples lost
    indices = sample_indices(5.0 + kept / FS_HZ, FS_HZ)
    assert np.array_equal(indices, kept)


def test_replay_chunks_never_span_a_gap_and_mark_it_as_a_contamination_window(tmp_path) -> None:
    config = load_config(CONFIGS / "replay.toml")
    kept = np.r_[0:3000, 3200:6000]
    emg_uv = np.random.default_rng(2).normal(0, 20, (len(kept), 1)).astype(np.float32)
    estimator = replay(config, emg_uv, FS_HZ, None, tmp_path, sample_index=kept)
    assert estimator.gap_samples == 200
    with open(tmp_path / "events.csv") as f:
        windows = [row for row in csv.DictReader(f) if row["event"].startswith("contamination")]
    muscle = config.muscles[0].name
    assert windows == [
        {"time_s": f"{3000 / FS_HZ:.6f}", "channel": muscle, "event": "contamination_start"},
        {"time_s": f"{3200 / FS_HZ:.6f}", "channel": muscle, "event": "contamination_end"},
    ]
    # The gate stays closed for the hold-off after the gap (stale_ms), as in the live controller.
    table = np.genfromtxt(tmp_path / "activation.csv", delimiter=",", names=True)
    gate, time_s = table[f"gate_{config.stimulation[0].name}"], table["time_s"]
    resumed_s, hold_off_s = 3200 / FS_HZ, config.controller.stale_ms * 1e-3
    assert gate[(time_s > resumed_s) & (time_s < resumed_s + hold_off_s - 0.01)].max() == 0
    assert gate[(time_s > resumed_s + hold_off_s + 0.01) & (time_s < resumed_s + hold_off_s + 0.1)].min() == 1
    assert gate[(time_s > 1.0) & (time_s < 1.45)].min() == 1


def _session(*streams: Stream) -> Session:
    return Session({s.name: s for s in streams}, {}, 0.0)


def _stream(name: str, kind: str) -> Stream:
    return Stream(name, kind, ["a"], np.zeros(1), [[0.0]], rate_hz=FS_HZ)


def test_no_or_several_emg_streams_are_refused_naming_what_there_is() -> None:
    with pytest.raises(XdfInputError, match=r"no stream of type EMG .*markers \(Markers\)"):
        _emg_stream(_session(_stream("markers", "Markers")), "")
    two = _session(_stream("left", "EMG"), _stream("right", "EMG"))
    with pytest.raises(XdfInputError, match="several streams of type EMG"):
        _emg_stream(two, "")
    assert _emg_stream(two, "right").name == "right"


def _stamped(kept: np.ndarray, drift_ppm: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, true times from the first) of samples on grid places ``kept``: the amplifier's clock
    off by ``drift_ppm``, every 4-sample chunk stamped late by an exponential delay (mean 2 ms)."""
    true_s = kept / FS_HZ * (1 + drift_ppm * 1e-6)
    delay_s = np.repeat(np.random.default_rng(seed).exponential(2e-3, len(kept) // 4 + 1), 4)[: len(kept)]
    return 100.0 + true_s + delay_s, true_s - true_s[0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("drift_ppm", [-300.0, 0.0, 300.0])
def test_late_chunks_and_drift_are_not_gaps_and_real_gaps_are_found(seed: int, drift_ppm: float) -> None:
    """Chunks stamped on arrival jump by up to ~10 periods: each step over 1.5 periods was a gap
    (a real synthetic-board recording with no loss showed 25). Gaps of 7 and 501 samples are exact."""
    kept = np.r_[0:20000, 20007:21500, 22001:40000]
    times, _ = _stamped(kept, drift_ppm, seed)
    assert (np.diff(times) * FS_HZ > 1.5).sum() > 1000  # the old rule's gaps
    np.testing.assert_array_equal(sample_indices(times, FS_HZ), kept)


def test_sample_times_follow_the_amplifiers_drift_not_the_delay_jitter() -> None:
    kept = np.r_[0:20000, 20007:60000]
    times, true_s = _stamped(kept, 300.0, seed=5)
    sample_time_s = sample_times(times, sample_indices(times, FS_HZ), FS_HZ)
    assert np.ptp(sample_time_s - true_s) < 0.5e-3  # a constant (the least delay) and < 0.5 ms
    assert np.ptp(times - times[0] - true_s) > 8e-3  # the stamps themselves jitter by ~10 ms
    assert np.ptp(kept / FS_HZ - true_s) > 8e-3  # and the nominal grid is 9 ms off by the end


@pytest.mark.timeout(60)
def test_replay_blanks_pulses_on_the_recordings_clock_under_drift(tmp_path) -> None:
    """Replay timed samples as index / fs while pulses keep their recorded times: with the amplifier
    500 ppm fast, artifacts t s in came t x 0.5 ms before their pulses; from 5 to 18 s that is outside
    every blanking window (1 ms before to 20 ms after each pulse, 30 Hz)."""
    config = load_config(CONFIGS / "demo.toml")
    n = int(20 * FS_HZ)
    stamps_s = 100.0 + np.arange(n) / FS_HZ * (1 + 500e-6)
    pulse_s = np.arange(1.0, 19.0, 1 / 30)  # on the recording's clock, from the first sample
    emg = np.random.default_rng(3).normal(0, 2.0, (n, 2)).astype(np.float32)
    for k in np.searchsorted(stamps_s - stamps_s[0], pulse_s):
        emg[k : k + 6] += 5000.0  # the artifact, where the recorded clock puts the pulse
    index = sample_indices(stamps_s, FS_HZ)
    peaks = []
    for times in (None, sample_times(stamps_s, index, FS_HZ)):
        out = tmp_path / ("nominal" if times is None else "recorded")
        replay(config, emg, FS_HZ, (pulse_s, np.zeros(len(pulse_s), dtype=int)), out, index, times)
        table = np.genfromtxt(out / "activation.csv", delimiter=",", names=True)
        peaks.append(table[config.muscles[0].name][(table["time_s"] > 5.0) & (table["time_s"] < 18.0)].max())
    nominal, recorded = peaks
    assert recorded < 0.05 and nominal > 0.5, peaks


def test_fesloops_own_recording_takes_its_gaps_from_the_acquisitions_markers() -> None:
    """The acquisition counted its gaps from the amplifier's package counter and marked each one
    (`gap N samples` at the first sample after it); the timestamps' envelope cannot see a
    1-sample gap at 4 kHz, and its sample-clock corrections there looked like gaps. Another app's
    EMG stream (no fesloop description) still has its gaps found from the timestamps."""
    from fesloop.xdf_input import emg_of_session

    fs_hz = 4000.0
    kept = np.r_[0:8000, 8001:12000, 12007:20000]  # 1 and 7 samples lost
    times = 50.0 + kept / fs_hz + np.random.default_rng(4).uniform(0, 0.1e-3, len(kept))
    after_gaps = [np.searchsorted(kept, 8001), np.searchsorted(kept, 12007)]
    markers = Stream("acquisition-markers", "Markers", ["event"],
                     np.array([10.0, times[after_gaps[0]], times[after_gaps[1]]]),
                     [["fault EMG stale"], ["gap 1 samples"], ["gap 7 samples"]])
    own = Stream("emg", "EMG", ["a"], times, np.zeros((len(kept), 1)), {"process": "acquisition"}, fs_hz)
    np.testing.assert_array_equal(emg_of_session(_session(own, markers)).sample_index, kept)
    other = Stream("amp", "EMG", ["a"], times, np.zeros((len(kept), 1)), rate_hz=fs_hz)
    found = emg_of_session(_session(other, markers)).sample_index
    assert found[-1] == kept[-1] - 1  # the 7-sample gap from the timestamps, not the 1-sample one
