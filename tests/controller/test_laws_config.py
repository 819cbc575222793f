"""Law tables in the config: chosen by ``kind``, and a wrong table names the law's own key."""

from __future__ import annotations

import pytest

from fesloop.config import CyclingLaw, ProportionalLaw, TrackingLaw, TriggeredLaw, parse_config
from tests.fesloop.test_config import minimal, refused

LAW_TEXTS = {
    "proportional": "{ gain = 2.0 }",
    "triggered": '{ kind = "triggered", on_threshold = 0.3 }',
    "tracking": '{ kind = "tracking", target = [[0.0, 0.0], [2.0, 0.3]] }',
    "cycling": '{ kind = "cycling", window_deg = [300.0, 60.0], offset_deg = 180.0 }',
}


def with_law(law: str) -> str:
    return minimal() + f"law = {law}\n"


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("proportional", ProportionalLaw), ("triggered", TriggeredLaw), ("tracking", TrackingLaw), ("cycling", CyclingLaw)],
)
def test_law_kind_selects_the_table(kind: str, cls: type) -> None:
    law = parse_config(with_law(LAW_TEXTS[kind])).stimulation[0].law
    assert type(law) is cls


@pytest.mark.parametrize(
    ("law", "key", "value", "allowed"),
    [
        ('{ kind = "pid" }', "stimulation[0].law.kind", "pid", "must be one of 'proportional', 'triggered', 'tracking', 'cycling'"),
        ('{ kind = ["triggered"] }', "stimulation[0].law.kind", ["triggered"], "must be one of"),
        ('{ kind = "triggered", ramp_s = 1.0 }', "stimulation[0].law.ramp_s", 1.0, "unknown key; allowed keys here: intensity"),
        ('{ kind = "triggered", rest_s = -1.0 }', "stimulation[0].law.rest_s", -1.0, "must be within 0.0..3600.0 s"),
        ('{ kind = "triggered", on_threshold = 0.1, off_threshold = 0.2 }', "stimulation[0].law.off_threshold", 0.2,
         "must not exceed on_threshold (0.1)"),
        ('{ kind = "tracking" }', "stimulation[0].law.target", None, "required key is missing"),
        ('{ kind = "tracking", target = [[1.0, 0.2]] }', "stimulation[0].law.target", [[1.0, 0.2]], "times must start at 0"),
        ('{ kind = "tracking", target = [[0.0, 0.2], [1.0]] }', "stimulation[0].law.target[1]", [1.0], "a list of 2 values"),
        ('{ kind = "cycling", window_deg = [300.0, 300.0] }', "stimulation[0].law.window_deg", [300.0, 300.0],
         "start and end must differ"),
        ('{ kind = "cycling", window_deg = [350.0, 20.0], ramp_deg = 20.0 }', "stimulation[0].law.ramp_deg", 20.0,
         "two ramps must fit in the 30 deg window"),
        ('{ kind = "cycling", window_deg = [0.0, 400.0] }', "stimulation[0].law.window_deg", (0.0, 400.0), "0.0..360.0 deg"),
        ("{ gain = 1.0, target = [[0.0, 0.2]] }", "stimulation[0].law.target", [[0.0, 0.2]],
         "unknown key; allowed keys here: deadband"),
    ],
)
def test_wrong_law_table_names_the_key(law: str, key: str, value, allowed: str) -> None:
    refused(with_law(law), key, value, allowed)
