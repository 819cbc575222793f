"""RehaStim2 channel-list timing from the channel configs, and the rehastim2 config checks at load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fesloop.config import StimulationChannel, parse_config
from fesloop.schema import ConfigError
from stimulator.channel_list import plan_channel_list
from stimulator.limits import LimitError, electrode_limit_ma

BASE = StimulationChannel(
    name="quad", muscle="quad", device_channel=0, electrode_area_cm2=25.0,
    threshold_ma=12.0, max_ma=40.0, pulse_width_us=300.0, frequency_hz=30.0,
)  # fmt: skip


def ch(device_channel: int, frequency_hz: float) -> StimulationChannel:
    return dataclasses.replace(BASE, name=f"c{device_channel}", device_channel=device_channel, frequency_hz=frequency_hz)


@pytest.mark.parametrize(
    ("frequency_hz", "code", "period_ms"),
    [(50.0, 38, 20.0), (40.0, 48, 25.0), (30.0, 65, 33.5), (20.0, 98, 50.0), (1.0, 1998, 1000.0)],
)
def test_main_interval_is_rounded_up_so_frequency_never_exceeds_the_config(frequency_hz, code, period_ms) -> None:
    plan = plan_channel_list([ch(0, frequency_hz)])
    assert plan.init.main_interval_code == code and plan.period_s * 1e3 == pytest.approx(period_ms)
    assert plan.frequency_hz()[0] <= frequency_hz
    assert plan.init.inter_pulse_ms == 8.0 and plan.init.low_frequency_factor == 0


def test_slots_follow_device_channel_order_and_low_frequency_channels_skip() -> None:
    plan = plan_channel_list([ch(5, 10.0), ch(0, 40.0), ch(2, 10.0)])
    assert plan.init.active_mask == 0b100101 and plan.init.low_frequency_mask == 0b100100
    assert plan.init.low_frequency_factor == 3
    np.testing.assert_allclose(plan.offset_s, [0.003, 0.0, 0.0015])
    assert plan.every_n_lists.tolist() == [4, 1, 4]
    np.testing.assert_allclose(plan.frequency_hz(), [10.0, 40.0, 10.0])


@pytest.mark.parametrize("frequencies", [[30.0, 25.0], [40.0, 20.0, 10.0], [50.0, 5.0]])
def test_frequencies_the_channel_list_cannot_make_are_refused(frequencies) -> None:
    with pytest.raises(LimitError, match="RehaStim2 channel list"):
        plan_channel_list([ch(i, f) for i, f in enumerate(frequencies)])


def test_actual_frequency_keeps_the_electrode_limit() -> None:
    for f in np.linspace(1.0, 50.0, 99):
        actual = plan_channel_list([ch(0, float(f))]).frequency_hz()[0]
        assert electrode_limit_ma(25.0, 300.0, actual) >= electrode_limit_ma(25.0, 300.0, float(f))


RIG = """
[[muscles]]
name = "quad"
emg_channel = 0
rest_uv = 3.0
mvc_uv = 240.0

[[stimulation]]
name = "quad"
muscle = "quad"
device_channel = 0
electrode_area_cm2 = 25.0
threshold_ma = 12.0
max_ma = 40.0
pulse_width_us = 300.0
frequency_hz = 30.0
modulation = "pulse_width"

[[stimulation]]
name = "tib"
muscle = "quad"
device_channel = 1
electrode_area_cm2 = 25.0
threshold_ma = 12.0
max_ma = 40.0
pulse_width_us = 300.0
frequency_hz = FREQ

[stimulator]
driver = "rehastim2"
serial_port = "/dev/ttyUSB0"
"""


def test_rehastim2_config_loads() -> None:
    config = parse_config(RIG.replace("FREQ", "15.0"))
    assert config.stimulator.serial_port == "/dev/ttyUSB0" and config.stimulation[0].modulation == "pulse_width"


def test_rehastim2_frequency_mismatch_refused_at_load_naming_the_channel() -> None:
    with pytest.raises(ConfigError, match=r"stimulation\[1\].frequency_hz = 25.0: RehaStim2 channel list"):
        parse_config(RIG.replace("FREQ", "25.0"))


def test_rehastim2_needs_a_serial_port_and_never_arms_at_start() -> None:
    with pytest.raises(ConfigError, match="stimulator.serial_port.*needs its serial port"):
        parse_config(RIG.replace("FREQ", "30.0").replace('serial_port = "/dev/ttyUSB0"', ""))
    with pytest.raises(ConfigError, match="only the simulated driver may arm at start"):
        parse_config(RIG.replace("FREQ", "30.0") + "arm_at_start = true\n")


def test_unknown_modulation_refused() -> None:
    with pytest.raises(ConfigError, match="modulation"):
        parse_config(RIG.replace("FREQ", "30.0").replace('"pulse_width"', '"frequency"'))
