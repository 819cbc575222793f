"""Values and files the `fesloop` commands refuse or warn about: a message naming the option and the
value (exit 1, as for every refused value), never a traceback or a wait without end. Each runs the
real command as a subprocess, with no acquisition running."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONFIGS, completed, fesloop_cli
from tests.controller.test_recordings import DATA

EMG_1 = DATA / "biosppy" / "emg_1.txt"  # 63.9 s at 1 kHz
OUTSIDE = "fall outside the recording (0 to {duration_s:.3f} s): pulse times are in seconds from its first sample"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("--rest-s", "nan", "> 0"),  # passed every check, then waited for EMG
        ("--trial-s", "inf", "> 0"),
        ("--pause-s", "-1", ">= 0"),
        ("--timeout-s", "-1", "> 0 and <= 3600"),  # poll(-1000 ms): waited forever
        ("--timeout-s", "1e300", "> 0 and <= 3600"),  # overflows the poll's milliseconds
    ],
)
def test_calibrate_refuses_durations_that_are_not_finite_and_positive(option: str, value: str, allowed: str) -> None:
    args = ["calibrate", str(CONFIGS / "replay.toml"), "--timeout-s", "2", option, value]
    with fesloop_cli(*args) as process:
        result = completed(process, 20)
    assert result.returncode == 1
    assert result.stderr == f"fesloop calibrate: {option} = {float(value)!r}: must be a finite number {allowed}\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["run", "record"])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5"])
def test_run_and_record_refuse_a_duration_that_is_not_finite_and_positive(command: str, value: str, tmp_path: Path) -> None:
    """`run --duration nan` passed the check (nan <= 0 is false) and ran without end; record had no check."""
    target = [] if command == "run" else [str(tmp_path / "session.xdf")]
    with fesloop_cli(command, *target, str(CONFIGS / "demo.toml"), "--duration", value) as process:
        result = completed(process, 30)
    assert result.returncode == 1
    assert result.stderr == f"fesloop {command}: --duration = {float(value)!r}: must be a finite number > 0\n"
    assert not (tmp_path / "session.xdf").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["nan", "inf", "-1000"])
def test_replay_refuses_a_rate_that_is_not_finite_and_positive(value: str, tmp_path: Path) -> None:
    """nan gave 'cannot convert float NaN to integer', inf an OverflowError traceback."""
    args = ["replay", str(CONFIGS / "replay.toml"), "--emg", str(EMG_1), "--fs", value, "--out", str(tmp_path)]
    with fesloop_cli(*args) as process:
        result = completed(process, 30)
    assert result.returncode == 1
    assert result.stderr == f"fesloop replay: --fs = {float(value)!r}: must be a finite number > 0\n"


@pytest.mark.timeout(60)
def test_report_on_a_file_that_is_not_xdf_says_so(tmp_path: Path) -> None:
    """It ended in an OSError traceback."""
    bad = tmp_path / "session.xdf"
    bad.write_bytes(b"garbage")
    with fesloop_cli("report", str(bad), "--out", str(tmp_path / "report")) as process:
        result = completed(process, 30)
    assert result.returncode == 1
    assert result.stderr == f"fesloop report: {bad}: Invalid XDF file {bad}\n"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("pulses", "warning"),
    [
        ("time_s\n" + "\n".join(f"{t:.2f}" for t in np.arange(1000.0, 2000.0, 33.25)) + "\n",
         "31 of 31 pulses in {path} " + OUTSIDE),  # milliseconds
        ("time_s\n-0.5\n10.0\n70.0\n", "2 of 3 pulses in {path} " + OUTSIDE),
        ("time_s\n", "{path} holds no pulses"),
        ("0.5;0\n", "{path} holds no pulses"),  # not comma-separated: read as a header
        ("time_s\n0.5\n10.0\n", None),
    ],
    ids=["milliseconds", "some_outside", "header_only", "semicolons", "inside"],
)
def test_replay_warns_when_pulses_fall_outside_the_recording(pulses: str, warning: str | None, tmp_path: Path) -> None:
    """A pulse file in ms (or on another clock) blanked nothing and measured no M-wave, exit 0
    without a word (a header-only file: numpy's own UserWarning). The replay still runs."""
    path = tmp_path / "pulses.csv"
    path.write_text(pulses)
    args = ["replay", str(CONFIGS / "replay.toml"), "--emg", str(EMG_1), "--fs", "1000", "--pulses", str(path),
            "--out", str(tmp_path / "out")]
    with fesloop_cli(*args) as process:
        result = completed(process, 100)
    assert result.returncode == 0, result.stderr
    duration_s = len(np.loadtxt(EMG_1)) / 1000.0
    expected = [] if warning is None else [f"fesloop replay: warning: {warning.format(path=path, duration_s=duration_s)}"]
    assert result.stderr.splitlines() == expected, result.stderr
