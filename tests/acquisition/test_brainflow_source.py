"""BrainFlowSource on real BrainFlow boards: the playback-file board and the synthetic board."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pylsl
import pytest
from brainflow.data_filter import DataFilter

from acquisition.brainflow_source import BrainFlowSource
from acquisition.sources import Block
from fesloop.config import parse_config
from tests.acquisition.conftest import FS_HZ, SHIPPED_PLAYBACK, playback_config, ramp_playback


def read_all(source: BrainFlowSource, n_expected: int, timeout_s: float) -> list[Block]:
    """Read like the loop does (every 2 ms) until ``n_expected`` samples came, copying each block."""
    source.start(pylsl.local_clock())
    blocks: list[Block] = []
    got = 0
    deadline = time.monotonic() + timeout_s
    try:
        while got < n_expected and time.monotonic() < deadline:
            time.sleep(0.002)
            for block in source.read(pylsl.local_clock()):
                blocks.append(Block(block.first_sample_index, block.first_sample_time_s, block.emg_uv.copy(),
                                    block.lost_samples))
                got += len(block.emg_uv)
    finally:
        source.stop()
    return blocks


def indices_and_values(blocks: list[Block]) -> tuple[np.ndarray, np.ndarray]:
    index = np.concatenate([b.first_sample_index + np.arange(len(b.emg_uv)) for b in blocks])
    return index, np.concatenate([b.emg_uv for b in blocks])


def test_playback_reproduces_the_shipped_recording_exactly(tmp_path: Path) -> None:
    """The first 2.5 s of the shipped file: every value bit-exact (as float32), every index
    where the file's own timestamps put it, the recorder's dropped repeats as gaps."""
    excerpt = tmp_path / "excerpt.tsv"
    lines = SHIPPED_PLAYBACK.read_text().splitlines(keepends=True)[:2400]
    excerpt.write_text("".join(lines))
    table = np.loadtxt(excerpt)
    expected_index = np.rint((table[:, 2] - 1.0) * FS_HZ).astype(int)  # the converter's 1 s + k / fs

    blocks = read_all(BrainFlowSource(playback_config(excerpt)), len(lines), timeout_s=8)
    index, emg_uv = indices_and_values(blocks)

    assert len(index) == len(lines)
    assert np.array_equal(emg_uv[:, 0], table[:, 1].astype(np.float32))
    assert np.array_equal(index, expected_index)
    lost = [(b.first_sample_index - b.lost_samples, b.lost_samples) for b in blocks if b.lost_samples]
    jumps = np.flatnonzero(np.diff(expected_index) > 1)
    assert lost == [(int(expected_index[j] + 1), int(expected_index[j + 1] - expected_index[j] - 1)) for j in jumps]
    assert len(lost) > 3 and all(size % 20 == 0 for _, size in lost)  # whole 20-sample BITalino packets


def test_injected_gaps_and_duplicates_are_counted_exactly(tmp_path: Path) -> None:
    path = tmp_path / "gaps.tsv"
    deleted = [(500, 501), (1000, 1007), (1500, 1755), (2500, 2520)]  # 1, 7, 255 (across a wrap), 20
    values = ramp_playback(path, 3000, delete=deleted, duplicate=[2000, 2001])
    source = BrainFlowSource(playback_config(path))
    blocks = read_all(source, len(values) - 2, timeout_s=8)
    index, emg_uv = indices_and_values(blocks)

    assert [(b.first_sample_index - b.lost_samples, b.lost_samples) for b in blocks if b.lost_samples] == [
        (start, stop - start) for start, stop in deleted
    ]
    assert sum(b.lost_samples for b in blocks) == 283
    assert source.duplicate_samples == 2
    assert np.array_equal(emg_uv[:, 0], index.astype(np.float32))  # each value sits at its own index
    assert len(index) == 3000 - 283


def test_synthetic_board_streams_contiguous_microvolts_on_the_shared_clock() -> None:
    config = parse_config(
        '[acquisition]\nsource = "brainflow"\n[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
        '[[muscles]]\nname = "b"\nemg_channel = 1\nrest_uv = 1.0\nmvc_uv = 60.0\n'
    )
    source = BrainFlowSource(config)
    blocks = read_all(source, 250, timeout_s=5)
    index, emg_uv = indices_and_values(blocks)
    now_s = pylsl.local_clock()

    assert source.sampling_rate_hz == 250.0 and emg_uv.shape[1] == 2 and emg_uv.dtype == np.float32
    assert np.array_equal(index, np.arange(len(index))) and len(index) >= 250
    assert sum(b.lost_samples for b in blocks) == 0 and source.duplicate_samples == 0
    assert 0.0 < now_s - blocks[-1].first_sample_time_s < 0.5  # wall clock converted to the shared clock
    assert source.source_id == "brainflow-SYNTHETIC_BOARD-default"


def test_record_file_holds_every_raw_board_row(tmp_path: Path) -> None:
    """The BrainFlow file streamer writes each raw row; what was read is in it, in order."""
    path = tmp_path / "in.tsv"
    ramp_playback(path, 600)
    record = tmp_path / "rec" / "session.csv"
    source = BrainFlowSource(playback_config(path, extra=f'record_file = "{record}"'))
    blocks = read_all(source, 600, timeout_s=5)
    _, emg_uv = indices_and_values(blocks)
    recorded = DataFilter.read_file(str(record))

    assert recorded.shape == (4, 600)  # CALLIBRI_EMG layout, every sample
    assert np.array_equal(recorded[1].astype(np.float32), emg_uv[:, 0])
    assert np.array_equal(recorded[0], np.arange(600) % 256)


def test_playback_board_needs_its_master_board(tmp_path: Path) -> None:
    from acquisition.sources import SourceError

    config = playback_config(tmp_path / "x.tsv", extra="")
    bad = parse_config(
        '[acquisition]\nsource = "brainflow"\n[acquisition.brainflow]\nboard = "PLAYBACK_FILE_BOARD"\n'
        '[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
    )
    with pytest.raises(SourceError, match="master_board is empty"):
        BrainFlowSource(bad)
    source = BrainFlowSource(config)  # a missing file is refused when the session starts, naming the board
    with pytest.raises(SourceError, match="PLAYBACK_FILE_BOARD"):
        source.start(0.0)
