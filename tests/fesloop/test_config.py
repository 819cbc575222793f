"""Config loading: every shipped config loads; every bad value is refused with a useful message.

A ConfigError must name the full key path, the value given and what is allowed, so the
tests check all three rather than just the exception type.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.calibration import FORMAT, Calibration, CalibrationError
from fesloop.config import DEFAULT_CONFIG, Config, load_config, parse_config
from fesloop.schema import ConfigError
from stimulator.limits import REHASTIM2

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.toml"))
DEMO = (ROOT / "configs" / "demo.toml").read_text(encoding="utf-8")


# ---------------------------------------------------------------- helpers


def edit(old: str, new: str, text: str = DEMO, count: int = 1) -> str:
    """Replace ``old`` in the demo text, insisting it occurs exactly ``count`` times."""
    assert text.count(old) == count, f"{old!r} occurs {text.count(old)} times in the demo config"
    return text.replace(old, new)


def in_table(table: str, line: str, text: str = DEMO) -> str:
    """Add ``line`` right under the ``[table]`` header."""
    return edit(f"[{table}]\n", f"[{table}]\n{line}\n", text)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def minimal(**channel) -> str:
    """One muscle and one stimulation channel; channel fields overridden (None drops a key)."""
    fields = {
        "name": "quad",
        "muscle": "quad",
        "device_channel": 0,
        "electrode_area_cm2": 25.0,
        "threshold_ma": 12.0,
        "max_ma": 40.0,
        "pulse_width_us": 300.0,
        "frequency_hz": 30.0,
    }
    fields.update(channel)
    lines = "\n".join(f"{k} = {toml_value(v)}" for k, v in fields.items() if v is not None)
    return f'[[muscles]]\nname = "quad"\nemg_channel = 0\nrest_uv = 3.0\nmvc_uv = 240.0\n\n[[stimulation]]\n{lines}\n'


def electrode_ma(area_cm2: float, pulse_width_us: float, frequency_hz: float) -> float:
    """DESIGN 5, I_peak <= 2 * A / sqrt(2 * PW * f) with PW in s: written out apart from the code under test."""
    return 2.0 * area_cm2 / math.sqrt(2.0 * pulse_width_us * 1e-6 * frequency_hz)


def refused(text: str, key: str, value, *allowed: str) -> ConfigError:
    """parse_config must raise ConfigError naming ``key``, ``value`` and each ``allowed`` fragment."""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    error = info.value
    message = str(error)
    assert error.key == key, message
    assert message.startswith(f"{key} = "), message
    if value is not ...:
        assert error.value == value and type(error.value) is type(value), message
        assert repr(value) in message, message
    for fragment in allowed:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return error


# ---------------------------------------------------------------- loading


def test_demo_loads():
    config = load_config()
    assert DEFAULT_CONFIG.name == "demo.toml"
    assert isinstance(config, Config)
    assert config.name == "demo"
    assert [m.name for m in config.muscles] == ["quadriceps_l", "tibialis_l"]
    assert [s.device_channel for s in config.stimulation] == [0, 1]
    assert config.stimulation[0].max_ma == 40.0
    assert config.stimulation[0].law.gain == 1.5
    assert config.controller.filters.bandpass_hz == (20.0, 450.0)
    assert config.acquisition.simulated.contractions[1].muscle == "tibialis_l"
    assert config.muscle_index("tibialis_l") == 1
    assert parse_config(DEMO) == config


def test_there_are_configs_to_check():
    assert ROOT / "configs" / "demo.toml" in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.muscles
    for channel in config.stimulation:
        assert channel.max_ma <= electrode_ma(
            channel.electrode_area_cm2, channel.pulse_width_us, channel.frequency_hz
        )
    if config.acquisition.brainflow.file:  # relative in the file, taken from configs/
        assert Path(config.acquisition.brainflow.file).is_file()


def test_relative_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    """They were taken from the folder a command started in (except the calibration file): a process
    started elsewhere replayed, recorded to or took keys from another folder's files."""
    (tmp_path / "rig").mkdir()
    (tmp_path / "elsewhere").mkdir()
    text = minimal().replace("[[muscles]]", """[acquisition.brainflow]
file = "data/session.tsv"
record_file = "/abs/raw.csv"

[controller]
calibration_file = "calibration.json"

[security]
keys_dir = "keys"

[[muscles]]""", 1)
    (tmp_path / "rig" / "rig.toml").write_text(text)
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config(Path("..") / "rig" / "rig.toml")
    rig = (tmp_path / "elsewhere" / ".." / "rig").absolute()
    assert config.acquisition.brainflow.file == str(rig / "data" / "session.tsv")
    assert config.acquisition.brainflow.record_file == "/abs/raw.csv"
    assert config.controller.calibration_file == str(rig / "calibration.json")
    assert config.security.keys_dir == str(rig / "keys")
    assert parse_config(text).security.keys_dir == "keys"  # text without a file: as written


def test_minimal_config_loads_with_defaults():
    config = parse_config(minimal())
    assert config.name == "fesloop"
    assert config.acquisition.source == "simulated"
    assert config.stimulator.arm_at_start is False
    # DESIGN 5 and the fault matrix: every shipped config sets these, so only this test sees the defaults.
    assert (config.stimulator.deadline_ms, config.stimulator.ramp_s, config.stimulator.max_emg_age_ms) == (100.0, 0.5, 250.0)
    assert (config.controller.stale_ms, config.acquisition.stale_ms) == (100.0, 100.0)


def test_ints_are_accepted_for_float_keys_and_become_floats():
    config = parse_config(minimal(max_ma=40, pulse_width_us=300))
    assert type(config.stimulation[0].max_ma) is float and config.stimulation[0].max_ma == 40.0


def test_invalid_toml_is_a_config_error_naming_the_source(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value)


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "text, key, value, allowed",
    [
        (edit("chunk_ms = 2.0", 'chunk_ms = "fast"'), "acquisition.chunk_ms", "fast", "must be a finite number"),
        (edit("seed = 7", "seed = 7.5"), "acquisition.simulated.seed", 7.5, "must be an integer"),
        (edit("seed = 7", "seed = true"), "acquisition.simulated.seed", True, "must be an integer"),
        (in_table("acquisition", "lsl = 1"), "acquisition.lsl", 1, "must be true or false"),
        (edit('name = "demo"', "name = 3"), "name", 3, "must be a string"),
        (edit("emg_channel = 1", 'emg_channel = "1"'), "muscles[1].emg_channel", "1", "must be an integer"),
        (edit("max_ma = 30.0", 'max_ma = "30"'), "stimulation[1].max_ma", "30", "must be a finite number"),
        (edit("max_ma = 40.0", "max_ma = nan"), "stimulation[0].max_ma", ..., "must be a finite number"),
        (edit("max_ma = 40.0", "max_ma = inf"), "stimulation[0].max_ma", float("inf"), "must be a finite number"),
        (edit("max_ma = 40.0", "max_ma = true"), "stimulation[0].max_ma", True, "must be a finite number"),
        (
            edit("bandpass_hz = [20.0, 450.0]", "bandpass_hz = [20.0]"),
            "controller.filters.bandpass_hz",
            [20.0],
            "must be a list of 2 values",
        ),
        (
            edit("bandpass_hz = [20.0, 450.0]", 'bandpass_hz = [20.0, "high"]'),
            "controller.filters.bandpass_hz[1]",
            "high",
            "must be a finite number",
        ),
        (
            edit("bandpass_hz = [20.0, 450.0]", "bandpass_hz = 450.0"),
            "controller.filters.bandpass_hz",
            450.0,
            "must be a list",
        ),
        (
            edit("gain = 1.5, offset = 0.1, max_intensity = 1.0 }\n\n[stimulator]", 'gain = "high" }\n\n[stimulator]'),
            "stimulation[1].law.gain",
            "high",
            "must be a finite number",
        ),
        ("controller = 5\n" + minimal(), "controller", 5, "must be a table of ControllerConfig settings"),
        ("muscles = [1]\n", "muscles[0]", 1, "must be a table of Muscle settings"),
        ('muscles = "quad"\n', "muscles", "quad", "must be a list"),
        (minimal() + "\n[acquisition]\nsimulated = []\n", "acquisition.simulated", [], "must be a table"),
    ],
    ids=lambda v: v if isinstance(v, str) and "\n" not in v and len(v) < 40 else None,
)
def test_wrong_type_is_refused(text, key, value, allowed):
    refused(text, key, value, allowed)


def test_nan_value_is_refused():
    error = refused(edit("max_ma = 40.0", "max_ma = nan"), "stimulation[0].max_ma", ..., "finite")
    assert error.value != error.value  # NaN, reported as given


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "text, key, allowed",
    [
        ("bogus = 1\n" + DEMO, "bogus", ["acquisition", "controller", "endpoints", "muscles", "stimulation"]),
        (in_table("controller.filters", "bogus = 1"), "controller.filters.bogus", ["highpass_hz", "bandpass_hz"]),
        (in_table("acquisition.simulated", "bogus = 1"), "acquisition.simulated.bogus", ["seed", "contractions"]),
        (in_table("stimulator", "bogus = 1"), "stimulator.bogus", ["driver", "deadline_ms"]),
        (edit("max_ma = 30.0", "max_ma = 30.0\nbogus = 1"), "stimulation[1].bogus", ["max_ma", "law"]),
        (edit("mvc_uv = 240.0", "mvc_uv = 240.0\nbogus = 1", count=2).replace(
            "mvc_uv = 240.0\nbogus = 1", "mvc_uv = 240.0", 1), "muscles[1].bogus", ["rest_uv", "mvc_uv"]),
        (edit("level = 0.5", "level = 0.5\nbogus = 1"), "acquisition.simulated.contractions[1].bogus", ["level"]),
        (
            edit("gain = 1.5, offset = 0.1, max_intensity = 1.0 }\n\n[[stimulation]]",
                 "gain = 1.5, bogus = 1 }\n\n[[stimulation]]"),
            "stimulation[0].law.bogus",
            ["gain", "offset", "max_intensity"],
        ),
    ],
)
def test_unknown_key_is_refused(text, key, allowed):
    error = refused(text, key, 1, "unknown key", *allowed)
    assert "allowed keys here" in str(error)


def test_misspelt_safety_key_is_not_silently_ignored():
    # max_mA instead of max_ma must not fall back to some default
    refused(edit("max_ma = 40.0", "max_mA = 40.0"), "stimulation[0].max_mA", 40.0, "unknown key")


# ---------------------------------------------------------------- out of range


@pytest.mark.parametrize(
    "text, key, value, allowed",
    [
        (edit("chunk_ms = 2.0", "chunk_ms = 0.1"), "acquisition.chunk_ms", 0.1, "within 0.5..50.0 ms"),
        (edit("chunk_ms = 2.0", "chunk_ms = 51.0"), "acquisition.chunk_ms", 51.0, "within 0.5..50.0 ms"),
        (edit("mains_hz = 50.0", "mains_hz = 75.0"), "acquisition.simulated.mains_hz", 75.0, "within 40.0..70.0 Hz"),
        (edit("emg_channel = 0", "emg_channel = -1"), "muscles[0].emg_channel", -1, "within 0..1023"),
        (edit("level = 0.6", "level = 1.2"), "acquisition.simulated.contractions[0].level", 1.2, "within 0.0..1.0"),
        (edit("control_rate_hz = 200.0", "control_rate_hz = 5.0"), "controller.control_rate_hz", 5.0, "Hz"),
        (edit("notch_harmonics = 3", "notch_harmonics = 11"), "controller.filters.notch_harmonics", 11, "1..10"),
        (
            edit("bandpass_hz = [20.0, 450.0]", "bandpass_hz = [20.0, 6000.0]"),
            "controller.filters.bandpass_hz",
            (20.0, 6000.0),
            "within 1.0..5000.0 Hz",
        ),
        (
            edit("bandpass_hz = [20.0, 450.0]", "bandpass_hz = [0.5, 450.0]"),
            "controller.filters.bandpass_hz",
            (0.5, 450.0),
            "within 1.0..5000.0 Hz",
        ),
        (edit("post_ms = 20.0", "post_ms = -1.0"), "controller.blanking.post_ms", -1.0, "within 0.0..100.0 ms"),
        (edit("deadline_ms = 100.0", "deadline_ms = 5000.0"), "stimulator.deadline_ms", 5000.0, "10.0..1000.0"),
        (edit("max_ma = 40.0", "max_ma = -1.0"), "stimulation[0].max_ma", -1.0, "within 0.0..inf mA"),
        (edit("device_channel = 1", "device_channel = 256"), "stimulation[1].device_channel", 256, "within 0..255"),
        (
            edit("gain = 1.5, offset = 0.1, max_intensity = 1.0 }\n\n[stimulator]",
                 "gain = 1.5, offset = 0.1, max_intensity = 1.5 }\n\n[stimulator]"),
            "stimulation[1].law.max_intensity",
            1.5,
            "within 0.0..1.0",
        ),
    ],
)
def test_out_of_range_value_is_refused(text, key, value, allowed):
    # the range text is the bounds of that field, e.g. "must be within 40.0..70.0 Hz"
    refused(text, key, value, "must be within", *([allowed] if allowed else []))


@pytest.mark.parametrize("value", [0.5, 50.0])
def test_range_edges_are_inclusive(value):
    config = parse_config(edit("chunk_ms = 2.0", f"chunk_ms = {value}"))
    assert config.acquisition.chunk_ms == value


@settings(max_examples=40)
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_chunk_ms_accepted_exactly_within_its_range(value):
    text = edit("chunk_ms = 2.0", f"chunk_ms = {value!r}")
    if 0.5 <= value <= 50.0:
        assert parse_config(text).acquisition.chunk_ms == value
    else:
        refused(text, "acquisition.chunk_ms", value, "within 0.5..50.0 ms")


# ---------------------------------------------------------------- missing keys and bad literals


@pytest.mark.parametrize(
    "text, key",
    [
        (edit("max_ma = 40.0\n", ""), "stimulation[0].max_ma"),
        (edit("electrode_area_cm2 = 16.0\n", ""), "stimulation[1].electrode_area_cm2"),
        (edit('muscle = "tibialis_l"\ndevice_channel', "device_channel"), "stimulation[1].muscle"),
        (edit('name = "tibialis_l"\nemg_channel', "emg_channel"), "muscles[1].name"),
        (edit("mvc_uv = 240.0\n", "", count=2).replace("rest_uv = 3.0\n", "rest_uv = 3.0\nmvc_uv = 240.0\n", 1),
         "muscles[1].mvc_uv"),
        (edit("level = 0.6\n", ""), "acquisition.simulated.contractions[0].level"),
        (minimal(pulse_width_us=None), "stimulation[0].pulse_width_us"),
    ],
)
def test_missing_required_key_is_refused(text, key):
    refused(text, key, None, "required key is missing")


def test_no_muscles_is_refused():
    refused('name = "empty"\n', "muscles", [], "at least one [[muscles]] entry")


@pytest.mark.parametrize(
    "text, key, value, allowed",
    [
        (edit('source = "simulated"', 'source = "nope"'), "acquisition.source", "nope", "'simulated', 'brainflow'"),
        (edit('source = "simulated"', "source = 1"), "acquisition.source", 1, "'simulated', 'brainflow'"),
        (edit('driver = "simulated"', 'driver = "rehastim3"'), "stimulator.driver", "rehastim3", "'simulated'"),
        (
            edit('kind = "proportional", gain = 1.5, offset = 0.1, max_intensity = 1.0 }\n\n[[stimulation]]',
                 'kind = "pid" }\n\n[[stimulation]]'),
            "stimulation[0].law.kind",
            "pid",
            "'proportional'",
        ),
    ],
)
def test_bad_literal_is_refused(text, key, value, allowed):
    refused(text, key, value, "must be one of", allowed)


# ---------------------------------------------------------------- cross-field checks


def test_mvc_not_above_rest_is_refused():
    text = edit("rest_uv = 3.0\nmvc_uv = 240.0", "rest_uv = 300.0\nmvc_uv = 240.0", count=2)
    refused(text, "muscles[0].mvc_uv", 240.0, "not clearly above rest (rest 300 uV): must exceed 600 uV")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("levels", "key", "allowed"),
    [
        ({"rest_uv": 5.0, "mvc_uv": 5.01}, "mvc_uv", "must exceed 15 uV (2 x rest, rest + 10 uV)"),
        ({"rest_uv": 3.0, "mvc_uv": 40.0, "rest_sd_uv": 5.0}, "mvc_uv", "must exceed 53 uV (2 x rest, rest + 10 uV, rest + 10 SD)"),
        ({"rest_uv": 0.2, "mvc_uv": 240.0}, "rest_uv", "must be at least 0.5 uV"),
        ({"rest_uv": 3.0, "mvc_uv": 240.0, "rest_sd_uv": 0.01}, "rest_sd_uv", "must be at least 0.02 uV"),
    ],
)
def test_muscle_levels_follow_the_calibration_files_rule(levels: dict, key: str, allowed: str) -> None:
    """A config's levels only needed mvc > rest: rest 5, MVC 5.01 loaded (a calibration file with
    them was refused), and resting noise flipped the activation to 1.0. Now the same rule
    (controller.calibration.check_levels), with key, value and the allowed range; the same
    levels in a calibration file are refused naming the same key."""
    lines = "\n".join(f"{k} = {v!r}" for k, v in levels.items())
    refused(edit("rest_uv = 3.0\nmvc_uv = 240.0", lines, count=2), f"muscles[0].{key}", levels[key], allowed)
    muscle = {"name": "m", "rest_sd_uv": 0.1, **levels, "mvc_trials_uv": [levels["mvc_uv"]], "onset_rest_3sd_uv": 0.0,
              "onset_10pct_mvc_uv": 0.0, "emg_channel": 0}
    raw = {"format": FORMAT, "config_name": "", "config_path": "", "created_utc": "", "sampling_rate_hz": 2000.0,
           "settings": {}, "muscles": [muscle]}
    with pytest.raises(CalibrationError, match=f"^m: {key} = {levels[key]!r}: "):
        Calibration.from_dict(raw)


def test_levels_are_placeholders_when_a_calibration_file_is_named(tmp_path) -> None:
    """With controller.calibration_file the config's levels are never used (a missing or refused file
    keeps every gate NOT_CALIBRATED): a rig config before its first calibration keeps placeholders,
    which the floors refused, and then `fesloop calibrate` could not even start. MVC above rest still holds."""
    placeholders = edit("rest_uv = 3.0\nmvc_uv = 240.0", "rest_uv = 0.0\nmvc_uv = 1.0", count=2)
    refused(placeholders, "muscles[0].rest_uv", 0.0, "must be at least 0.5 uV")
    named = placeholders.replace("[controller]\n", '[controller]\ncalibration_file = "calibration.json"\n', 1)
    assert [m.rest_uv for m in parse_config(named).muscles] == [0.0, 0.0]
    inverted = named.replace("rest_uv = 0.0\nmvc_uv = 1.0", "rest_uv = 2.0\nmvc_uv = 1.0", 1)
    refused(inverted, "muscles[0].mvc_uv", 1.0, "must be above rest_uv (2 uV)")


@pytest.mark.parametrize(
    "clients, key, value",
    [
        ('{ key = "controller", control = ["arm"] }', "security.clients[0].key", "controller"),
        ('{ key = "operator" }, { key = "operator", control = ["arm"] }', "security.clients[1].key", "operator"),
    ],
)
def test_client_keys_must_be_unique_and_not_a_process_key(clients, key, value):
    refused(DEMO + f'\n[security]\nclients = [{clients}]\n', key, value, "unique and not a process's key")


def test_a_client_may_not_be_allowed_an_unknown_request():
    refused(DEMO + '\n[security]\nclients = [{ key = "monitor", control = ["status", "set_amplitude"] }]\n',
            "security.clients[0].control[1]", "set_amplitude", "override_dose")


def test_duplicate_muscle_name_is_refused():
    refused(edit('name = "tibialis_l"\nemg_channel', 'name = "quadriceps_l"\nemg_channel'),
            "muscles[1].name", "quadriceps_l", "unique")


def test_contraction_of_unknown_muscle_is_refused():
    refused(edit('muscle = "tibialis_l"\nstart_s', 'muscle = "biceps"\nstart_s'),
            "acquisition.simulated.contractions[1].muscle", "biceps", "quadriceps_l", "tibialis_l")


def test_bandpass_edges_out_of_order_are_refused():
    refused(edit("bandpass_hz = [20.0, 450.0]", "bandpass_hz = [450.0, 20.0]"),
            "controller.filters.bandpass_hz", [450.0, 20.0], "low edge must be below high edge")


# ---------------------------------------------------------------- safety limits at load


def test_max_ma_130_accepted_where_electrode_allows():
    assert electrode_ma(25.0, 300.0, 30.0) > 130.0
    config = parse_config(minimal(max_ma=130.0))
    assert config.stimulation[0].max_ma == 130.0


@pytest.mark.parametrize("max_ma", [130.001, 131.0, 500.0])
def test_max_ma_above_device_range_is_refused(max_ma):
    refused(minimal(max_ma=max_ma, electrode_area_cm2=100.0), "stimulation[0].max_ma", max_ma,
            "RehaStim2 amplitude range is 0-130 mA")


def test_max_ma_131_refused_in_demo():
    refused(edit("max_ma = 40.0", "max_ma = 131.0"), "stimulation[0].max_ma", 131.0, "RehaStim2", "0-130 mA")


@pytest.mark.parametrize("width", [20.0, 500.0, 20, 500])
def test_pulse_width_at_device_edges_accepted(width):
    assert parse_config(minimal(pulse_width_us=width)).stimulation[0].pulse_width_us == width


@pytest.mark.parametrize("width", [19.0, 501.0, 19.999, 500.001, 0.0])
def test_pulse_width_outside_device_range_refused(width):
    refused(minimal(pulse_width_us=width), "stimulation[0].pulse_width_us", width,
            "RehaStim2 pulse width range is 20-500 us")


@pytest.mark.parametrize("frequency", [1.0, 50.0, 1, 50])
def test_frequency_at_device_edges_accepted(frequency):
    assert parse_config(minimal(frequency_hz=frequency)).stimulation[0].frequency_hz == frequency


@pytest.mark.parametrize("frequency", [0.0, 0.5, 0.999, 50.001, 50.5, 51.0, 100.0])
def test_frequency_outside_device_range_refused(frequency):
    refused(minimal(frequency_hz=frequency), "stimulation[0].frequency_hz", frequency, "frequency range is 1-50 Hz")


@pytest.mark.parametrize("channel", [REHASTIM2.n_channels, 255])
def test_device_channel_beyond_device_refused(channel):
    refused(minimal(device_channel=channel), "stimulation[0].device_channel", channel, "channels 0..7")


def test_electrode_too_small_for_max_ma_is_refused():
    limit = electrode_ma(1.0, 300.0, 30.0)
    assert 14.9 < limit < 15.0
    refused(
        minimal(electrode_area_cm2=1.0, max_ma=40.0),
        "stimulation[0].max_ma",
        40.0,
        "electrode limit 2 mA/cm^2 rms",
        "1 cm^2",
        "300 us",
        "30 Hz",
        "at most 14.9 mA",
    )


def test_electrode_limit_boundary():
    limit = electrode_ma(4.0, 250.0, 40.0)
    assert limit == pytest.approx(56.57, abs=0.01)
    below, above = round(limit, 1) - 0.1, round(limit, 1) + 0.1
    assert below < limit < above
    assert parse_config(minimal(electrode_area_cm2=4.0, pulse_width_us=250.0, frequency_hz=40.0, max_ma=below))
    refused(minimal(electrode_area_cm2=4.0, pulse_width_us=250.0, frequency_hz=40.0, max_ma=above),
            "stimulation[0].max_ma", above, "electrode limit", "4 cm^2", f"at most {limit:.1f} mA")


def test_an_electrode_area_in_mm2_by_mistake_is_refused():
    """600 for a 2 x 3 cm electrode (6 cm^2) raised its limit at 300 us, 30 Hz from 89 mA to the device's 130."""
    assert 89.0 < electrode_ma(6.0, 300.0, 30.0) < 90.0
    refused(minimal(electrode_area_cm2=600.0), "stimulation[0].electrode_area_cm2", 600.0, "within 0.0..300.0 cm^2")
    assert parse_config(minimal(electrode_area_cm2=300.0)).stimulation[0].electrode_area_cm2 == 300.0


def test_zero_electrode_area_is_refused():
    refused(minimal(electrode_area_cm2=0.0), "stimulation[0].electrode_area_cm2", 0.0, "must be a positive finite number")


@settings(max_examples=40)
@given(
    area=st.floats(0.5, 200.0),
    width=st.floats(20.0, 500.0),
    frequency=st.floats(1.0, 50.0),
    max_ma=st.floats(0.0, 130.0),
)
def test_electrode_limit_enforced_for_any_valid_device_setting(area, width, frequency, max_ma):
    text = minimal(electrode_area_cm2=area, pulse_width_us=width, frequency_hz=frequency, max_ma=max_ma,
                   threshold_ma=0.0)
    if max_ma <= electrode_ma(area, width, frequency) * (1 - 1e-12):
        assert parse_config(text).stimulation[0].max_ma == max_ma
    elif max_ma < electrode_ma(area, width, frequency) * (1 + 1e-12):
        return  # at the limit to rounding: either answer is right
    else:
        refused(text, "stimulation[0].max_ma", max_ma, "electrode limit 2 mA/cm^2 rms")


def test_threshold_above_max_is_refused():
    refused(edit("threshold_ma = 12.0", "threshold_ma = 41.0"), "stimulation[0].threshold_ma", 41.0,
            "motor threshold must be within 0..max_ma (40 mA)")


def test_threshold_equal_to_max_is_accepted():
    assert parse_config(minimal(threshold_ma=40.0, max_ma=40.0)).stimulation[0].threshold_ma == 40.0


def test_duplicate_device_channel_is_refused():
    refused(edit("device_channel = 1", "device_channel = 0"), "stimulation[1].device_channel", 0,
            "each device channel once")


def test_stimulation_of_unknown_muscle_is_refused():
    error = refused(edit('muscle = "tibialis_l"\ndevice_channel', 'muscle = "biceps"\ndevice_channel'),
                    "stimulation[1].muscle", "biceps", "quadriceps_l", "tibialis_l")
    assert re.search(r"must be one of", str(error))


# ---------------------------------------------------------------- frozen


def test_config_objects_are_frozen():
    config = load_config()
    targets = [
        (config, "name", "other"),
        (config.acquisition, "source", "brainflow"),
        (config.acquisition.simulated, "seed", 1),
        (config.controller.filters, "order", 2),
        (config.stimulator, "arm_at_start", False),
        (config.muscles[0], "mvc_uv", 1.0),
        (config.stimulation[0], "max_ma", 130.0),
        (config.stimulation[0].law, "gain", 100.0),
        (config.endpoints, "emg", "tcp://0.0.0.0:1"),
    ]
    for obj, attribute, value in targets:
        before = getattr(obj, attribute)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attribute, value)
        assert getattr(obj, attribute) == before


def test_config_collections_are_immutable():
    config = load_config()
    assert isinstance(config.muscles, tuple)
    assert isinstance(config.stimulation, tuple)
    assert isinstance(config.acquisition.simulated.contractions, tuple)
    assert isinstance(config.controller.filters.bandpass_hz, tuple)
    with pytest.raises(TypeError):
        config.stimulation[0] = config.stimulation[1]  # type: ignore[index]


def test_toml_round_trip_of_demo_matches_tomllib():
    # guards the helpers above: the demo text parses as TOML and edits keep it parseable
    assert tomllib.loads(DEMO)["stimulation"][0]["max_ma"] == 40.0
    assert tomllib.loads(edit("max_ma = 40.0", "max_ma = 41.0"))["stimulation"][0]["max_ma"] == 41.0


# ---------------------------------------------------------------- M-wave measure of the tracking law

MWAVE = (ROOT / "configs" / "tracking_mwave.toml").read_text(encoding="utf-8")


def test_tracking_mwave_config_loads_with_its_measure_and_window():
    config = parse_config(MWAVE)
    law = config.stimulation[0].law
    assert (law.measure, law.target, law.probe_intensity) == ("mwave", ((0.0, 0.6),), 0.9)
    assert (config.controller.mwave.window_start_ms, config.controller.mwave.window_end_ms) == (5.0, 20.0)
    assert parse_config(DEMO).controller.mwave.method == "peak_to_peak"  # defaults elsewhere


@pytest.mark.parametrize(
    "old, new, key, value, allowed",
    [
        ('measure = "mwave"', 'measure = "force"', "stimulation[0].law.measure", "force", "must be one of 'activation', 'mwave'"),
        ("[[0.0, 0.6]]", "[[0.0, 2.5]]", "stimulation[0].law.target", [[0.0, 2.5]], "mwave targets must be within 0..2"),
        ('measure = "mwave", target = [[0.0, 0.6]]', 'measure = "activation", target = [[0.0, 1.2]]',
         "stimulation[0].law.target", [[0.0, 1.2]], "activation targets must be within 0..1"),
        ("probe_intensity = 0.9", "probe_intensity = 0.0", "stimulation[0].law.probe_intensity", 0.0, "above 0 with measure = 'mwave'"),
        ("max_intensity = 1.0 }", "max_intensity = 0.8 }", "stimulation[0].law.probe_intensity", 0.9, "must not exceed max_intensity (0.8)"),
    ],
)
def test_bad_tracking_measure_or_target_is_refused(old, new, key, value, allowed):
    refused(edit(old, new, MWAVE), key, value, allowed)


def test_mwave_target_may_exceed_the_reference():
    config = parse_config(edit("[[0.0, 0.6]]", "[[0.0, 1.6]]", MWAVE))
    assert config.stimulation[0].law.target == ((0.0, 1.6),)  # normalized M-wave: 1 is the reference, more is allowed


@pytest.mark.parametrize(
    "old, new, key, value, allowed",
    [
        ("window_start_ms = 5.0", "window_start_ms = 20.0", "controller.mwave.window_end_ms", 20.0,
         "must be above window_start_ms (20 ms)"),
        ('method = "peak_to_peak"', 'method = "area"', "controller.mwave.method", "area", "'peak_to_peak', 'rms'"),
        ("smoothing_pulses = 5", "smoothing_pulses = 0", "controller.mwave.smoothing_pulses", 0, "within 1..1000 pulses"),
        ("frequency_hz = 30.0", "frequency_hz = 50.0", "controller.mwave.window_end_ms", 20.0,
         "must end before the next pulse of stimulation[0] (20 ms at 50 Hz)"),
    ],
)
def test_bad_mwave_window_is_refused(old, new, key, value, allowed):
    refused(edit(old, new, MWAVE), key, value, allowed)


def test_muscle_mwave_reference_is_checked():
    refused(edit("mvc_uv = 240.0", "mvc_uv = 240.0\nmwave_reference_uv = -5.0", MWAVE), "muscles[0].mwave_reference_uv",
            -5.0, "within 0.0..1000000.0 uV (0 = the fresh M-wave)")


# ---------------------------------------------------------------- names, columns, endpoints


SYNTHETIC = (ROOT / "configs" / "synthetic.toml").read_text(encoding="utf-8")
DEMO_EMG = 'emg = "tcp://127.0.0.1:5601"'


@pytest.mark.parametrize(
    ("old", "new", "key", "value", "allowed"),
    [
        ('name = "tibialis_l"\nmuscle = "tibialis_l"', 'name = "quadriceps_l"\nmuscle = "tibialis_l"',
         "stimulation[1].name", "quadriceps_l", "must be unique and not empty"),  # an override would reset the other
        ('name = "tibialis_l"\nemg_channel', 'name = " "\nemg_channel', "muscles[1].name", " ", "not empty"),
        ("emg_channel = 1", "emg_channel = 0", "muscles[1].emg_channel", 0, "already muscles[0]'s column"),
        ("emg_channel = 1", "emg_channel = 5", "muscles[1].emg_channel", 5, "simulated patient's muscle 1 is column 1"),
        ("post_ms = 20.0", "post_ms = 20.0\nsync_channel = 3", "controller.blanking.sync_channel", 3,
         "no sync column"),
        ("seed = 7", "seed = -1", "acquisition.simulated.seed", -1, "0"),
        (DEMO_EMG, 'emg = "http://127.0.0.1:5601"', "endpoints.emg", "http://127.0.0.1:5601", "tcp://HOST:PORT"),
        (DEMO_EMG, 'emg = "tcp://127.0.0.1:99999"', "endpoints.emg", "tcp://127.0.0.1:99999", "port 1-65535"),
        (DEMO_EMG, 'emg = "tcp://127.0.0.1:5602"', "endpoints.command", "tcp://127.0.0.1:5602", "already the emg endpoint"),
        ('[[muscles]]\nname = "quadriceps_l"',
         '[[acquisition.simulated.faults]]\nkind = "flat"\nstart_s = 1.0\nduration_s = 1.0\nmuscle = "nope"\n\n'
         '[[muscles]]\nname = "quadriceps_l"',
         "acquisition.simulated.faults[0].muscle", "nope", "must be one of"),
    ],
)
def test_inconsistent_names_columns_and_endpoints_are_refused(old, new, key, value, allowed) -> None:
    """Each was accepted and failed later: a crash without the key, a silent stale loop, or
    another channel's dose reset (found in review)."""
    refused(edit(old, new), key, value, allowed)


@pytest.mark.parametrize(("rows", "index", "value"), [("[-1, 2]", 0, -1), ("[1, 1]", 1, 1)])
def test_brainflow_emg_rows_are_row_indices_each_once(rows: str, index: int, value: int) -> None:
    text = edit("emg_channels = []", f"emg_channels = {rows}", SYNTHETIC)
    refused(text, f"acquisition.brainflow.emg_channels[{index}]", value, "a board row index (>= 0), each row once")


@pytest.mark.timeout(10)
def test_a_package_counter_step_must_divide_the_counter_wrap() -> None:
    text = edit("emg_channels = []", "emg_channels = []\npackage_counter_step = 3", SYNTHETIC)
    refused(text, "acquisition.brainflow.package_counter_step", 3, "must divide package_counter_modulo (256)")
    parse_config(edit("emg_channels = []", "emg_channels = []\npackage_counter_step = 4", SYNTHETIC))


def test_a_sync_channel_on_a_muscles_column_is_refused_for_any_source() -> None:
    text = edit("post_ms = 20.0", "post_ms = 20.0\nsync_channel = 1", SYNTHETIC)
    refused(text, "controller.blanking.sync_channel", 1, "is muscles[1]'s EMG column")
    assert parse_config(edit("post_ms = 20.0", "post_ms = 20.0\nsync_channel = 2", SYNTHETIC))
