"""`fesloop replay` end to end: the command line, the file formats, the CSVs it writes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONFIGS
from tests.controller.test_recordings import DATA


def _replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fesloop", "replay", str(CONFIGS / "replay.toml"), *args],
        capture_output=True, text=True, timeout=60,
    )


def test_replay_writes_activation_and_events_in_the_fixed_formats(tmp_path: Path) -> None:
    result = _replay("--emg", str(DATA / "biosppy" / "emg_1.txt"), "--fs", "1000", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "activation.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["time_s", "muscle", "gate_muscle"]
    table = np.array(rows[1:], dtype=float)
    assert len(table) == pytest.approx(63.88 * 200, abs=2)  # one row per control period (200 Hz)
    assert np.all(np.diff(table[:, 0]) > 0) and table[0, 0] < 0.01  # seconds from the first sample
    assert set(np.unique(table[:, 2])) <= {0.0, 1.0}
    assert table[:, 1].max() > 0.5  # contractions reach the uncalibrated replay.toml levels
    with open(tmp_path / "events.csv") as f:
        events = list(csv.reader(f))
    assert events[0] == ["time_s", "channel", "event"]
    kinds = {e[2] for e in events[1:]}
    assert "onset" in kinds and "offset" in kinds
    assert kinds <= {"onset", "offset", "contamination_start", "contamination_end", "artifact"}


def test_replay_reads_npy_and_csv_with_header_and_pulse_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emg = (np.round((rng.normal(size=(4000, 2)) * 20 + 500) * 8) / 8).astype(np.float32)  # exact in text
    np.save(tmp_path / "emg.npy", emg)
    (tmp_path / "emg.csv").write_text("a,b\n" + "\n".join(f"{x:.3f},{y:.3f}" for x, y in emg) + "\n")
    (tmp_path / "pulses.csv").write_text("time_s\n0.5\n0.6\n")
    for name in ("emg.npy", "emg.csv"):
        out = tmp_path / f"out_{name}"
        result = _replay("--emg", str(tmp_path / name), "--fs", "2000", "--pulses", str(tmp_path / "pulses.csv"), "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert (out / "activation.csv").read_text().count("\n") == 401
    assert (tmp_path / "out_emg.npy" / "activation.csv").read_text() == (tmp_path / "out_emg.csv" / "activation.csv").read_text()


def test_replay_refuses_a_missing_rate_and_unknown_formats(tmp_path: Path) -> None:
    missing = _replay("--emg", str(DATA / "biosppy" / "emg.txt"), "--out", str(tmp_path))
    assert missing.returncode != 0 and "--fs" in missing.stderr
    (tmp_path / "x.wav").write_bytes(b"RIFF")
    unknown = _replay("--emg", str(tmp_path / "x.wav"), "--fs", "1000", "--out", str(tmp_path))
    assert unknown.returncode != 0 and "unsupported format" in unknown.stderr


@pytest.mark.timeout(60)
def test_replay_blanks_around_every_pulse_of_a_long_recording(tmp_path: Path) -> None:
    """Replay handed all pulses to the blanker at once; it remembers the recent ones only (1024, sized for
    the live rate), so a 60 s recording at 30 Hz was blanked around its last 1024 pulses only."""
    from fesloop.config import load_config
    from fesloop.replay_cli import replay

    config = load_config(CONFIGS / "demo.toml")
    fs_hz = 2000.0
    emg = np.random.default_rng(0).normal(size=(int(60 * fs_hz), 2)).astype(np.float32) * 20
    pulse_index = np.arange(2000, len(emg) - 100, 67)  # on samples, 33.5 ms apart: windows never overlap
    blanking = config.controller.blanking
    window_samples = round(blanking.pre_ms * 1e-3 * fs_hz) + round(blanking.post_ms * 1e-3 * fs_hz) + 1
    estimator = replay(config, emg, fs_hz, (pulse_index / fs_hz, np.zeros(len(pulse_index), dtype=int)), tmp_path)
    assert len(pulse_index) > 1700
    assert estimator.blanker.blanked_samples == len(pulse_index) * window_samples
