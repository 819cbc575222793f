"""External crank readings: extrapolation, wrap-around, derived cadence, staleness, and the
NO_CRANK gate of cycling channels; the crank config refused where it cannot work."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.crank import CrankTracker
from controller.laws.channels import ChannelLaws
from fesloop.config import parse_config
from fesloop.protocol import GateReason
from fesloop.schema import ConfigError
from tests.conftest import CONFIGS


def test_the_crank_is_extrapolated_at_the_reported_cadence_and_wraps() -> None:
    tracker = CrankTracker(stale_s=0.2)
    assert tracker.state(0.0) is None  # no reading yet
    tracker.add(np.array([10.0]), np.array([350.0]), np.array([50.0]), 10.0)  # 50 rpm = 300 deg/s
    assert tracker.state(10.0).angle_deg == pytest.approx(350.0)
    crank = tracker.state(10.1)
    assert crank.angle_deg == pytest.approx(20.0) and crank.cadence_rpm == 50.0  # 350 + 30, through 0
    assert tracker.state(10.2) is not None and tracker.state(10.2 + 1e-9) is None  # stale after 200 ms


def test_cadence_from_the_angle_alone_across_top_dead_centre() -> None:
    tracker = CrankTracker(stale_s=0.2)
    t = np.arange(0.0, 0.3, 0.01)
    angle = (300.0 + 240.0 * t) % 360.0  # 40 rpm, wraps through 0 at t = 0.25 s
    tracker.add(t, angle, None, t[-1])
    crank = tracker.state(t[-1])
    assert crank.cadence_rpm == pytest.approx(40.0)
    assert crank.angle_deg == pytest.approx(angle[-1])
    backwards = CrankTracker(stale_s=0.2)
    backwards.add(t, (10.0 - 120.0 * t) % 360.0, None, t[-1])  # pedalling backwards through 0 at 20 rpm
    assert backwards.state(t[-1]).cadence_rpm == pytest.approx(-20.0)


def test_readings_not_newer_than_the_last_are_dropped_and_counted() -> None:
    tracker = CrankTracker(stale_s=0.2)
    tracker.add(np.array([1.0, 1.02]), np.array([10.0, 14.8]), np.array([40.0, 40.0]), 1.02)
    tracker.add(np.array([1.01, 1.02]), np.array([90.0, 90.0]), np.array([40.0, 40.0]), 1.02)
    assert tracker.readings == 2 and tracker.out_of_order == 2
    assert tracker.state(1.02).angle_deg == pytest.approx(14.8)


def test_readings_with_a_nan_or_infinity_are_dropped_and_counted() -> None:
    """An encoder dropout sent as NaN must not reach the laws: a NaN angle would open every
    cycling window (and poison a derived cadence for good), a NaN cadence the PI's integral."""
    for cadence in (np.array([30.0, np.nan, 30.0, 30.0]), None):
        tracker = CrankTracker(stale_s=0.2)
        angles = np.array([250.0, np.nan, 255.0, np.inf]) if cadence is None else np.array([250.0, 252.0, 255.0, np.inf])
        tracker.add(np.array([1.0, 1.01, 1.02, 1.03]), angles, cadence, 1.03)
        crank = tracker.state(1.03)
        assert tracker.not_finite == 2 and tracker.readings == 2
        assert math.isfinite(crank.angle_deg) and math.isfinite(crank.cadence_rpm)
        assert crank.angle_deg == pytest.approx(255.0 + crank.cadence_rpm * 6.0 * 0.01)
    stamps = CrankTracker(stale_s=0.2)
    stamps.add(np.array([np.nan, 1.0]), np.array([10.0, 20.0]), np.array([30.0, 30.0]), 1.0)
    assert stamps.not_finite == 1 and stamps.readings == 1


def test_a_reading_stamped_after_it_was_received_is_dropped_and_counted() -> None:
    """DESIGN 3: freshness on the receiver's clock. One reading stamped an hour ahead (an encoder
    app on time.time()) stayed fresh for that hour and every true reading after it was dropped as
    out of order: the crank froze with the cycling gates open."""
    tracker = CrankTracker(stale_s=0.2)
    tracker.add(np.array([1.0]), np.array([10.0]), np.array([30.0]), 1.0)
    tracker.add(np.array([3601.0]), np.array([200.0]), np.array([30.0]), 1.01)
    tracker.add(np.array([1.02]), np.array([13.6]), np.array([30.0]), 1.02)
    assert tracker.future == 1 and tracker.readings == 2 and tracker.out_of_order == 0
    assert tracker.state(1.02).angle_deg == pytest.approx(13.6)
    assert tracker.state(1.3) is None  # no reading since 1.02: stale (it was never)


def test_staleness_is_also_judged_by_when_a_reading_was_received() -> None:
    tracker = CrankTracker(stale_s=0.2)
    tracker.add(np.array([1.04]), np.array([10.0]), np.array([30.0]), 1.0)  # stamped 40 ms ahead: within sync error
    assert tracker.state(1.2) is not None and tracker.state(1.2 + 1e-6) is None


def lsl_cycling_config() -> str:
    text = (CONFIGS / "cycling_arm.toml").read_text()
    return text.replace("[controller.ergometer]", '[controller.crank]\nsource = "lsl"\ntype = "Crank"\n\n[controller.ergometer]')


def test_cycling_gates_close_with_no_crank_until_a_reading_and_after_it_goes_stale() -> None:
    config = parse_config(lsl_cycling_config())
    laws = ChannelLaws(config)
    n = len(config.stimulation)
    assert laws.ergometer is None and laws.tracker is not None

    def gates(now_s: float) -> list[GateReason]:
        reason = np.full(n, GateReason.OPEN, dtype=np.uint8)
        laws.advance_crank(now_s)
        laws.crank_gates(reason)
        return [GateReason(r) for r in reason]

    assert gates(0.0) == [GateReason.NO_CRANK] * n
    laws.add_crank(np.array([0.5]), np.array([0.0]), np.array([30.0]), 0.5)
    assert gates(0.6) == [GateReason.OPEN] * n
    stale_s = config.controller.crank.stale_ms * 1e-3
    assert gates(0.5 + stale_s + 1e-6) == [GateReason.NO_CRANK] * n
    closed = np.full(n, GateReason.STALE_EMG, dtype=np.uint8)
    laws.crank_gates(closed)
    assert (closed == GateReason.STALE_EMG).all()  # a gate closed for another reason keeps it


def test_crank_configs_that_cannot_work_are_refused_naming_the_key() -> None:
    motomed = (CONFIGS / "cycling_motomed.toml").read_text().replace('driver = "rehastim2"', 'driver = "simulated"')
    with pytest.raises(ConfigError, match=r"controller.crank.source = 'motomed': needs stimulator.driver = 'rehastim2'"):
        parse_config(motomed)
    no_query = lsl_cycling_config().replace('type = "Crank"', 'type = ""')
    with pytest.raises(ConfigError, match="controller.crank.*set at least one of name, type, source_id"):
        parse_config(no_query)
    with pytest.raises(ConfigError, match="controller.crank.cadence_channel = -2"):
        parse_config(lsl_cycling_config().replace('type = "Crank"', 'type = "Crank"\ncadence_channel = -2'))
