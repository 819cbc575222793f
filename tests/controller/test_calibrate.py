"""`fesloop calibrate` against a real acquisition process on the simulated patient."""

from __future__ import annotations

import json
import subprocess
import threading

import numpy as np
import pylsl
import pytest

from controller.calibration import Calibration
from fesloop.lsl import configure_machine_scope
from tests.conftest import completed, fesloop_cli

pytestmark = pytest.mark.timeout(90)

# Phases on the EMG clock from the first chunk: rest 0.5-2.0 s, quadriceps MVC 3.0-4.0 s,
# tibialis MVC 5.0-6.0 s. The patient contracts each muscle around its trial, with
# >= 0.4 s margin for the start skew between the two processes.
CONTRACTIONS = """schedule_period_s = 100.0

[[acquisition.simulated.contractions]]
muscle = "quadriceps_l"
start_s = 2.6
duration_s = 1.8
level = 0.8

[[acquisition.simulated.contractions]]
muscle = "tibialis_l"
start_s = 4.6
duration_s = 1.8
level = 0.8
"""
SHORT = ["--rest-s", "1.5", "--trials", "1", "--trial-s", "1.0", "--pause-s", "0.5"]


def _write(write_config, contracting: bool):
    """The demo config with the demo's contractions replaced by the calibration script's (or none)."""
    path = write_config("demo.toml")
    head, tail = path.read_text().split("# The schedule repeats")
    schedule = CONTRACTIONS if contracting else "schedule_period_s = 100.0\n"
    path.write_text(head.replace("schedule_period_s = 8.0\n", schedule) + tail[tail.index("[[muscles]]") :])
    return path


def _calibrate(path, out, processes, markers: list[tuple[str, float]] | None = None) -> subprocess.CompletedProcess:
    """Run ``fesloop calibrate`` against a fresh acquisition; with ``markers``, collect its LSL markers."""
    with fesloop_cli("calibrate", str(path), "--out", str(out), *SHORT) as calibrate:
        return _run_with_acquisition(calibrate, path, processes, markers)


def _run_with_acquisition(
    calibrate: subprocess.Popen, path, processes, markers: list[tuple[str, float]] | None
) -> subprocess.CompletedProcess:
    """Start the acquisition ``calibrate`` listens to (markers collected first) and wait for calibrate's end."""
    stop = threading.Event()
    reader = None
    try:
        if markers is not None:
            configure_machine_scope()
            found = pylsl.resolve_bypred("type='Markers' and name='demo-calibration-markers'", 1, 20)
            assert found, "no calibration markers stream"
            inlet = pylsl.StreamInlet(found[0])
            inlet.open_stream(timeout=5)

            def pull() -> None:
                while True:
                    done = stop.is_set()  # one more pull after the process ended: its last markers
                    samples, stamps = inlet.pull_chunk(timeout=0.1)
                    markers.extend((sample[0], stamp) for sample, stamp in zip(samples, stamps))
                    if done:
                        return

            reader = threading.Thread(target=pull, daemon=True)
            reader.start()
        processes.start("acquisition", str(path), name="acquisition")
        return completed(calibrate, 40)
    finally:
        stop.set()
        if reader is not None:
            reader.join(2)


def test_calibrate_measures_rest_and_mvc_from_live_emg(write_config, processes, tmp_path) -> None:
    path = _write(write_config, contracting=True)
    out = tmp_path / "calibration.json"
    markers: list[tuple[str, float]] = []
    result = _calibrate(path, out, processes, markers)
    assert result.returncode == 0, result.stdout + result.stderr + processes.log("acquisition")
    assert "GO: REST" in result.stdout and "MVC 1/1" in result.stdout
    # Every phase edge on LSL, in order, stamped with the EMG time it refers to (SHORT's schedule).
    texts = [text for text, _ in markers]
    assert texts == [
        "calibration start",
        "calibration rest start", "calibration rest end",
        "calibration mvc 1/1 quadriceps_l start", "calibration mvc 1/1 quadriceps_l end",
        "calibration mvc 1/1 tibialis_l start", "calibration mvc 1/1 tibialis_l end",
        f"calibration written to {out}",
    ], texts
    start_s = markers[0][1]
    edges_s = [t - start_s for _, t in markers[1:7]]
    assert np.allclose(edges_s, [0.5, 2.0, 2.5, 3.5, 4.0, 5.0], atol=1e-6), edges_s
    calibration = Calibration.from_dict(json.loads(out.read_text()))
    for muscle in calibration.muscles:
        # Rest noise 3 uV rms plus mains; MVC at drive 0.8 of 300 uV rms: envelope ~190 uV.
        assert muscle.rest_uv < 10.0 and 100.0 < muscle.mvc_uv < 300.0, muscle
    assert calibration.config_name == "demo" and calibration.sampling_rate_hz == 2000.0


def test_calibrate_refuses_an_mvc_not_above_rest_and_overwrites_nothing(write_config, processes, tmp_path) -> None:
    path = _write(write_config, contracting=False)
    out = tmp_path / "calibration.json"
    out.write_text("previous calibration\n")
    markers: list[tuple[str, float]] = []
    result = _calibrate(path, out, processes, markers)
    assert result.returncode == 1
    assert markers[-1][0].startswith("calibration refused:") and "not clearly above rest" in markers[-1][0]
    assert "not clearly above rest" in result.stderr and "nothing written" in result.stderr
    assert out.read_text() == "previous calibration\n"
