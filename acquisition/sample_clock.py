"""Local-clock time of every sample index, fitted to the times the samples were read.

Pure, no I/O. BrainFlow stamps each sample with the host's wall clock when it
arrives; those stamps jump with the wall clock (NTP step, ``date -s``) and jitter
with every delivery. Sample times here come instead from the shared monotonic
clock: each read says that every sample below some index had arrived by the local
time of the read, and a line index -> time is fitted through these (index, read
time) points by a second-order delay-locked loop (F. Adriaensen, "Using a DLL to
filter time", Linux Audio Conference 2005). It follows the amplifier's clock drift
(its true rate differs from the nominal one by up to a few hundred ppm) with zero
steady-state error and smooths the read jitter with its bandwidth. The line is
continuous from one read to the next and never goes back, so chunk times follow
the sample indices.

The line sits at the mean read time of a sample: its acquisition time plus the mean
delivery latency (transport, plus half the read period on average). A read error
beyond ``outlier_s`` pulls the line as if it were ``outlier_s`` (a delivery stall
or a late wake-up does not drag the samples' times); a read earlier than the line
by more than ``early_limit_s`` or later by more than ``late_limit_s`` means the line
no longer fits the indices, and it is anchored again at that read (reported as a
jump). So is a lasting offset: reads beyond ``outlier_s`` on the same side of the line
for ``reanchor_after_s`` and at least ``REANCHOR_READS`` reads (late first reads at
start-up, a step in the delivery latency); the period does not integrate a clipped
pull, so the loop neither winds up nor overshoots. Reads late by less and less (by
more than ``outlier_s`` since the run began: a delivery backlog draining) start the
run again: a backlog draining faster than ``outlier_s`` per ``reanchor_after_s`` (a link
catching up more than 5 % above the nominal rate) is no step in the latency, however
long it takes, and until the reads are back within ``outlier_s`` they do not pull the
line at all. A slower drain is taken for a step (anchored again), and the reads then
come earlier and earlier, as from an amplifier that runs fast: several re-anchors, and
RateOffNominal if they go on.

An amplifier off its nominal rate by more than ``MAX_RATE_ERROR`` cannot be followed:
the fitted period sits at its limit for ``RATE_LIMIT_S``, or the line is anchored again
on the same side ``RATE_REANCHORS`` times, each within ``RATE_REANCHOR_GAP_S`` of the one
before (its error grows on one side: a latency step re-anchors once). ``advance`` then raises
:class:`RateOffNominal` with the rate the reads measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BANDWIDTH_HZ = 0.05
DEFAULT_OUTLIER_S = 0.01
DEFAULT_EARLY_LIMIT_S = 0.1
DEFAULT_LATE_LIMIT_S = 1.0
MAX_OMEGA = 0.5  # loop gain per update, capped after long pauses (the loop stays stable)
MAX_RATE_ERROR = 0.01  # the fitted period stays within 1 % of the nominal one
DEFAULT_REANCHOR_AFTER_S = 0.2  # an error beyond outlier_s on one side this long is a lasting offset
REANCHOR_READS = 3  # ... over at least this many reads
RATE_LIMIT_S = 1.0  # the period at its limit this long: the rate is off
RATE_REANCHORS = 3  # ... or this many re-anchors on the same side,
RATE_REANCHOR_GAP_S = 3.0  # ... each within this long of the one before
WALL_STEP_TOLERANCE_S = 0.005


@dataclass(frozen=True)
class Line:
    """``time_of(i) = time_s + (i - index) * period_s``, valid over one read's indices.

    ``jump_s``: how far the time of ``index`` moved against the previous line (nonzero
    only when the clock was anchored again)."""

    index: int
    time_s: float
    period_s: float
    jump_s: float = 0.0

    def time_of(self, index: int) -> float:
        return self.time_s + (index - self.index) * self.period_s


class RateOffNominal(Exception):
    """The amplifier runs off its nominal rate by more than the loop can follow."""

    def __init__(self, measured_hz: float, nominal_hz: float) -> None:
        super().__init__(
            f"samples arrive at {measured_hz:.1f} Hz, the nominal rate is {nominal_hz:g} Hz "
            f"(beyond {MAX_RATE_ERROR:.0%}): sample times cannot follow"
        )
        self.measured_hz = measured_hz
        self.nominal_hz = nominal_hz


@dataclass(frozen=True)
class _Mark:
    """A read remembered: its stop index, its time, and on which side of the line it was (+1 late, -1 early)."""

    stop_index: int
    read_s: float
    side: int = 0


class SampleClock:
    """Sample index -> local time, advanced once per read that delivered samples."""

    def __init__(
        self,
        sampling_rate_hz: float,
        bandwidth_hz: float = DEFAULT_BANDWIDTH_HZ,
        outlier_s: float = DEFAULT_OUTLIER_S,
        early_limit_s: float = DEFAULT_EARLY_LIMIT_S,
        late_limit_s: float = DEFAULT_LATE_LIMIT_S,
        reanchor_after_s: float = DEFAULT_REANCHOR_AFTER_S,
    ) -> None:
        self.nominal_period_s = 1.0 / sampling_rate_hz
        self.bandwidth_hz = bandwidth_hz
        self.outlier_s = outlier_s
        self.early_limit_s = early_limit_s
        self.late_limit_s = late_limit_s
        self.reanchor_after_s = reanchor_after_s
        self._next: Line | None = None  # through the next index to be read, at the fitted period
        self._beyond: _Mark | None = None  # first read of the current run beyond outlier_s on one side
        self._beyond_reads = 0
        self._beyond_error_s = 0.0  # the error at the first read of the run (or since the lateness last fell)
        self._draining = False  # the late run is a backlog draining: its reads do not pull the line
        self._reanchors: list[_Mark] = []  # the recent re-anchors for a lasting offset, all on one side
        self._at_limit: _Mark | None = None  # first read since the period sits at its limit

    @property
    def period_s(self) -> float:
        """The fitted sample period (the nominal one before the first read)."""
        return self.nominal_period_s if self._next is None else self._next.period_s

    def index_at(self, time_s: float | np.ndarray) -> float | np.ndarray | None:
        """The (fractional) index the line puts at ``time_s`` (or at each); None before the first read."""
        if self._next is None:
            return None
        return self._next.index + (time_s - self._next.time_s) / self._next.period_s

    def advance(self, stop_index: int, read_s: float) -> Line:
        """Every sample below ``stop_index`` had arrived at ``read_s``: the line for the indices
        from the previous ``stop_index`` up to this one (lost ones included), and the loop's update.
        Raises RateOffNominal when the amplifier's rate is beyond the loop's reach (the update is kept)."""
        line = self._next
        if line is None:
            return self._anchor(stop_index, read_s, self.nominal_period_s, 0.0)
        span = stop_index - line.index
        if span <= 0:
            raise ValueError(f"stop_index {stop_index} does not advance past {line.index}")
        error_s = read_s - line.time_of(stop_index - 1)
        if not -self.early_limit_s <= error_s <= self.late_limit_s:
            return self._anchor(stop_index, read_s, line.period_s, error_s)
        if self._lasting_offset(stop_index, read_s, error_s):
            anchored = self._anchor(stop_index, read_s, line.period_s, error_s)
            self._note_reanchor(_Mark(stop_index, read_s, _side(error_s)))
            return anchored
        pull_s = 0.0 if self._draining else min(max(error_s, -self.outlier_s), self.outlier_s)
        omega = min(2.0 * math.pi * self.bandwidth_hz * span * line.period_s, MAX_OMEGA)
        stop_time_s = line.time_of(stop_index) + math.sqrt(2.0) * omega * pull_s
        period_s = line.period_s if pull_s != error_s else line.period_s + omega * omega * pull_s / span
        self._next = Line(stop_index, stop_time_s, self._limited(period_s, stop_index, read_s))
        if self._at_limit and read_s - self._at_limit.read_s >= RATE_LIMIT_S:
            raise RateOffNominal(_rate_hz(self._at_limit, stop_index, read_s), 1.0 / self.nominal_period_s)
        return Line(line.index, line.time_s, (stop_time_s - line.time_s) / span)

    def _lasting_offset(self, stop_index: int, read_s: float, error_s: float) -> bool:
        """Whether this read ends a run beyond outlier_s on one side long enough to re-anchor."""
        side = _side(error_s) if abs(error_s) > self.outlier_s else 0
        draining = side > 0 and self._beyond is not None and error_s < self._beyond_error_s - self.outlier_s
        if side == 0 or self._beyond is None or self._beyond.side != side or draining:
            self._draining = draining or (self._draining and side > 0)
            self._beyond = _Mark(stop_index, read_s, side) if side else None
            self._beyond_reads = 1 if side else 0
            self._beyond_error_s = error_s
            return False
        self._beyond_reads += 1
        if self._beyond_reads < REANCHOR_READS or read_s - self._beyond.read_s < self.reanchor_after_s:
            return False
        self._beyond, self._beyond_reads = None, 0
        return True

    def _note_reanchor(self, mark: _Mark) -> None:
        """Add a re-anchor to the run on its side; raises RateOffNominal once the run is RATE_REANCHORS long."""
        last = self._reanchors[-1] if self._reanchors else None
        if last is None or last.side != mark.side or mark.read_s - last.read_s > RATE_REANCHOR_GAP_S:
            self._reanchors = []
        self._reanchors.append(mark)
        if len(self._reanchors) >= RATE_REANCHORS:
            rate_hz = _rate_hz(self._reanchors[0], mark.stop_index, mark.read_s)
            raise RateOffNominal(rate_hz, 1.0 / self.nominal_period_s)

    def _limited(self, period_s: float, stop_index: int, read_s: float) -> float:
        """``period_s`` within MAX_RATE_ERROR of the nominal period (noting the first read at that limit)."""
        low_s, high_s = self.nominal_period_s * (1 - MAX_RATE_ERROR), self.nominal_period_s * (1 + MAX_RATE_ERROR)
        if low_s < period_s < high_s:
            self._at_limit = None
            return period_s
        self._at_limit = self._at_limit or _Mark(stop_index, read_s)
        return min(max(period_s, low_s), high_s)

    def _anchor(self, stop_index: int, read_s: float, period_s: float, jump_s: float) -> Line:
        """The line through (last index read, ``read_s``) at ``period_s``."""
        last = Line(stop_index - 1, read_s, period_s, jump_s)
        self._next = Line(stop_index, last.time_of(stop_index), period_s)
        return last


def _side(error_s: float) -> int:
    return 1 if error_s > 0 else -1


def _rate_hz(since: _Mark, stop_index: int, read_s: float) -> float:
    """Samples per second delivered from the read ``since`` to this one."""
    return (stop_index - since.stop_index) / (read_s - since.read_s)


class WallClockWatch:
    """The wall-clock -> local-clock offset, measured at every read: a step beyond
    ``tolerance_s`` between two reads (NTP step, ``date -s``) is reported, slewing is not."""

    def __init__(self, tolerance_s: float = WALL_STEP_TOLERANCE_S) -> None:
        self.tolerance_s = tolerance_s
        self.offset_s: float | None = None

    def update(self, offset_s: float) -> float:
        """The step since the last measurement (0.0 within the tolerance or at the first)."""
        previous, self.offset_s = self.offset_s, offset_s
        if previous is None or abs(offset_s - previous) <= self.tolerance_s:
            return 0.0
        return previous - offset_s
