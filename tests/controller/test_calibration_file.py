"""The calibration file the controller loads: refused unless every level is usable and every
configured muscle is in it; refused, the controller keeps every gate closed (NOT_CALIBRATED)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controller.calibration import FORMAT, Calibration, CalibrationError
from controller.loop import Controller, load_calibration
from fesloop.config import load_config
from fesloop.protocol import EmgChunk, GateReason


def _muscle(name: str, **levels: float) -> dict:
    values = {"rest_uv": 3.0, "rest_sd_uv": 0.5, "mvc_uv": 200.0, **levels}
    return {"name": name, **values, "mvc_trials_uv": [values["mvc_uv"]], "onset_rest_3sd_uv": 4.5,
            "onset_10pct_mvc_uv": 22.7}


def _file(muscles: list[dict]) -> dict:
    return {"format": FORMAT, "config_name": "demo", "config_path": "demo.toml", "created_utc": "2026-11-27T00:00:00Z",
            "sampling_rate_hz": 2000.0, "muscles": muscles}


@pytest.mark.parametrize(
    ("key", "value"),
    [("rest_uv", float("-inf")), ("rest_uv", -60.0), ("rest_uv", float("nan")), ("rest_sd_uv", -1.0),
     ("mvc_uv", float("inf")), ("mvc_uv", "200")],
)
def test_levels_that_are_not_finite_non_negative_numbers_are_refused_naming_them(key: str, value: object) -> None:
    """-inf rest made the activation NaN; a negative rest stimulated at rest (0.24 activation)."""
    raw = json.loads(json.dumps(_file([_muscle("quadriceps_l", **{key: value})])))  # as read from a file
    with pytest.raises(CalibrationError, match=f"quadriceps_l: {key} = "):
        Calibration.from_dict(raw)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("levels", "key"),
    [
        ({"rest_uv": 6.92e-13, "rest_sd_uv": 3.47e-16, "mvc_uv": 0.325}, "rest_uv"),  # the review's lead-off file
        ({"rest_uv": 0.49, "rest_sd_uv": 0.1, "mvc_uv": 200.0}, "rest_uv"),
        ({"rest_uv": 3.0, "rest_sd_uv": 0.019, "mvc_uv": 200.0}, "rest_sd_uv"),
        ({"rest_uv": 4.26, "rest_sd_uv": 0.3, "mvc_uv": 14.0}, "mvc_uv"),  # above 2 x rest and rest + 10 SD
    ],
)
def test_levels_below_the_absolute_floors_are_refused_at_load(levels: dict, key: str) -> None:
    """A file with rest ~0 and SD ~0 passed any MVC (2 x 0, 0 + 10 x 0): with the review's file a
    real resting envelope of 4.26 uV read as activation 1.0. An MVC 9.7 uV above a 4.26 uV rest
    passed too: resting noise of 1 uV then reads as 0.1."""
    raw = json.loads(json.dumps(_file([_muscle("quadriceps_l", **levels)])))
    with pytest.raises(CalibrationError, match=f"^quadriceps_l: {key} = {levels[key]!r}: "):
        Calibration.from_dict(raw)


def test_a_file_without_a_configured_muscle_is_refused_naming_it(write_config, tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(_file([_muscle("quadriceps_l")])))
    config = load_config(write_config("demo.toml", {"[controller]\n": f'[controller]\ncalibration_file = "{path}"\n'}))
    with pytest.raises(CalibrationError, match="no muscle 'tibialis_l'"):
        load_calibration(config)


@pytest.mark.timeout(30)
def test_a_refused_file_keeps_every_gate_closed_and_the_controller_running(write_config, tmp_path: Path) -> None:
    """The file lacks a configured muscle: it used to load, and the first EMG chunk then raised out
    of the loop and killed the controller. Now: NOT_CALIBRATED, and EMG chunks are processed."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(_file([_muscle("quadriceps_l")])))
    config = load_config(write_config("demo.toml", {"[controller]\n": f'[controller]\ncalibration_file = "{path}"\n'}))
    controller = Controller(config)
    try:
        now_s = controller.rt.clock.now()
        controller.on_emg(EmgChunk(0, now_s, now_s, 2000.0, np.zeros((4, 2), np.float32)), now_s)
        command = controller.compute(now_s)
    finally:
        controller.rt.close()
    assert "no muscle 'tibialis_l'" in controller.calibration_error
    assert command.gate_reason.tolist() == [GateReason.NOT_CALIBRATED] * 2 and not command.gate_open.any()
