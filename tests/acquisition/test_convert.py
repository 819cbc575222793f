"""``fesloop convert``: recordings to BrainFlow playback files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from brainflow.board_shim import BoardIds, BoardShim
from brainflow.data_filter import DataFilter

from acquisition.convert import ConvertError, convert, load_samples, repeated_packets
from tests.acquisition.conftest import SHIPPED_PLAYBACK

pytestmark = pytest.mark.timeout(90)
BIOSPPY = Path(__file__).resolve().parents[1] / "data" / "biosppy" / "emg_1.txt"


def fesloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fesloop", *args], capture_output=True, text=True, timeout=60)


def test_shipped_playback_file_is_reproduced_by_the_documented_command(tmp_path: Path) -> None:
    out = tmp_path / "emg.tsv"
    done = fesloop("convert", str(BIOSPPY), str(out), "--fs", "1000", "--board", "CALLIBRI_EMG_BOARD",
                   "--scale-uv", "0.79848", "--offset", "2048", "--duration-s", "30", "--drop-repeats", "20")
    assert done.returncode == 0, done.stderr
    assert "28260 samples of 1 channel(s) at 1000 Hz for CALLIBRI_EMG_BOARD; 87 repeated packets" in done.stdout
    assert out.read_bytes() == SHIPPED_PLAYBACK.read_bytes()
    assert SHIPPED_PLAYBACK.stat().st_size < 2_000_000


def test_repeated_packets_become_counter_gaps_not_samples() -> None:
    counts = np.loadtxt(BIOSPPY)[:30000, None]
    repeats = repeated_packets(counts, 20)
    table = DataFilter.read_file(str(SHIPPED_PLAYBACK))
    index = np.rint((table[2] - 1.0) * 1000).astype(int)
    assert repeats.size == 87
    assert not np.isin(np.concatenate([np.arange(p * 20, p * 20 + 20) for p in repeats]), index).any()
    assert np.array_equal(table[0], index % 256)
    assert np.allclose(table[1], (counts[index, 0] - 2048) * 0.79848, atol=1e-6)


def test_npy_and_csv_columns_into_a_multichannel_board(tmp_path: Path) -> None:
    samples = np.arange(500 * 3, dtype=np.float64).reshape(500, 3)
    np.save(tmp_path / "x.npy", samples)
    (tmp_path / "x.csv").write_text("\n".join(",".join(f"{v:g}" for v in row) + ",9" for row in samples))
    from_csv = load_samples(tmp_path / "x.csv", columns=[0, 1, 2])
    assert np.array_equal(from_csv, load_samples(tmp_path / "x.npy"))

    out = tmp_path / "cyton.tsv"
    done = convert(from_csv, 250.0, "CYTON_BOARD", out, scale_uv=0.5)
    descr = BoardShim.get_board_descr(BoardIds.CYTON_BOARD)
    table = DataFilter.read_file(str(out))
    assert done.samples_written == 500 and table.shape == (descr["num_rows"], 500)
    assert np.array_equal(table[descr["emg_channels"][:3]].T, samples * 0.5)


def test_rate_mismatch_is_refused_with_a_way_out(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="CALLIBRI_EMG_BOARD samples at 1000 Hz"):
        convert(np.zeros((10, 1)), 2000.0, "CALLIBRI_EMG_BOARD", tmp_path / "x.tsv")
    done = fesloop("convert", str(tmp_path / "missing.csv"), str(tmp_path / "x.tsv"), "--fs", "1000")
    assert done.returncode != 0 and "fesloop convert:" in done.stderr


def test_samples_lost_before_conversion_stay_lost_in_the_counter_and_timestamps(tmp_path: Path) -> None:
    grid = np.r_[0:100, 140:300]  # 40 samples lost upstream (e.g. a gap in an XDF recording)
    samples = np.arange(grid.size, dtype=np.float64)[:, None]
    out = tmp_path / "gap.tsv"
    done = convert(samples, 250.0, "CYTON_BOARD", out, sample_index=grid)
    descr = BoardShim.get_board_descr(BoardIds.CYTON_BOARD)
    table = DataFilter.read_file(str(out))
    assert done.samples_written == grid.size
    assert np.array_equal(table[descr["package_num_channel"]], grid % 256)
    assert np.allclose(table[descr["timestamp_channel"]], 1.0 + grid / 250.0)
    assert np.array_equal(table[descr["emg_channels"][0]], samples[:, 0])  # nothing filled in
