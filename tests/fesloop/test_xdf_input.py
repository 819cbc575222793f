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
from fesloop.xdf_input import XdfInputError, _emg_stream, sample_indices
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
