"""A real demo session recorded by LabRecorderCLI (`fesloop run --record`), read back with pyxdf.

Asserted on the recorded data: every fesloop stream with its metadata; per stream, the
sample count equals the ``pushed`` count in that process's final published status,
with nothing dropped; every strong pulse lines up with its artifact in the raw EMG;
`fesloop report` writes its figures and summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pyxdf

from fesloop.config import load_config
from fesloop.telemetry import STREAMS, stream_name

ALIGNMENT_TOLERANCE_S = 1e-3  # 2 samples at 2 kHz: the artifact starts at the first sample at/after the pulse (< 1)
STRONG_PULSE_MA = 20.0  # artifact >= 1200 uV: well above the EMG's sample-to-sample steps


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> dict:
    """One recorded 8 s demo session shared by the tests below (fresh ports, a unique session name)."""
    from tests.conftest import CONFIGS, Processes, config_with_fresh_ports

    tmp = tmp_path_factory.mktemp("recording")
    name = f"rec{os.getpid()}"
    config_path = tmp / "rec.toml"
    config_path.write_text(config_with_fresh_ports((CONFIGS / "demo.toml").read_text().replace('name = "demo"', f'name = "{name}"')))
    xdf = tmp / "session.xdf"
    processes = Processes(tmp)
    try:
        run = processes.start("run", str(config_path), "--duration", "8", "--record", str(xdf), name="run")
        code = run.wait(90)
    finally:
        processes.cleanup()
    log = processes.log("run")
    assert code == 0, log
    # Stamps as fesloop published them: every stream comes from this host's one clock, and the offsets
    # LabRecorder measures per stream are noise here (0.09 ms apart under load, seen moving pulses off
    # their artifacts); a recording across hosts needs them (fesloop report/replay apply them).
    streams, _ = pyxdf.load_xdf(str(xdf), dejitter_timestamps=False, synchronize_clocks=False)
    return {"config": load_config(config_path), "xdf": xdf, "log": log, "streams": {s["info"]["name"][0]: s for s in streams}}


def _fesloop_desc(stream: dict) -> dict:
    return {k: v[0] for k, v in stream["info"]["desc"][0]["fesloop"][0].items()}


@pytest.mark.timeout(120)
def test_every_stream_is_recorded_with_its_metadata(recording) -> None:
    config, streams = recording["config"], recording["streams"]
    for process, keys in STREAMS.items():
        for key in keys:
            stream = streams.get(stream_name(config.name, key))
            assert stream is not None, f"{key} not recorded; recorded: {sorted(streams)}"
            desc = _fesloop_desc(stream)
            assert desc["process"] == process and desc["stream"] == key
            assert json.loads(desc["config"])["name"] == config.name  # the resolved config travels with it
            channels = stream["info"]["desc"][0]["channels"][0]["channel"]
            assert len(channels) == int(stream["info"]["channel_count"][0])
            assert stream["info"]["source_id"][0].startswith(f"fesloop-{config.name}-")
    emg = streams[stream_name(config.name, "emg")]
    labels = [c["label"][0] for c in emg["info"]["desc"][0]["channels"][0]["channel"]]
    assert labels == [m.name for m in config.muscles]
    assert emg["info"]["desc"][0]["channels"][0]["channel"][0]["unit"][0] == "microvolts"
    placements = [c["placement"][0] or "" for c in emg["info"]["desc"][0]["channels"][0]["channel"]]  # pyxdf: "" -> None
    assert placements == [m.placement for m in config.muscles] and placements[0] == "vastus lateralis, left (SENIAM)"
    assert "calibration" in _fesloop_desc(streams[stream_name(config.name, "envelope")])
    markers = [m[0] for m in streams[stream_name(config.name, "stimulator-markers")]["time_series"]]
    assert markers[0] == "DISARMED -> ARMED: armed", "recording started after arming"


@pytest.mark.timeout(120)
def test_sample_counts_match_what_each_process_published(recording) -> None:
    config, streams = recording["config"], recording["streams"]
    for process, keys in STREAMS.items():
        final = json.loads(streams[stream_name(config.name, f"{process}-status")]["time_series"][-1][0])
        for key in keys:
            recorded = len(streams[stream_name(config.name, key)]["time_stamps"])
            assert final["lsl"][key] == {"pushed": recorded, "dropped": 0, "failed": 0}, (process, key)
    fs_hz = config.acquisition.simulated.sampling_rate_hz
    assert len(streams[stream_name(config.name, "emg")]["time_stamps"]) > 6 * fs_hz
    assert len(streams[stream_name(config.name, "pulses")]["time_stamps"]) > 30


@pytest.mark.timeout(120)
def test_counters_are_numeric_channels_equal_to_the_status_numbers(recording) -> None:
    config, streams = recording["config"], recording["streams"]
    for process in STREAMS:
        counters = streams[stream_name(config.name, f"{process}-counters")]
        names = [c["label"][0] for c in counters["info"]["desc"][0]["channels"][0]["channel"]]
        assert counters["info"]["type"][0] == "FesloopCounters" and counters["info"]["channel_format"][0] == "double64"
        status = streams[stream_name(config.name, f"{process}-status")]
        status_t = np.asarray(status["time_stamps"])
        checked = 0
        for t, row in zip(counters["time_stamps"], counters["time_series"]):
            nearest = int(np.argmin(np.abs(status_t - t)))  # the same stamp
            if abs(status_t[nearest] - t) > 1e-3:
                continue  # the recorder joined the two streams at slightly different moments
            fields = json.loads(status["time_series"][nearest][0])
            assert list(row) == [float(fields[name]) for name in names], (process, t)
            checked += 1
        assert checked >= 10, process
    assert {"commands_received", "pulses_delivered", "rejected"} <= set(
        c["label"][0] for c in streams[stream_name(config.name, "stimulator-counters")]["info"]["desc"][0]["channels"][0]["channel"]
    )


@pytest.mark.timeout(120)
def test_pulses_line_up_with_their_artifacts_in_the_raw_emg(recording) -> None:
    config, streams = recording["config"], recording["streams"]
    emg = streams[stream_name(config.name, "emg")]
    pulses = streams[stream_name(config.name, "pulses")]
    emg_times, emg_uv = emg["time_stamps"], np.asarray(emg["time_series"])
    fs_hz = config.acquisition.simulated.sampling_rate_hz
    emg_channel = {s.device_channel: config.muscles[config.muscle_index(s.muscle)].emg_channel for s in config.stimulation}
    offsets = []
    for t, (device_channel, amplitude_ma, _width) in zip(pulses["time_stamps"], pulses["time_series"]):
        if amplitude_ma < STRONG_PULSE_MA or not emg_times[0] + 0.01 < t < emg_times[-1] - 0.01:
            continue
        window = np.flatnonzero(np.abs(emg_times - t) < 0.004)  # ends before the M-wave (6 ms)
        x_uv = emg_uv[window, emg_channel[int(device_channel)]]
        before = emg_times[window] < t - 0.001
        # The artifact peaks on its first sample ((1 - x) exp(-x)); its largest step can be the fall after it.
        peak = np.argmax(np.where(before, 0.0, np.abs(x_uv - np.median(x_uv[before]))))
        offsets.append(emg_times[window[peak]] - t)
    offsets = np.array(offsets)
    assert len(offsets) >= 20, "too few strong pulses in the recording"
    assert np.abs(offsets).max() <= ALIGNMENT_TOLERANCE_S, offsets
    assert np.all(offsets >= -0.5 / fs_hz)  # never before the pulse


@pytest.mark.timeout(120)
def test_report_writes_figures_and_summary(recording, tmp_path) -> None:
    from fesloop.report import write_report

    config = recording["config"]
    written = write_report(recording["xdf"], tmp_path / "report")
    names = {p.name for p in written}
    assert {f"muscle_{i}_{m.name}.png" for i, m in enumerate(config.muscles)} <= names
    assert {f"channel_{i}_{s.name}.png" for i, s in enumerate(config.stimulation)} <= names
    assert {"latency.png", "summary.md"} <= names
    assert all(p.stat().st_size > 10_000 for p in written if p.suffix == ".png")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "p50" in summary and "| emg | EMG |" in summary
    assert "samples dropped on the way to LSL (full queue): 0" in summary
    assert "items liblsl refused (not in the recording): 0" in summary


@pytest.mark.timeout(120)
def test_fesloop_record_alongside_a_running_session_records_every_stream(write_config, processes, tmp_path) -> None:
    name = f"side{os.getpid()}"
    path = write_config("demo.toml", {'name = "demo"': f'name = "{name}"'})
    xdf = tmp_path / "alongside.xdf"
    processes.start_loop(path)
    record = processes.start("record", str(xdf), str(path), "--duration", "3", name="record")
    assert record.wait(90) == 0, processes.log("record")
    streams = {s["info"]["name"][0]: s for s in pyxdf.load_xdf(str(xdf), dejitter_timestamps=False)[0]}
    for keys in STREAMS.values():
        for key in keys:
            assert stream_name(name, key) in streams, (key, sorted(streams))
    emg = streams[stream_name(name, "emg")]
    assert len(emg["time_stamps"]) > 2 * 2000.0  # about 3 s at 2 kHz


@pytest.mark.timeout(120)
def test_replay_of_the_xdf_equals_replay_of_its_samples_and_pulses(recording, tmp_path) -> None:
    """`fesloop replay --emg FILE.xdf` takes the rate, samples, sample clock and delivered pulses from
    the file: the same output as replaying what pyxdf reads from it independently."""
    from fesloop.replay_cli import replay
    from fesloop.xdf_input import sample_indices, sample_times

    config, xdf = recording["config"], recording["xdf"]
    config_path = xdf.parent / "rec.toml"
    raw = {s["info"]["name"][0]: s for s in pyxdf.load_xdf(str(xdf), dejitter_timestamps=False)[0]}
    emg = raw[stream_name(config.name, "emg")]
    pulses = raw[stream_name(config.name, "pulses")]
    fs_hz, times = float(emg["info"]["nominal_srate"][0]), emg["time_stamps"]
    index = sample_indices(times, fs_hz)
    rows = np.asarray(pulses["time_series"], dtype=np.float64)
    replay(
        config, np.asarray(emg["time_series"], dtype=np.float32), fs_hz,
        (pulses["time_stamps"] - times[0], rows[:, 0].astype(np.int64), rows[:, 1].astype(np.float32),
         rows[:, 2].astype(np.float32)),
        tmp_path / "pyxdf", index, sample_times(times, index, fs_hz),
    )
    result = subprocess.run([sys.executable, "-m", "fesloop", "replay", str(config_path), "--emg", str(xdf),
                             "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("activation.csv", "events.csv", "mwave.csv"):
        assert (tmp_path / "cli" / name).read_text() == (tmp_path / "pyxdf" / name).read_text(), name
    assert (tmp_path / "cli" / "activation.csv").read_text().count("\n") > 8 * config.controller.control_rate_hz * 0.5
    refused = subprocess.run(
        [sys.executable, "-m", "fesloop", "replay", str(config_path), "--emg", str(xdf), "--stream", "nope",
         "--out", str(tmp_path / "refused")], capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0 and "no stream named 'nope'" in refused.stderr and "(EMG)" in refused.stderr
    wrong_rate = subprocess.run(
        [sys.executable, "-m", "fesloop", "replay", str(config_path), "--emg", str(xdf), "--fs", "1000",
         "--out", str(tmp_path / "wrong_rate")], capture_output=True, text=True, timeout=60,
    )
    assert wrong_rate.returncode != 0 and "--fs 1000 disagrees with the recording's 2000 Hz" in wrong_rate.stderr
    assert not (tmp_path / "wrong_rate").exists()


@pytest.mark.timeout(120)
def test_convert_of_the_xdf_writes_its_emg_samples_to_a_playback_file(recording, tmp_path) -> None:
    from brainflow.board_shim import BoardIds, BoardShim

    config, xdf = recording["config"], recording["xdf"]
    out = tmp_path / "session.csv"
    result = subprocess.run(
        [sys.executable, "-m", "fesloop", "convert", str(xdf), str(out), "--board", "ANT_NEURO_EE_410_BOARD"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    emg = {s["info"]["name"][0]: s for s in pyxdf.load_xdf(str(xdf), dejitter_timestamps=False)[0]}[
        stream_name(config.name, "emg")
    ]
    samples = np.asarray(emg["time_series"], dtype=np.float64)
    descr = BoardShim.get_board_descr(BoardIds.ANT_NEURO_EE_410_BOARD.value)
    table = np.loadtxt(out, delimiter="\t", ndmin=2)
    written = table[:, descr["emg_channels"][: samples.shape[1]]]
    np.testing.assert_allclose(written, samples, rtol=1e-9, atol=1e-6)  # %.10g of the float32 uV values
    counter = table[:, descr["package_num_channel"]]
    assert np.array_equal(counter, np.arange(len(samples)) % 256)  # the recording lost nothing


def _labrecorder_writing(xdf: str) -> int | None:
    """The pid of the LabRecorderCLI writing ``xdf`` (Linux /proc)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith(b"LabRecorderCLI") and xdf.encode() in cmdline:
                return int(entry)
    return None


@pytest.mark.timeout(120)
def test_a_session_stops_when_its_recorder_dies(write_config, processes, tmp_path) -> None:
    """LabRecorderCLI killed mid-session (crash, OOM, disk full): the stimulation went on unrecorded and
    the failure showed only at the end. Now the session stops at once, stimulator first, exit code 1."""
    import signal
    import time

    from tests.conftest import wait_until

    path = write_config("demo.toml", {'name = "demo"': f'name = "dies{os.getpid()}"'})
    xdf = tmp_path / "session.xdf"
    run = processes.start("run", str(path), "--duration", "60", "--record", str(xdf), name="run")
    wait_until(lambda: "running (Ctrl+C" in processes.log("run"), 60, what="the recorded session running")
    recorder_pid = _labrecorder_writing(str(xdf))
    assert recorder_pid is not None
    os.kill(recorder_pid, signal.SIGKILL)
    killed_s = time.monotonic()
    code = run.wait(30)
    log = processes.log("run")
    assert code == 1, log
    assert time.monotonic() - killed_s < 15.0  # not at the end of the 60 s session
    assert "the recording stopped (LabRecorderCLI exited with code -9): stopping" in log
    assert "recording: LabRecorderCLI exited with code -9" in log
    summary = log[log.index("# Session summary"):]
    assert "Faults: none" in summary  # stopped in order: disarmed first, not a fault


@pytest.mark.timeout(60)
def test_a_recording_selector_never_matches_fesloops_own_streams() -> None:
    """`[recording] streams = [{type = "EMG"}]` (a second amplifier) was satisfied by fesloop's own EMG
    stream: the wait passed with the amplifier absent and the EMG stream was recorded twice."""
    import pylsl

    from fesloop.lsl import make_outlet
    from fesloop.record import RecordingError, Selector, wait_for_streams

    tag = f"sel{os.getpid()}"
    stream_type = f"EMG{tag}"  # a type no other test's stream has
    own = make_outlet(f"{tag}-emg", stream_type, ["a"], 100.0, f"fesloop-{tag}-emg")
    wanted = [Selector(type=stream_type)]
    with pytest.raises(RecordingError, match="not visible"):
        wait_for_streams(wanted, 1.5)
    amplifier = make_outlet(f"{tag}-amp", stream_type, ["a"], 100.0, f"amp-{tag}")
    wait_for_streams(wanted, 10.0)
    found = pylsl.resolve_bypred(wanted[0].query(), minimum=1, timeout=5)  # what LabRecorderCLI would record
    assert [info.source_id() for info in found] == [f"amp-{tag}"]
    del own, amplifier
