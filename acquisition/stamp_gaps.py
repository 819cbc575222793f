"""Sample indices and times for a stream that has only timestamps (LSL): gaps told from jitter.

Pure, no I/O. The stream's sample clock (:mod:`acquisition.sample_clock`) is fitted
through the last timestamp of every pull; it gives the index -> time line, and each
row's lateness against it: how many periods later than its count from the next
index the line puts its timestamp. A loss of k samples makes every later row k
periods late; jitter makes rows late now and then. So:

- a later row bounds an earlier one (:func:`acquisition.gaps.scan_stamps`): rows an
  outlet stamped one by one as a backlog came in are late, the fresh row after them
  is not, and no gap is claimed;
- the tolerance follows the stream's own jitter: ``JITTER_MARGIN`` times how far the
  rows' distance from the line (less the losses found before them) strays, by the
  larger of two measures (:class:`StampJitter`), each the largest recently (halving
  every ``JITTER_HALF_LIFE_S``), never below the configured one (``gap_tolerance_ms``,
  at least half a period). Rows early by more than the clock's early limit (the
  outlet re-synced: the clock anchors again) do not count, nor does the jump of the
  line when it is anchored again. For the first ``LEARN_S`` of the stream, while
  neither its jitter nor its clock is known, the tolerance is at least
  ``LEARN_TOLERANCE_S``.

What it cannot see is a loss within the tolerance: its rows come late by that much
and the sample clock takes it in (over seconds, or anchored again when it is beyond
the clock's outlier bound), so sample times stay within the tolerance of the stamps;
or it finds it later, where a late push adds to it. One missed loss does not widen
the tolerance; two within seconds do (their steps are the two largest row-to-row
changes), so a third may be missed too until the tolerance halves back. What it takes
for a loss is jitter that starts suddenly, beyond the tolerance: the index moves on,
and the burst's pushes widen the tolerance, so a burst of jitter on a quiet stream
costs a gap or two at its onset, not one per push.
"""

from __future__ import annotations

import numpy as np

from acquisition.gaps import GapScan, scan_stamps
from acquisition.sample_clock import Line, SampleClock
from acquisition.sources import SourceEvent, advance_sample_clock

JITTER_MARGIN = 3.0
MIN_CHANGE = 0.05  # periods: smaller changes (the line's own slope within a chunk) neither go out nor come back
JITTER_HALF_LIFE_S = 10.0
LEARN_S = 2.0
LEARN_TOLERANCE_S = 0.05


class StampJitter:
    """How far the rows' distance from the sample clock's line strays (periods), by two measures,
    each the largest recent value, decaying with time; ``peak`` is the larger:

    - an excursion: a change and the change of opposite sign after it, as large as the smaller of
      the two (jitter comes back at the next push; a missed loss, a step the line then takes in
      slowly, does not; a backlog that builds up over a few pushes and drains at once does);
    - the second-largest change from one row to the next (a lateness that creeps up under small
      noise and drops at once: the noise splits its excursions; an outlet re-syncing its clock).
    """

    def __init__(self, half_life_s: float = JITTER_HALF_LIFE_S) -> None:
        self.half_life_s = half_life_s
        self.excursion = 0.0
        self.changes = np.zeros(2)  # the two largest changes, ascending
        self._last: float | None = None  # the last row's distance
        self._out = 0.0  # the change since the distance last turned (signed)
        self._time_s: float | None = None

    @property
    def peak(self) -> float:
        return max(self.excursion, float(self.changes[0]))

    def update(self, residual: np.ndarray, time_s: float) -> None:
        """Take in one pull: ``residual``, per row, how far from the line it is (periods, > 0 late);
        ``time_s``, the pull's newest timestamp."""
        if self._time_s is not None and time_s > self._time_s:
            decay = 0.5 ** ((time_s - self._time_s) / self.half_life_s)
            self.excursion *= decay
            self.changes *= decay
        self._time_s = time_s if self._time_s is None else max(self._time_s, time_s)
        if residual.size == 0:
            return
        changes = np.diff(residual, prepend=residual[0] if self._last is None else self._last)
        self._last = float(residual[-1])
        self.changes = np.sort(np.concatenate((self.changes, np.abs(changes))))[-2:]
        for change in changes[np.abs(changes) >= MIN_CHANGE].tolist():
            if change * self._out < 0.0:
                self.excursion = max(self.excursion, min(abs(change), abs(self._out)))
                self._out = change
            else:
                self._out += change

    def line_moved(self) -> None:
        """The line was anchored again: the next row's distance is from another line, no change to count."""
        self._last = None
        self._out = 0.0


class StampGaps:
    """Where each pull's rows go: its gaps, and the sample clock's line over its indices."""

    def __init__(self, sampling_rate_hz: float, tolerance_ms: float, name: str) -> None:
        self.sampling_rate_hz = sampling_rate_hz
        self.min_tolerance = max(tolerance_ms * 1e-3 * sampling_rate_hz, 0.5)
        self.name = name
        self.clock = SampleClock(sampling_rate_hz)
        self.jitter = StampJitter()
        self._first_stamp_s: float | None = None
        self._early_limit = self.clock.early_limit_s * sampling_rate_hz  # periods
        self.next_index = 0  # the index the next row gets if no gap comes before it

    @property
    def tolerance(self) -> float:
        """Periods a row may come late without a gap before it."""
        return max(self.min_tolerance, JITTER_MARGIN * self.jitter.peak)

    def _tolerance_at(self, stamp_s: float) -> float:
        if self._first_stamp_s is None:
            self._first_stamp_s = stamp_s
        if stamp_s - self._first_stamp_s < LEARN_S:
            return max(self.tolerance, LEARN_TOLERANCE_S * self.sampling_rate_hz)
        return self.tolerance

    def place(self, stamps_s: np.ndarray, events: list[SourceEvent]) -> tuple[GapScan, Line]:
        """The gaps among a pull's rows (``stamps_s``, one per row, non-empty), and the line for its
        indices from ``next_index`` on (lost ones included); re-anchors go to ``events``."""
        late = self._late(stamps_s)
        scan = scan_stamps(late, self._tolerance_at(float(stamps_s[0])))
        lost = np.zeros(late.size, dtype=np.int64)
        lost[scan.gap_rows] = scan.gap_sizes
        residual = late - np.cumsum(lost)
        self.jitter.update(residual[residual >= -self._early_limit], float(stamps_s[-1]))
        self.next_index += late.size + int(lost.sum())
        line = advance_sample_clock(self.clock, self.next_index, float(stamps_s[-1]), events, self.name)
        if line.jump_s:
            self.jitter.line_moved()
        return scan, line

    def _late(self, stamps_s: np.ndarray) -> np.ndarray:
        """Per row, how many periods later than its count from the next index the sample clock puts
        its timestamp (the first pull: against its first row)."""
        count = np.arange(stamps_s.size)
        expected = self.clock.index_at(stamps_s)
        if expected is None:
            return (stamps_s - stamps_s[0]) * self.sampling_rate_hz - count
        return expected - (self.next_index + count)
