"""BrainFlowSource on real BrainFlow boards: the playback-file board and the synthetic board."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pylsl
import pytest
from brainflow.board_shim import BoardIds, BoardShim
from brainflow.data_filter import DataFilter

from acquisition import brainflow_source
from acquisition.brainflow_source import BrainFlowSource
from acquisition.convert import convert
from acquisition.sources import Block
from fesloop import protocol
from fesloop.clock import ManualClock
from fesloop.config import parse_config
from tests.acquisition.conftest import FS_HZ, SHIPPED_PLAYBACK, playback_config, ramp_playback

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _libfaketime() -> Path | None:
    """libfaketime's library: the one the `libfaketime` pip package ships (the test extra), else the system's.

    The test below failed ~1 run in 10 on 2026-11-27 (a gap claimed around the step; the cause was
    not found); after that day's changes to the gap scan and the sample clock it passed 22 of 22
    runs, 10 of them with both cores busy. If it fails again, its output says what was claimed."""
    try:
        import libfaketime
    except ImportError:
        shipped = []
    else:
        shipped = [Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"]
    return next((p for p in [*shipped, Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")] if p.exists()), None)


LIBFAKETIME = _libfaketime()
SYNTHETIC_ONE_MUSCLE = (
    '[acquisition]\nsource = "brainflow"\n[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
)


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


def chunk_steps_off_the_index_s(firsts: list[tuple[int, float, int]], fs_hz: float) -> np.ndarray:
    """For consecutive chunks (first index, first sample time, samples): how far the step in first
    sample time is from what the indices say (index step / fs)."""
    index = np.array([f[0] for f in firsts])
    time_s = np.array([f[1] for f in firsts])
    return np.diff(time_s) - np.diff(index) / fs_hz


@pytest.mark.timeout(30)
def test_synthetic_board_chunk_times_follow_the_sample_indices() -> None:
    """Real synthetic board, 1.5 s: the first sample time of chunk k+1 minus chunk k is n_k / fs
    (within 1 % of it: the sample clock's drift and smoothing), so times never go back. BrainFlow's
    per-chunk arrival stamps were off by up to half a period and more (-10..+12 periods under load)."""
    source = BrainFlowSource(parse_config(SYNTHETIC_ONE_MUSCLE))
    blocks = read_all(source, 375, timeout_s=5)
    firsts = [(b.first_sample_index, b.first_sample_time_s, len(b.emg_uv)) for b in blocks]
    off_s = chunk_steps_off_the_index_s(firsts, source.sampling_rate_hz)

    assert len(blocks) > 50 and sum(b.lost_samples for b in blocks) == 0
    assert np.all(np.diff([f[1] for f in firsts]) > 0)
    assert np.all(np.abs(off_s) <= 0.01 * np.diff([f[0] for f in firsts]) / source.sampling_rate_hz)


@pytest.mark.timeout(150)
@pytest.mark.skipif(LIBFAKETIME is None, reason="needs libfaketime (pip install libfaketime, or the system package)")
def test_a_wall_clock_step_moves_no_sample_time_and_is_reported(tmp_path: Path) -> None:
    """The synthetic board under libfaketime, the wall clock stepped +2 s after 1 s (fault matrix
    #16): BrainFlow's stamps jump +2 s, the EMG times do not (the newest sample of every chunk stays
    within 0.5 s of the read), nothing is counted lost, and the step is one event. BrainFlow's
    synthetic board then makes up the 2 s in a burst of samples (more samples than time): while
    it lasts the sample clock is anchored again at the reads (each an event; how long the burst
    lasts varies with the machine's load, so after the step only the bound on the times is
    asserted); before the step, chunk times follow the indices.

    In about one run of eight the synthetic board, which paces itself by the wall clock, stops
    making samples for 1-2 s after its burst (more often when libfaketime's clock flaps back and
    forth, each flap reported +-2.000 s): a device whose clock stopped, read rightly as samples
    missing (a counter period lost, the line anchored again), not the one step this test is about.
    Such a run is repeated, at most three times in all; not one where the step went unreported, nor
    one where the source itself held rows back (that would be its own fault)."""
    for _ in range(3):
        result = _run_with_a_wall_clock_step(tmp_path)
        walls = [e for e in result["events"] if e[1].startswith("wall clock stepped")]
        reads_s = [b[4] for b in result["blocks"]]
        board_paused = max(np.diff(reads_s)) > 0.5 and not result["held_s"]
        if not (len(walls) > 1 or board_paused):
            break
    blocks, stepped_s, fs_hz = result["blocks"], result["stepped_s"], 250.0
    newest_age_s = np.array([b[4] - (b[1] + (b[2] - 1) / fs_hz) for b in blocks])

    assert len(walls) == 1 and not board_paused, f"three runs flapped or paused: {walls}, {max(np.diff(reads_s)):.2f} s"
    assert len([b for b in blocks if b[4] > stepped_s + 1.0]) > 50
    assert [b[0] for b in blocks] == np.cumsum([0] + [b[2] for b in blocks[:-1]]).tolist()  # no gap
    assert sum(b[3] for b in blocks) == 0
    assert np.abs(newest_age_s).max() < 0.5
    assert walls[0][1].startswith("wall clock stepped +2.00") and walls[0][0] >= stepped_s
    assert all(e[1].startswith("sample clock anchored again") for e in result["events"] if e not in walls)
    before = [b for b in blocks if b[4] < stepped_s]
    off_s = chunk_steps_off_the_index_s([(b[0], b[1], b[2]) for b in before], fs_hz)
    assert np.all(np.abs(off_s) <= 0.01 * np.diff([b[0] for b in before]) / fs_hz)


def _run_with_a_wall_clock_step(tmp_path: Path) -> dict:
    """tests.acquisition.wall_clock_step_run under libfaketime: blocks and events of 4 s, +2 s at 1 s."""
    offset_file = tmp_path / "faketime.rc"
    offset_file.write_text("+0\n")
    env = {**os.environ, "LD_PRELOAD": str(LIBFAKETIME), "DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1",
           "FAKETIME_TIMESTAMP_FILE": str(offset_file)}
    run = subprocess.run(
        [sys.executable, "-m", "tests.acquisition.wall_clock_step_run", str(offset_file), "+2", "1.0", "4.0"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=45,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.timeout(30)
def test_a_resent_packet_is_dropped_not_handed_over_again(tmp_path: Path) -> None:
    """Playback file whose 5-sample packet 2000..2004 comes twice (fault matrix #7): the five
    repeats are duplicates, no gap is claimed, every value sits at its own index."""
    path = tmp_path / "resent.tsv"
    values = ramp_playback(path, 3000)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2005] + lines[2000:2005] + lines[2005:]))
    source = BrainFlowSource(playback_config(path))
    blocks = read_all(source, len(values), timeout_s=10)
    index, emg_uv = indices_and_values(blocks)

    assert source.duplicate_samples == 5
    assert sum(b.lost_samples for b in blocks) == 0
    assert np.array_equal(index, np.arange(3000))
    assert np.array_equal(emg_uv[:, 0], index.astype(np.float32))


@pytest.mark.timeout(30)
def test_a_delivery_stall_with_a_continuous_counter_loses_nothing(tmp_path: Path) -> None:
    """Playback file paused 150 ms between samples 999 and 1000 (the board delivers them late, its
    counter goes on): no gap, every later sample at its own index (was: 256 lost, all shifted)."""
    path = tmp_path / "stall.tsv"
    values = ramp_playback(path, 3000)
    table = np.loadtxt(path)
    table[1000:, 2] += 0.150
    np.savetxt(path, table, fmt=["%.0f", "%.10g", "%.6f", "%.0f"], delimiter="\t")
    source = BrainFlowSource(playback_config(path))
    blocks = read_all(source, len(values), timeout_s=10)
    index, emg_uv = indices_and_values(blocks)

    assert sum(b.lost_samples for b in blocks) == 0
    assert np.array_equal(index, np.arange(3000))
    assert np.array_equal(emg_uv[:, 0], index.astype(np.float32))


@pytest.mark.timeout(30)
def test_non_finite_samples_are_dropped_as_lost_and_counted(tmp_path: Path) -> None:
    """Playback file with NaN at sample 300, inf at 600, 1e300 (inf in float32) at 700 and NaN at
    800 and 801: those rows are lost (the index jumps over them) and counted; everything handed
    over is finite, at its own index, and every chunk decodes as the controller decodes it (a
    non-finite chunk is dropped whole there)."""
    path = tmp_path / "nan.tsv"
    ramp_playback(path, 1000)
    lines = path.read_text().splitlines(keepends=True)
    for line, value in ((300, "nan"), (600, "inf"), (700, "1e300"), (800, "nan"), (801, "nan")):
        columns = lines[line].split("\t")
        columns[1] = value
        lines[line] = "\t".join(columns)
    path.write_text("".join(lines))
    source = BrainFlowSource(playback_config(path))
    blocks = read_all(source, 995, timeout_s=10)
    index, emg_uv = indices_and_values(blocks)
    encoder = protocol.EmgEncoder(protocol.Kind.EMG)
    decoded = [
        protocol.decode([bytes(part) for part in encoder.encode(k, b.first_sample_time_s, protocol.EmgChunk(
            b.first_sample_index, b.first_sample_time_s, b.first_sample_time_s, FS_HZ, b.emg_uv))])
        for k, b in enumerate(blocks)
    ]

    assert np.isfinite(emg_uv).all()
    assert np.array_equal(index, np.setdiff1d(np.arange(1000), [300, 600, 700, 800, 801]))
    assert np.array_equal(emg_uv[:, 0], index.astype(np.float32))
    lost = [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples]
    assert lost == [(301, 1), (601, 1), (701, 1), (802, 2)]
    assert source.non_finite_samples == 5 and source.duplicate_samples == 0
    assert len(decoded) == len(blocks)


def daisy_config(path: Path, extra: str = "") -> object:
    return parse_config(
        '[acquisition]\nsource = "brainflow"\n[acquisition.brainflow]\nboard = "PLAYBACK_FILE_BOARD"\n'
        f'master_board = "CYTON_DAISY_BOARD"\nfile = "{path}"\nplayback_loop = false\n{extra}\n'
        '[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
    )


@pytest.mark.timeout(30)
def test_a_cyton_daisy_counter_stepping_by_two_is_contiguous(tmp_path: Path) -> None:
    """CYTON_DAISY_BOARD's driver keeps the odd packet number of each pair: 1, 3, ... 255, 1 (one
    step of 2 per sample, a wrap every 128 samples). 600 samples at 125 Hz, three taken out: one
    gap of 3, every value at its own index (was: every sample a gap, the index at twice the count)."""
    path = tmp_path / "daisy.tsv"
    convert(np.arange(600, dtype=np.float64)[:, None], 125.0, "CYTON_DAISY_BOARD", path)
    descr = BoardShim.get_board_descr(BoardIds.CYTON_DAISY_BOARD)
    table = np.loadtxt(path)
    assert np.array_equal(table[:, descr["package_num_channel"]], 2 * np.arange(600) % 256)  # convert: step 2
    table[:, descr["package_num_channel"]] = (2 * np.arange(600) + 1) % 256  # as cyton_daisy.cpp writes it
    np.savetxt(path, np.delete(table, [300, 301, 302], axis=0), fmt="%.6f", delimiter="\t")
    source = BrainFlowSource(daisy_config(path))
    blocks = read_all(source, 597, timeout_s=15)
    index, emg_uv = indices_and_values(blocks)

    assert np.array_equal(index, np.setdiff1d(np.arange(600), [300, 301, 302]))
    assert np.array_equal(emg_uv[:, 0], index.astype(np.float32))
    assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(303, 3)]


@pytest.mark.timeout(10)
def test_a_counter_step_that_does_not_divide_the_wrap_is_refused(tmp_path: Path) -> None:
    from acquisition.sources import SourceError

    with pytest.raises(SourceError, match="CYTON_DAISY_BOARD counts 2 per sample, which does not divide"):
        BrainFlowSource(daisy_config(tmp_path / "x.tsv", "package_counter_modulo = 255"))


class StubCallibri:
    """A 1 kHz CALLIBRI_EMG board in simulated time: sample i (counter i % 256, EMG i uV) arrives
    3 ms after it is taken, i / 1000 s on ``clock``; BrainFlow stamps it then (wall = local clock)."""

    def __init__(self, clock: ManualClock, n: int) -> None:
        self.clock = clock
        self.sample = np.arange(n)  # the samples that will arrive, in order
        self.arrival_s = self.sample / 1000.0 + 0.003
        self.next = 0
        self.nan_first_stamp = False  # BrainFlow stamps the first row of each read NaN
        self.wall_step_at_s = np.inf  # the wall clock (BrainFlow's stamps) steps +2 s at this local time

    def lose(self, first: int, n: int) -> None:
        """Samples ``first`` .. ``first + n - 1`` never arrive (a radio dropout)."""
        kept = (self.sample < first) | (self.sample >= first + n)
        self.sample, self.arrival_s = self.sample[kept], self.arrival_s[kept]

    def get_board_data_count(self) -> int:
        return int(np.searchsorted(self.arrival_s, self.clock.now(), side="right")) - self.next

    def get_board_data(self, n: int) -> np.ndarray:
        rows = np.arange(self.next, self.next + min(n, self.get_board_data_count()))
        self.next += rows.size
        data = np.zeros((4, rows.size))
        data[0], data[1], data[2] = self.sample[rows] % 256, self.sample[rows], self.arrival_s[rows]
        data[2] += np.where(data[2] >= self.wall_step_at_s, 2.0, 0.0)
        if self.nan_first_stamp and rows.size:
            data[2, 0] = np.nan
        return data

    def prepare_session(self) -> None:
        """Nothing to open."""

    def start_stream(self, *args: object) -> None:
        """Nothing to start."""

    def is_prepared(self) -> bool:
        return False


def stub_source(
    monkeypatch: pytest.MonkeyPatch, n: int, acquisition: str = ""
) -> tuple[BrainFlowSource, StubCallibri, ManualClock]:
    """A source on a StubCallibri in simulated time; ``acquisition``: more [acquisition] keys."""
    monkeypatch.setattr(brainflow_source, "wall_to_local_offset_s", lambda clock: 0.0)
    clock = ManualClock()
    source = BrainFlowSource(parse_config(SYNTHETIC_ONE_MUSCLE.replace(
        '[[muscles]]', '[acquisition.brainflow]\nboard = "CALLIBRI_EMG_BOARD"\n[[muscles]]'
    ).replace('[acquisition]\n', f'[acquisition]\n{acquisition}')), clock)
    source._board = board = StubCallibri(clock, n)
    return source, board, clock


def time_errors_s(blocks: list[Block]) -> list[float]:
    """Per block, its first sample's time less when the StubCallibri took it plus the 3 ms latency."""
    return [b.first_sample_time_s - b.first_sample_index / 1000.0 - 0.003 for b in blocks]


def read_until(source: BrainFlowSource, clock: ManualClock, until_s: float) -> list[Block]:
    """Read every 2 ms of simulated time up to ``until_s``."""
    blocks = []
    while clock.now() < until_s:
        clock.advance(0.002)
        blocks += [Block(b.first_sample_index, b.first_sample_time_s, b.emg_uv.copy(), b.lost_samples)
                   for b in source.read(clock.now())]
    return blocks


@pytest.mark.timeout(60)
def test_a_backlog_beyond_one_read_is_drained_without_false_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop held up 20 s (20000 rows waiting, more than the 16384 a read once took): every sample
    keeps its index (EMG value = index), no gap, no event, every time within 2 ms of when the sample
    was taken plus the 3 ms latency (the oldest 16384 rows were stamped as arrived at the read)."""
    source, _, clock = stub_source(monkeypatch, 30000)
    blocks = read_until(source, clock, 2.0)
    clock.advance(20.0)
    blocks += read_until(source, clock, 23.0)
    index, emg_uv = indices_and_values(blocks)

    assert index.size > 22000 and np.array_equal(index, emg_uv[:, 0])
    assert not any(b.lost_samples for b in blocks) and source.take_events() == []
    assert np.abs(time_errors_s(blocks)).max() < 0.002


@pytest.mark.timeout(60)
def test_a_nan_brainflow_stamp_after_a_restart_does_not_break_the_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restart (no counter reference) the gap is judged from arrival times; a NaN stamp is
    ignored for it (it raised ValueError, killing the acquisition): nothing lost, indices go on."""
    source, board, clock = stub_source(monkeypatch, 3000)
    blocks = read_until(source, clock, 1.0)
    source.restart(clock.now())
    clock.advance(0.3)
    board.nan_first_stamp = True
    blocks += read_until(source, clock, 2.0)
    index, emg_uv = indices_and_values(blocks)

    assert index.size > 1900 and np.array_equal(index, emg_uv[:, 0])
    assert not any(b.lost_samples for b in blocks)


def hiccup(board: StubCallibri, first: int, stall_s: float, catch_up_hz: float) -> None:
    """From sample ``first`` on, delivery stops for ``stall_s``, then the transport catches up at
    ``catch_up_hz`` (a Bluetooth link with some room to spare): nothing is lost, rows arrive late."""
    later = board.sample >= first
    resumed_s = first / 1000.0 + 0.003 + stall_s
    board.arrival_s[later] = np.maximum(board.arrival_s[later], resumed_s + (board.sample[later] - first) / catch_up_hz)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stall_s", [0.3, 0.45])
def test_a_backlog_caught_up_over_many_reads_is_no_loss(monkeypatch: pytest.MonkeyPatch, stall_s: float) -> None:
    """A 1 kHz board (counter period 256 samples) stalls 300 or 450 ms and catches up at 2 kHz over
    the next 150 reads: no gap, every sample at its own index (was: its rows came more than 7/8 of
    a counter period late, so 256 samples were taken for lost and every later sample moved 256 on).
    No event either (the sample clock took the draining backlog for a latency step and anchored
    again, there and back, by about 20 ms), and every time within 3 ms of when the sample was taken
    plus the 3 ms latency."""
    source, board, clock = stub_source(monkeypatch, 5000)
    hiccup(board, 1000, stall_s, 2000.0)
    blocks = read_until(source, clock, 4.0)
    index, emg_uv = indices_and_values(blocks)

    assert index.size > 3900 and np.array_equal(index, emg_uv[:, 0])
    assert not any(b.lost_samples for b in blocks) and source.take_events() == []
    assert np.abs(time_errors_s(blocks)).max() < 0.003


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lost", [256, 300, 512])
def test_a_dropout_of_whole_counter_periods_is_found_after_the_wait(monkeypatch: pytest.MonkeyPatch, lost: int) -> None:
    """The board loses 256, 300 or 512 samples (the counter shows 0, 44 or 0 of them), the rows
    after arrive on time: after HOLD_AT_MOST_S of holding them back, every sample at its own index
    and the whole loss before the first row after it."""
    source, board, clock = stub_source(monkeypatch, 5000)
    board.lose(1000, lost)
    blocks = read_until(source, clock, 4.0)
    index, emg_uv = indices_and_values(blocks)

    assert np.array_equal(index, emg_uv[:, 0])
    assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(1000 + lost, lost)]
    assert source.take_events() == []
    assert max(time_errors_s(blocks)) < 0.002  # the held rows keep their sample times


@pytest.mark.timeout(60)
def test_rows_held_back_are_handed_over_when_the_link_then_falls_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 lost, 144 rows on time, then nothing more arrives: the held rows are handed over after
    the wait all the same (they stayed held for good: no read with new rows came to release them)."""
    source, board, clock = stub_source(monkeypatch, 1400)
    board.lose(1000, 256)
    blocks = read_until(source, clock, 3.0)
    index, emg_uv = indices_and_values(blocks)

    assert np.array_equal(index, emg_uv[:, 0]) and index[-1] == 1399
    assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(1256, 256)]


@pytest.mark.timeout(60)
def test_a_wall_clock_step_while_rows_are_held_moves_no_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 lost, and BrainFlow's wall-clock stamps step +2 s while the rows after the loss are held
    back: the loss stays before sample 1256 (rows held across the step were re-timed from their
    stamps, came out 2 s early, bounded the rows before them, and the 256 went in at the step)."""
    source, board, clock = stub_source(monkeypatch, 3000)
    board.lose(1000, 256)
    board.wall_step_at_s = 1.40
    blocks = read_until(source, clock, 3.0)
    index, emg_uv = indices_and_values(blocks)

    assert np.array_equal(index, emg_uv[:, 0])
    assert [(b.first_sample_index, b.lost_samples) for b in blocks if b.lost_samples] == [(1256, 256)]


@pytest.mark.timeout(60)
def test_rows_are_never_held_until_the_loop_would_reopen_the_board(monkeypatch: pytest.MonkeyPatch) -> None:
    """With recover_after_ms = 400, 300 samples lost (no rows for 300 ms): the rows after the loss are
    handed over 50 ms before the loop would take the board for stalled and reopen it (a 250 ms wait
    ran past it: a needless reopening, seconds on a Bluetooth board, and the held rows lost)."""
    source, board, clock = stub_source(monkeypatch, 3000, "recover_after_ms = 400.0\n")
    board.lose(1000, 300)
    handed_s: list[float] = []
    while clock.now() < 2.0:
        clock.advance(0.002)
        handed_s += [clock.now()] * len(source.read(clock.now()))
    before, after = max(t for t in handed_s if t < 1.2), min(t for t in handed_s if t > 1.2)  # rows resume at 1.303 s
    assert after - before <= 0.4 - 0.05 + 0.002
