"""The calibration file the controller loads: refused unless every level is usable and every
configured muscle is in it; refused, the controller keeps every gate closed (NOT_CALIBRATED)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from controller.calibration import FORMAT, Calibration, CalibrationError, envelope_settings
from controller.loop import Controller, load_calibration
from fesloop.config import load_config
from fesloop.protocol import EmgChunk, GateReason
from tests.conftest import CONFIGS, completed, fesloop_cli

DEMO = load_config(CONFIGS / "demo.toml")


def _muscle(name: str, **levels: float) -> dict:
    values = {"rest_uv": 3.0, "rest_sd_uv": 0.5, "mvc_uv": 200.0, **levels}
    channel = next((m.emg_channel for m in DEMO.muscles if m.name == name), 0)  # replay.toml: "muscle", 0
    return {"name": name, **values, "mvc_trials_uv": [values["mvc_uv"]], "onset_rest_3sd_uv": 4.5,
            "onset_10pct_mvc_uv": 22.7, "emg_channel": channel}


def _file(muscles: list[dict], sampling_rate_hz: float = 2000.0, settings: dict | None = None) -> dict:
    """A calibration file made with demo.toml (``settings``: what else it was made with)."""
    return {"format": FORMAT, "config_name": "demo", "config_path": "demo.toml", "created_utc": "2026-11-27T00:00:00Z",
            "sampling_rate_hz": sampling_rate_hz, "settings": {**envelope_settings(DEMO), **(settings or {})},
            "muscles": muscles}


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


BOTH = [_muscle("quadriceps_l"), _muscle("tibialis_l")]
BRAINFLOW = {'source = "simulated"': 'source = "brainflow"', "[acquisition.simulated]": "[acquisition.brainflow]\nscale_uv = 1.0\n\n[acquisition.simulated]"}
MADE_WITH_BRAINFLOW = {"acquisition.source": "brainflow", "acquisition.brainflow.board": "SYNTHETIC_BOARD",
                       "acquisition.brainflow.master_board": "", "acquisition.brainflow.emg_channels": [],
                       "acquisition.brainflow.scale_uv": 1.0}


@pytest.mark.parametrize(
    ("content", "edits", "error"),
    [
        (_file(BOTH, settings={"controller.filters.envelope_lowpass_hz": 3.0}), {},
         "controller.filters.envelope_lowpass_hz = 6.0, the levels were measured with 3.0: calibrate again"),
        (_file(BOTH), {"highpass_hz = 10.0": "highpass_hz = 30.0"},
         "controller.filters.highpass_hz = 30.0, the levels were measured with 10.0"),
        (_file(BOTH), {"[controller.filters]\n": "[controller.filters]\ntkeo = true\n"},
         "controller.filters.tkeo = True, the levels were measured with False"),
        (_file([_muscle("quadriceps_l"), {**_muscle("tibialis_l"), "emg_channel": 2}]), {},
         "tibialis_l: emg_channel = 1, the levels were measured on channel 2: calibrate again"),
        (_file(BOTH), BRAINFLOW, "acquisition.source = 'brainflow', the levels were measured with 'simulated'"),
        (_file(BOTH, settings=MADE_WITH_BRAINFLOW), {**BRAINFLOW, "scale_uv = 1.0": "scale_uv = 0.1"},
         "acquisition.brainflow.scale_uv = 0.1, the levels were measured with 1.0"),
        (_file(BOTH, settings=MADE_WITH_BRAINFLOW),
         {**BRAINFLOW, "scale_uv = 1.0": "scale_uv = 1.0\nemg_channels = [2, 1]"},
         "acquisition.brainflow.emg_channels = [2, 1], the levels were measured with []"),
        ({**_file(BOTH), "format": "fesloop-calibration/1"}, {},
         "made by an older fesloop (fesloop-calibration/1 keeps neither the source and filter settings nor the EMG"),
        ({**_file(BOTH), "settings": "tkeo"}, {}, "calibration file is incomplete or malformed: settings is a JSON str, not an object"),
    ],
    ids=["envelope_lowpass", "highpass", "tkeo", "channel", "source", "scale", "board_rows", "format_1", "settings_str"],
)
def test_levels_measured_through_another_envelope_are_refused_naming_the_setting(
    write_config, tmp_path: Path, content: dict, edits: dict, error: str
) -> None:
    """The same contraction reads other levels through other filters (a 6 Hz envelope over a 3 Hz
    one, TKEO over |x|), another source, uV scale or board rows (other gains, other electrodes), and
    another channel is other electrodes: such a file was used without a word, scaling every
    activation by the ratio. Now refused, naming the setting and both values."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(content))
    config = load_config(write_config("demo.toml", {"[controller]\n": f'[controller]\ncalibration_file = "{path}"\n', **edits}))
    with pytest.raises(CalibrationError, match="^calibration file .*: " + re.escape(error)):
        load_calibration(config)


def test_a_file_made_with_the_same_source_and_filters_is_accepted(write_config, tmp_path: Path) -> None:
    """The brainflow cases above differ from an accepted file only in the setting named."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(_file(BOTH, settings=MADE_WITH_BRAINFLOW)))
    config = load_config(write_config("demo.toml", {"[controller]\n": f'[controller]\ncalibration_file = "{path}"\n', **BRAINFLOW}))
    assert load_calibration(config).muscle("tibialis_l").emg_channel == 1


def test_a_file_without_a_configured_muscle_is_refused_naming_it(write_config, tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(_file([_muscle("quadriceps_l")])))
    config = load_config(write_config("demo.toml", {"[controller]\n": f'[controller]\ncalibration_file = "{path}"\n'}))
    with pytest.raises(CalibrationError, match="no muscle 'tibialis_l'"):
        load_calibration(config)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("content", "error"),
    [
        (_file([_muscle("quadriceps_l")]), "no muscle 'tibialis_l'"),
        (_file([_muscle("quadriceps_l"), _muscle("tibialis_l")], 250.0), "made from EMG at 250 Hz, the EMG is at 2000 Hz"),
        ([], "a JSON list, not an object"),
        ("calibration", "a JSON str, not an object"),
    ],
    ids=["missing_muscle", "another_rate", "list", "string"],
)
def test_a_refused_file_keeps_every_gate_closed_and_the_controller_running(
    write_config, tmp_path: Path, content: object, error: str
) -> None:
    """The file lacks a configured muscle: it used to load, and the first EMG chunk then raised out
    of the loop and killed the controller. The file was made from EMG at another rate (another
    amplifier or setting): it was used without a word. A file holding JSON that is not an object
    raised AttributeError while the controller was built. Now: NOT_CALIBRATED, and EMG chunks are processed."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(content))
    config = load_config(write_config("demo.toml", {"[controller]\n": f'[controller]\ncalibration_file = "{path}"\n'}))
    controller = Controller(config)
    try:
        now_s = controller.rt.clock.now()
        controller.on_emg(EmgChunk(0, now_s, now_s, 2000.0, np.zeros((4, 2), np.float32)), now_s)
        command = controller.compute(now_s)
    finally:
        controller.rt.close()
    assert f"calibration file {path}: " in controller.calibration_error and error in controller.calibration_error
    assert command.gate_reason.tolist() == [GateReason.NOT_CALIBRATED] * 2 and not command.gate_open.any()


@pytest.mark.timeout(10)
def test_a_relative_calibration_file_is_taken_from_the_config_folder(write_config, tmp_path: Path, monkeypatch) -> None:
    """It was taken from the current folder: `fesloop run` started elsewhere used whatever
    calibration.json lay there (another rig's, another patient's) without a word."""
    (tmp_path / "rig").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for folder, mvc_uv in (("rig", 200.0), ("elsewhere", 150.0)):
        muscles = [_muscle(name, mvc_uv=mvc_uv) for name in ("quadriceps_l", "tibialis_l")]
        (tmp_path / folder / "calibration.json").write_text(json.dumps(_file(muscles)))
    config_path = write_config(
        "demo.toml", {"[controller]\n": '[controller]\ncalibration_file = "calibration.json"\n'}, name="rig/rig.toml"
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config(config_path)
    assert config.controller.calibration_file == str(tmp_path / "rig" / "calibration.json")
    assert load_calibration(config).muscle("quadriceps_l").mvc_uv == 200.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sampling_rate_hz", "exit_code"), [(1000.0, 0), (2000.0, 1)])
def test_replay_refuses_a_calibration_made_at_another_rate(
    write_config, tmp_path: Path, sampling_rate_hz: float, exit_code: int
) -> None:
    """replay.toml's own commented line, switched on: the file beside the config is used (the
    command runs from the repository), and only when it was made at the recording's rate."""
    (tmp_path / "calibration.json").write_text(json.dumps(_file([_muscle("muscle")], sampling_rate_hz)))
    config_path = write_config(
        "replay.toml", {'# calibration_file = "calibration.json"': 'calibration_file = "calibration.json"'}
    )
    emg = Path(__file__).resolve().parent.parent / "data" / "biosppy" / "emg_1.txt"
    with fesloop_cli("replay", str(config_path), "--emg", str(emg), "--fs", "1000", "--out", str(tmp_path / "out")) as process:
        result = completed(process, 50)
    assert result.returncode == exit_code, result.stderr
    if exit_code:
        assert result.stderr.strip() == (
            f"fesloop replay: calibration file {tmp_path / 'calibration.json'}: made from EMG at 2000 Hz, "
            "the EMG is at 1000 Hz (calibrate again at this rate)"
        )
