"""The wall -> local clock offset measurement (pure, injected clocks)."""

from __future__ import annotations

import pytest

from acquisition.sample_clock import WallClockWatch
from fesloop.clock import wall_to_local_offset_s

pytestmark = pytest.mark.timeout(30)


class Scripted:
    """A clock reading the given values in turn."""

    def __init__(self, *values_s: float) -> None:
        self.values_s = list(values_s)

    def now(self) -> float:
        return self.values_s.pop(0)


def test_a_preemption_between_the_local_reads_is_measured_again() -> None:
    """Local clock = wall + 1000 s. The first try is preempted 12 ms after its first local read (its
    midpoint 6 ms off); the second, 50 us wide, is kept and the third never taken."""
    local = Scripted(1000.000, 1000.012, 1000.020, 1000.02005, 2000.0)
    wall = Scripted(0.000, 0.020)
    assert wall_to_local_offset_s(local, wall.now) == pytest.approx(1000.000025, abs=1e-9)
    assert local.values_s == [2000.0]


def test_of_three_wide_tries_the_narrowest_is_kept() -> None:
    local = Scripted(1000.0, 1000.012, 1000.020, 1000.022, 1000.030, 1000.040)
    wall = Scripted(0.0, 0.020, 0.030)
    assert wall_to_local_offset_s(local, wall.now) == pytest.approx(1000.001, abs=1e-9)


def test_the_watch_reports_no_step_for_a_preempted_measurement() -> None:
    """Three steady measurements, then one whose first try is preempted 12 ms: no step reported
    (it was reported as +6 ms, then -6 ms)."""
    watch = WallClockWatch()
    steps_s = []
    for k in range(3):
        steps_s.append(watch.update(wall_to_local_offset_s(Scripted(k + 1000.0, k + 1000.0001), Scripted(float(k)).now)))
    preempted = Scripted(1003.0, 1003.012, 1003.013, 1003.0131)
    steps_s.append(watch.update(wall_to_local_offset_s(preempted, Scripted(3.0, 3.013).now)))
    assert steps_s == [0.0, 0.0, 0.0, 0.0]
