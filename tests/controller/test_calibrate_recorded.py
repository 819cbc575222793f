"""Calibration on real EMG (tests/data): the levels leave out what the controller's contamination
detector flags; `fesloop calibrate` (the real CLI, a subprocess) refuses a lead-off rest, checks
where it will write before any trial, never loses a measured calibration to a failed write and
keeps the file it replaces.

BioSPPy emg_1.txt (1 kHz): rest from 3 to 13 s, a strong contraction from 15.4 s. The CLI is fed
by a stand-in acquisition (tests/streams.EmgFeed) publishing the recording faster than real time;
its phases run on the EMG's own sample clock, so the schedule below puts rest at 3-12 s and the
MVC trial at 15-18 s of the recording.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from controller.calibration import (
    MVC_MIN_ABOVE_REST_UV,
    REST_MIN_UV,
    REST_SD_MIN_UV,
    Calibration,
    CalibrationError,
    LevelError,
    MuscleCalibration,
    muscle_calibration,
)
from controller.estimator import EmgEstimator
from fesloop.calibrate_cli import write_atomically
from fesloop.config import load_config
from fesloop.protocol import EmgChunk
from tests.controller.test_recordings import biosppy, replay_config, verma
from tests.controller.test_recordings import calibrate as calibrate_from_recording
from tests.conftest import completed, fesloop_cli
from tests.streams import EmgFeed

FS_HZ = 1000.0
CHUNK = 20  # samples: BITalino's packet
SCHEDULE = ["--rest-s", "9", "--trials", "1", "--trial-s", "3", "--pause-s", "3"]
REST_S, MVC_S = (3.0, 12.0), (15.0, 18.0)
DC_UV = 2048 * 0.8  # BITalino's mid-code in uV: what a lifted electrode reads, flat


def envelope_and_flags(emg_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times_s, envelope_uv, flagged) of a 1-channel recording through the estimator, replay.toml."""
    estimator = EmgEstimator(replay_config(), FS_HZ, 1)
    envelope, flagged = [], []
    for start in range(0, len(emg_uv), CHUNK):
        data = emg_uv[start : start + CHUNK, np.newaxis].astype(np.float32)
        estimator.process(EmgChunk(start, start / FS_HZ, 0.0, FS_HZ, data))
        envelope.append(estimator.envelope_uv[:, 0].copy())
        flagged.append(estimator.contamination_flags[:, 0].copy())
    return (np.arange(len(emg_uv)) - estimator.delay) / FS_HZ, np.concatenate(envelope), np.concatenate(flagged)


def between(times_s: np.ndarray, span_s: tuple[float, float]) -> np.ndarray:
    return (times_s >= span_s[0]) & (times_s < span_s[1])


def window_max_uv(envelope_uv: np.ndarray) -> float:
    """The highest mean over 0.5 s (500 samples at 1 kHz): the MVC level, computed with numpy alone."""
    return float(np.convolve(envelope_uv, np.ones(500) / 500, "valid").max())


@pytest.mark.timeout(60)
def test_a_lead_off_inside_rest_is_left_out_of_the_rest_level() -> None:
    """3 s of rest (6-9 s) become a lead-off flat line. The detector flags it (after flat_ms = 100 ms,
    plus the 500 ms hold-off: 3.4 s); the rest level over the samples left is the untouched
    recording's, within 5 % (measured 3.29 vs 3.36 uV). Counting the flat line made it 2.33 uV,
    SD 1.55 uV (0.57 untouched): the real resting envelope then read as activation."""
    emg = biosppy("emg_1.txt")[:20000]
    times_s, untouched, _ = envelope_and_flags(emg)
    lead_off = emg.copy()
    lead_off[6000:9000] = DC_UV
    _, envelope, flagged = envelope_and_flags(lead_off)
    rest, mvc = between(times_s, REST_S), between(times_s, MVC_S)
    cfg = replay_config().controller.contamination
    assert flagged[rest].sum() == 3000 - cfg.flat_ms + cfg.holdoff_ms  # samples at 1 kHz
    calibration = muscle_calibration("muscle", envelope[rest], [envelope[mvc]], FS_HZ, flagged[rest], [flagged[mvc]], emg_channel=0)
    assert calibration.rest_uv == pytest.approx(untouched[rest].mean(), rel=0.05)
    assert calibration.rest_sd_uv == pytest.approx(untouched[rest].std(), rel=0.15)
    assert calibration.mvc_uv == pytest.approx(window_max_uv(untouched[mvc]))


@pytest.mark.timeout(60)
def test_an_mvc_trial_mostly_flagged_is_refused_naming_muscle_and_phase() -> None:
    """The electrode lifts 0.5 s into the MVC trial: 2.5 of its 3 s are a flat line, refused."""
    emg = biosppy("emg_1.txt")[:20000].copy()
    emg[15500:18000] = DC_UV
    times_s, envelope, flagged = envelope_and_flags(emg)
    rest, mvc = between(times_s, REST_S), between(times_s, MVC_S)
    with pytest.raises(CalibrationError, match=r"^muscle: \d+% of its MVC 1/1 phase is contaminated"):
        muscle_calibration("muscle", envelope[rest], [envelope[mvc]], FS_HZ, flagged[rest], [flagged[mvc]], emg_channel=0)


@pytest.fixture
def recorded_config(write_config) -> Path:
    """configs/replay.toml with a fresh EMG endpoint and no LSL."""
    return write_config(
        "replay.toml",
        {'name = "replay"\n': 'name = "replay"\n\n[acquisition]\nlsl = false\n\n[endpoints]\nemg = "tcp://127.0.0.1:5601"\n'},
    )


def calibrate(
    config_path: Path, out: Path, emg_uv: np.ndarray, during: Callable[[], None] = lambda: None
) -> subprocess.CompletedProcess:
    """`fesloop calibrate` on ``emg_uv`` (1 kHz, 1-D), published once it subscribed. ``during`` runs
    once the protocol has started (``EMG: ...`` printed), before the recording's second second is sent."""
    feed = EmgFeed(load_config(config_path).endpoints.emg, FS_HZ, CHUNK)
    try:
        with fesloop_cli("calibrate", str(config_path), "--out", str(out), *SCHEDULE) as process:
            feed.wait_for_subscriber(20.0)
            feed.send(emg_uv[: int(FS_HZ), np.newaxis])
            head = lines_until(process.stdout, "EMG:")
            during()
            feed.send(emg_uv[int(FS_HZ) :, np.newaxis])
            result = completed(process, 40)
    finally:
        feed.close()
    return subprocess.CompletedProcess(result.args, result.returncode, head + result.stdout, result.stderr)


def lines_until(stream: IO[str], prefix: str) -> str:
    """Lines read from ``stream`` up to and including the first that starts with ``prefix``."""
    lines: list[str] = []
    while not (lines and lines[-1].startswith(prefix)):
        line = stream.readline()
        assert line, f"the output ended before a line starting {prefix!r}: {''.join(lines)!r}"
        lines.append(line)
    return "".join(lines)


@pytest.mark.timeout(90)
def test_calibrate_refuses_a_lead_off_rest_and_writes_nothing(recorded_config: Path, tmp_path: Path) -> None:
    """The review's case: the electrode is off during rest (a flat line at the ADC's mid-code), then
    the MVC trial is the real contraction. It used to be written with rest 7e-13 uV, so the
    patient's real resting envelope (~4 uV) read as activation 1.0."""
    emg = biosppy("emg_1.txt")[:20000].copy()
    emg[: int(13.5 * FS_HZ)] = DC_UV
    out = tmp_path / "calibration.json"
    result = calibrate(recorded_config, out, emg)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused, nothing written: muscle: 100% of its rest phase is contaminated" in result.stderr
    assert not out.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("emg_uv", "fs_hz", "rest_s", "mvc_s"),
    [(biosppy("emg_1.txt"), 1000.0, REST_S, MVC_S), (verma("OFF"), 4000.0, (2.0, 24.0), (26.5, 30.5))],
    ids=["biosppy_emg_1", "verma_off"],
)
def test_with_detection_off_the_floors_refuse_a_lead_off_rest_and_pass_real_emg(
    emg_uv: np.ndarray, fs_hz: float, rest_s: tuple, mvc_s: tuple
) -> None:
    """Contamination detection is off (as in configs/demo.toml): only the floors stand between a
    lead-off rest and full stimulation at rest. The recording's real rest and MVC clear every floor
    at least twice over; with the rest replaced by a flat line at the recording's DC level, refused."""
    config = replay_config(contamination={"flat_uv": 0.0})
    real = calibrate_from_recording(config, emg_uv, fs_hz, rest_s, mvc_s).muscles[0]
    assert real.rest_uv > 2 * REST_MIN_UV and real.rest_sd_uv > 2 * REST_SD_MIN_UV, real
    assert real.mvc_uv - real.rest_uv > 2 * MVC_MIN_ABOVE_REST_UV, real
    lead_off = emg_uv.copy()
    lead_off[: int(rest_s[1] * fs_hz)] = np.median(emg_uv)
    with pytest.raises(LevelError, match=r"^muscle: rest_uv = .*: must be at least 0\.5 uV"):
        calibrate_from_recording(config, lead_off, fs_hz, rest_s, mvc_s)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("where", "problem"), [("no_such_folder/calibration.json", "no such folder"), (".", "is a folder")])
def test_an_out_that_cannot_be_written_is_refused_before_any_trial(
    recorded_config: Path, tmp_path: Path, where: str, problem: str
) -> None:
    """The whole protocol used to run (the patient did every trial), print done, then end in a
    FileNotFoundError traceback. Now it stops before it listens for EMG."""
    out = tmp_path / where
    with fesloop_cli("calibrate", str(recorded_config), "--out", str(out), *SCHEDULE, "--timeout-s", "5") as process:
        result = completed(process, 30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"fesloop calibrate: cannot write the calibration to {out}: " in result.stderr
    assert problem in result.stderr and "no trial started" in result.stderr and "Traceback" not in result.stderr
    assert "GO" not in result.stdout


@pytest.mark.timeout(90)
def test_a_write_that_fails_at_the_end_prints_the_measured_calibration(recorded_config: Path, tmp_path: Path) -> None:
    """The output folder disappears during the trials (an unplugged USB stick): exit 1 naming the
    file, and the calibration is printed whole, with the levels a numpy computation on the
    estimator's envelope gives."""
    folder = tmp_path / "usb"
    folder.mkdir()
    out = folder / "calibration.json"
    emg = biosppy("emg_1.txt")[:20000]
    result = calibrate(recorded_config, out, emg, during=lambda: shutil.rmtree(folder))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"fesloop calibrate: could not write {out}: " in result.stderr and "Traceback" not in result.stderr
    printed = Calibration.from_dict(json.loads(result.stdout[result.stdout.index("{\n") :])).muscles[0]
    times_s, envelope, _ = envelope_and_flags(emg)
    assert printed.rest_uv == pytest.approx(envelope[between(times_s, REST_S)].mean(), rel=1e-9)
    assert printed.rest_sd_uv == pytest.approx(envelope[between(times_s, REST_S)].std(), rel=1e-9)
    assert printed.mvc_uv == pytest.approx(window_max_uv(envelope[between(times_s, MVC_S)]), rel=1e-9)
    assert f"muscle: rest {printed.rest_uv:.3g} uV" in result.stdout


@pytest.mark.timeout(90)
def test_an_existing_calibration_is_kept_as_bak(recorded_config: Path, tmp_path: Path) -> None:
    """An existing file (another patient's calibration) used to be replaced without a word."""
    out = tmp_path / "calibration.json"
    out.write_text("previous calibration\n")
    result = calibrate(recorded_config, out, biosppy("emg_1.txt")[:20000])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{out} exists: it will be kept as {out}.bak" in result.stdout
    assert f"wrote {out} (the previous file is kept as {out}.bak)" in result.stdout
    assert (tmp_path / "calibration.json.bak").read_text() == "previous calibration\n"
    assert Calibration.from_dict(json.loads(out.read_text())).muscles[0].mvc_uv > 50.0


@pytest.mark.timeout(10)
def test_the_new_file_is_fsynced_before_it_replaces_the_old_one(tmp_path: Path, monkeypatch) -> None:
    """Without fsync, a power cut after the rename can leave an empty calibration.json: the
    file's data must be on disk before it takes the old file's name."""
    calls: list[tuple[str, int]] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.fstat(fd).st_ino)), fsync(fd))[-1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (calls.append(("replace", os.stat(src).st_ino)), replace(src, dst))[-1])
    out = tmp_path / "calibration.json"
    out.write_text("previous calibration\n")
    muscle = MuscleCalibration("muscle", 3.4, 0.6, 84.0, (84.0,), 5.2, 11.5, 0)
    write_atomically(out, Calibration("replay", "", "", FS_HZ, {"controller.filters.tkeo": False}, (muscle,)))
    assert [kind for kind, _ in calls] == ["fsync", "replace"] and calls[0][1] == calls[1][1], calls
    assert Calibration.from_dict(json.loads(out.read_text())).muscles == (muscle,)
