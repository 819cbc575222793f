"""The acquisition process on BrainFlow's playback board: gaps, stall, recovery, LSL out.

Real processes, real BrainFlow, real ZeroMQ and LSL on loopback; assertions from
what the process publishes (emg, status, the LSL stream) and, for the stated
recovery policy, its log.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pylsl
import pytest

from fesloop.config import Config, load_config
from fesloop.lsl import configure_machine_scope
from tests.acquisition.conftest import SHIPPED_PLAYBACK, Tap, emg_series, playback_config_text, ramp_playback
from tests.conftest import config_with_fresh_ports, wait_until

pytestmark = pytest.mark.timeout(90)


def start(processes, tmp_path: Path, text: str) -> tuple:
    path = tmp_path / "acq.toml"
    path.write_text(config_with_fresh_ports(text))
    config = load_config(path)
    tap = Tap(config.endpoints.emg, [b"emg", b"status"])
    processes.start("acquisition", str(path), name="acquisition")
    return config, tap


def test_injected_gaps_reach_the_emg_topic_and_status_exactly(processes, tmp_path: Path) -> None:
    playback = tmp_path / "gaps.tsv"
    deleted = [(600, 601), (900, 913), (1200, 1454)]  # 1, 13, 254 samples (the last across a wrap)
    n_lines = len(ramp_playback(playback, 1800, delete=deleted, duplicate=[1500]))
    config, tap = start(processes, tmp_path, playback_config_text(playback, loop=False))
    try:
        wait_until(lambda: any(s.get("samples_sent", 0) >= n_lines - 1 for s in tap.statuses()), 20,
                   what="the whole file published")
        status = wait_until(lambda: [s for s in tap.statuses() if s["samples_sent"] == n_lines - 1], 5,
                            what="status after the last sample")[-1]
        index, emg_uv = emg_series(tap.get(b"emg"))
    finally:
        tap.close()

    assert status["lost_samples"] == 268 and status["gaps"] == 3 and status["duplicate_samples"] == 1
    assert [(g["first_missing_index"], g["size_samples"]) for g in status["recent_gaps"]] == [
        (start_, stop - start_) for start_, stop in deleted
    ]
    assert np.array_equal(emg_uv[:, 0], index.astype(np.float32))  # every value at its own index: never filled
    jumps = np.flatnonzero(np.diff(index) != 1)
    assert [(int(index[j] + 1), int(index[j + 1] - index[j] - 1)) for j in jumps] == [
        (start_, stop - start_) for start_, stop in deleted
    ]
    assert index[-1] == 1799


def test_non_finite_samples_reach_the_emg_topic_as_gaps_and_status_counts_them(processes, tmp_path: Path) -> None:
    """NaN at sample 900 and inf at 1200 of a playback file: every other sample reaches the emg
    topic (each chunk decodes; a non-finite one would be dropped whole by every subscriber), the
    two are gaps of one sample, and status counts them as lost and as non-finite."""
    playback = tmp_path / "nan.tsv"
    ramp_playback(playback, 1500)
    table = np.loadtxt(playback)
    table[[900, 1200], 1] = [np.nan, np.inf]
    np.savetxt(playback, table, fmt=["%.0f", "%.10g", "%.6f", "%.0f"], delimiter="\t")
    config, tap = start(processes, tmp_path, playback_config_text(playback, loop=False))
    try:
        status = wait_until(lambda: [s for s in tap.statuses() if s.get("samples_sent", 0) == 1498], 20,
                            what="every finite sample published")[-1]
        index, emg_uv = emg_series(tap.get(b"emg"))
    finally:
        tap.close()
    assert index[0] < 900, "subscribed after the first non-finite sample: nothing to check"
    assert np.array_equal(index, np.setdiff1d(np.arange(index[0], 1500), [900, 1200]))
    assert np.array_equal(emg_uv[:, 0], index.astype(np.float32))
    assert status["non_finite_samples"] == 2 and status["lost_samples"] == 2 and status["gaps"] == 2


def test_stalled_playback_faults_at_once_then_recovers_by_reopening(processes, tmp_path: Path) -> None:
    """The file ends (loop off): FAULT "EMG stale" within stale_ms + a tick, then the session is
    released and prepared again after recover_after_ms, and samples flow on with the gap counted."""
    playback = tmp_path / "short.tsv"
    ramp_playback(playback, 400)
    text = playback_config_text(
        playback, loop=False, acquisition="stale_ms = 100.0\nrecover_after_ms = 400.0\nrecover_backoff_max_s = 2.0"
    )
    config, tap = start(processes, tmp_path, text)
    try:
        def fault() -> dict | None:
            return next((s for s in tap.statuses() if s["state"] == "FAULT"), None)

        wait_until(fault, 15, what="FAULT after the file ended")
        stall = tap.get(b"status")
        fault_message = next(m for m in stall if m.body.fields["state"] == "FAULT")
        before = [m for m in tap.get(b"emg") if m.body.arrival_time_s < fault_message.header.send_time_s]
        last_chunk_s = before[-1].body.arrival_time_s
        wait_until(lambda: any(s["state"] == "RUNNING" and s["recovery_attempts"] >= 1
                               and s["samples_sent"] > 400 for s in tap.statuses()), 15, what="recovery")
        wait_until(lambda: any(s["samples_sent"] >= 800 for s in tap.statuses()), 10, what="second pass")
        statuses = tap.statuses()
        index, emg_uv = emg_series(tap.get(b"emg"))
    finally:
        tap.close()

    detect_ms = (fault_message.header.send_time_s - last_chunk_s) * 1e3
    print(f"stall detected {detect_ms:.1f} ms after the last chunk")
    assert fault_message.body.fields["fault_reason"] == "EMG stale"
    assert 100.0 < detect_ms <= 100.0 + 2 * config.acquisition.chunk_ms + 15.0, detect_ms
    recovered = next(s for s in statuses if s["state"] == "RUNNING" and s["recovery_attempts"] >= 1)
    assert recovered["recovery_attempts"] == 1
    # The second pass starts from the file's beginning; its index jumps by the time the stall lasted.
    restart_gap = recovered["recent_gaps"][-1]
    assert restart_gap["first_missing_index"] == 400
    assert 400 <= restart_gap["size_samples"] <= 1400  # ~ recover_after_ms + reopen time, in samples at 1 kHz
    second = index >= 400 + restart_gap["size_samples"]
    assert np.array_equal(emg_uv[second, 0], (index[second] - index[second][0]).astype(np.float32))
    log = processes.log("acquisition")
    assert "EMG stale: no samples for" in log
    assert "reopening the source (attempt 1; next in 0.8 s if still stale)" in log
    assert "EMG flowing again after" in log


def test_a_reopening_that_blocks_does_not_block_the_loop(processes, tmp_path: Path) -> None:
    """After the file ends, its path becomes a FIFO with no writer: BrainFlow's prepare_session
    blocks in open() like a device that is not back. Meanwhile the process still answers control
    requests and publishes its FAULT status at 5 Hz; once a writer feeds the FIFO, samples flow."""
    import zmq

    from fesloop.sockets import ControlClient

    playback = tmp_path / "short.tsv"
    ramp_playback(playback, 300)
    content = playback.read_text()
    text = playback_config_text(
        playback, loop=False, acquisition="stale_ms = 100.0\nrecover_after_ms = 300.0\nrecover_backoff_max_s = 2.0"
    )
    config, tap = start(processes, tmp_path, text)
    ctx = zmq.Context()
    control = ControlClient(ctx, config.endpoints.acquisition_control)
    try:
        wait_until(lambda: any(s["samples_sent"] >= 300 for s in tap.statuses()), 15, what="the file played")
        playback.unlink()
        os.mkfifo(playback)
        wait_until(lambda: any(s.get("reopening") for s in tap.statuses()), 10, what="a reopening under way")
        blocked_from_s = time.monotonic()
        replies_ms = []
        while time.monotonic() - blocked_from_s < 2.0:
            t0 = time.monotonic()
            reply = control.request("status", timeout_s=1.0)
            replies_ms.append((time.monotonic() - t0) * 1e3)
            assert reply["reopening"] and reply["state"] == "FAULT"
            time.sleep(0.1)
        during = [m for m in tap.get(b"status") if m.body.fields.get("reopening")]
        with open(playback, "w") as fifo:  # the device is back: prepare_session's open() returns
            playback.unlink()
            playback.write_text(content)  # what start_stream opens next
            fifo.write(content)  # prepare_session reads to the end first
        wait_until(lambda: any(s["state"] == "RUNNING" and s["samples_sent"] >= 600 for s in tap.statuses()), 15,
                   what="samples after the blocked reopening")
    finally:
        control.close()
        ctx.destroy(linger=0)
        tap.close()

    print(f"control replies while reopening: max {max(replies_ms):.1f} ms over {len(replies_ms)} requests")
    assert len(replies_ms) >= 10  # answered all along, each within its 1 s timeout
    send_s = [m.header.send_time_s for m in during]
    assert send_s[-1] - send_s[0] >= 1.8 and np.max(np.diff(send_s)) < 0.5  # 5 Hz status kept flowing
    assert all(m.body.fields["state"] == "FAULT" for m in during)
    log = processes.log("acquisition")
    assert log.count("reopening the source (attempt") == 1  # no second attempt while the first one blocks
    assert "source reopened: waiting for samples" in log


def test_lsl_outlet_describes_the_stream(processes, tmp_path: Path) -> None:
    playback = tmp_path / "meta.tsv"
    ramp_playback(playback, 3000)
    config, tap = start(processes, tmp_path, playback_config_text(playback, loop=True))
    configure_machine_scope()
    source_id = "fesloop-playbacktest-emg-brainflow-PLAYBACK_FILE_BOARD-meta.tsv"
    try:
        streams = pylsl.resolve_bypred(f"source_id='{source_id}'", minimum=1, timeout=15)
        assert streams, "no LSL stream with the stable source_id"
        inlet = pylsl.StreamInlet(streams[0], max_buflen=2)
        info = inlet.info(timeout=5)
        samples, stamps = inlet.pull_chunk(timeout=1.5, max_samples=500)
        pulled_s = pylsl.local_clock()
    finally:
        tap.close()
    channel = info.desc().child("channels").child("channel")
    assert (info.type(), info.channel_count(), info.nominal_srate()) == ("EMG", 1, 1000.0)
    assert info.channel_format() == pylsl.cf_float32
    assert channel.child_value("label") == "forearm"
    assert channel.child_value("unit") == "microvolts"
    assert channel.child_value("muscle") == "forearm"
    assert channel.child_value("type") == "EMG"
    values = np.asarray(samples)[:, 0]
    assert len(values) > 100 and np.all(np.diff(values) == 1.0)  # consecutive ramp samples (no loss here)
    # Samples are stamped by the sample clock (a line through the read times, on the shared
    # clock) at the nominal rate; the line is the mean read time, so the newest stamp may sit a
    # little after the moment it was pulled: allow 5 ms.
    assert np.median(np.diff(stamps)) == pytest.approx(1e-3, rel=0.01)
    assert -0.005 < pulled_s - stamps[-1] < 1.0


def open_markers_inlet(config: Config, tap: Tap) -> tuple[pylsl.StreamInlet, int]:
    """A real LSL inlet on the acquisition's markers (what the XDF recorder subscribes to), and
    how many samples had been sent when it was open (markers before that are not in it)."""
    configure_machine_scope()
    streams = pylsl.resolve_bypred(f"name='{config.name}-acquisition-markers'", minimum=1, timeout=15)
    assert streams, "no acquisition markers stream"
    inlet = pylsl.StreamInlet(streams[0])
    inlet.open_stream(timeout=5)
    return inlet, max((s["samples_sent"] for s in tap.statuses()), default=0)


def pull_markers(inlet: pylsl.StreamInlet, n: int, timeout_s: float = 2.0) -> tuple[list[str], list[float]]:
    """Up to ``n`` markers and their stamps, waiting at most ``timeout_s``."""
    markers, stamps = [], []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and len(markers) < n:
        samples, times = inlet.pull_chunk(timeout=0.2)
        markers += [m[0] for m in samples]
        stamps += times
    return markers, stamps


def test_gaps_and_stalls_are_marked_on_the_acquisition_markers_stream(processes, tmp_path: Path) -> None:
    """Fault matrix row 6: what a recording holds of a lost-sample gap and of a stall. A real
    LSL inlet on the acquisition's markers (what the XDF recorder subscribes to) gets a marker
    per gap with its size, one when the EMG goes stale and one when it flows again (after the
    reopened file's first samples, whose index jump over the stall is a gap too)."""
    playback = tmp_path / "marked.tsv"
    ramp_playback(playback, 6000, delete=[(4000, 4013)])  # the inlet is open by then
    text = playback_config_text(playback, loop=False, acquisition="stale_ms = 100.0\nrecover_after_ms = 400.0")
    config, tap = start(processes, tmp_path, text)
    try:
        inlet, opened_samples = open_markers_inlet(config, tap)
        wait_until(lambda: any(s["state"] == "RUNNING" and s["recovery_attempts"] >= 1 for s in tap.statuses()), 20,
                   what="the stall and the recovery")
        markers, stamps = pull_markers(inlet, 4)
        statuses = tap.statuses()
    finally:
        tap.close()
    assert opened_samples < 4000, "the inlet opened after the gap: nothing to check"
    gaps = {g["first_missing_index"]: g for s in statuses for g in s["recent_gaps"]}
    restart = gaps[6000]  # after the last sample (index 5999), the reopened file starts later on
    assert markers == [
        "gap 13 samples", "fault EMG stale", f"gap {restart['size_samples']} samples", "recovered EMG flowing"
    ]
    assert stamps[0] == pytest.approx(gaps[4000]["resumed_at_s"], abs=1e-5)  # at the first sample after it
    assert stamps[2] == pytest.approx(restart["resumed_at_s"], abs=1e-5)
    assert stamps[0] < stamps[1] < stamps[2] <= stamps[3]


def test_a_counter_jump_the_time_does_not_show_is_marked_and_the_clock_anchored_again(
    processes, tmp_path: Path
) -> None:
    """The counter skips 120 samples but the board delivers on without a pause (a counter the
    time contradicts): the gap is counted, and the sample clock, 120 ms ahead of the reads, is
    anchored again at once: a marker on the acquisition's markers stream, an event in status."""
    playback = tmp_path / "jump.tsv"
    ramp_playback(playback, 6000, delete=[(4000, 4120)])
    table = np.loadtxt(playback)
    table[:, 2] = 1.0 + np.arange(len(table)) / 1000.0  # delivered without a pause
    np.savetxt(playback, table, fmt=["%.0f", "%.10g", "%.6f", "%.0f"], delimiter="\t")
    config, tap = start(processes, tmp_path, playback_config_text(playback, loop=False))
    try:
        inlet, opened_samples = open_markers_inlet(config, tap)
        wait_until(lambda: any(s["samples_sent"] >= 5000 for s in tap.statuses()), 20, what="the jump played")
        markers, _ = pull_markers(inlet, 2)
        status = wait_until(lambda: [s for s in tap.statuses() if s["samples_sent"] >= 5000], 5, what="status")[-1]
    finally:
        tap.close()
    assert opened_samples < 4000, "the inlet opened after the jump: nothing to check"
    anchored = [m for m in markers if m.startswith("sample clock anchored again: EMG times jump -")]
    assert sorted(markers) == sorted(["gap 120 samples", *anchored]) and len(anchored) == 1
    assert float(anchored[0].split("jump ")[1].split(" ms")[0]) == pytest.approx(-120.0, abs=10.0)
    assert status["source_events"] == 1 and status["recent_events"][0]["what"] == anchored[0]
    assert status["lost_samples"] == 120


def test_playback_config_runs_the_whole_loop(write_config, tmp_path: Path) -> None:
    """configs/playback.toml: the three processes on the shipped recording, stopped cleanly; its
    relative file is taken from the config's folder, wherever the command starts."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    shutil.copy(SHIPPED_PLAYBACK, tmp_path / "data")
    path = write_config("playback.toml", {"../acquisition/data/": "data/"})
    (tmp_path / "elsewhere").mkdir()
    run = subprocess.run([sys.executable, "-m", "fesloop", "run", str(path), "--duration", "4"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path / "elsewhere")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "running: brainflow-PLAYBACK_FILE_BOARD-biosppy_emg_1_callibri.tsv, 1 channels at 1000 Hz" in run.stderr
    assert "fesloop: stopped cleanly" in run.stdout + run.stderr
