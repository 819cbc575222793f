"""Lost and repeated samples, from a wrap-around package counter or from timestamps.

Pure functions over numpy arrays, no I/O. Both detectors report a gap as the row
(of the samples kept) it precedes and the number of samples missing there; the
source then numbers the samples so that the index jumps over the gap and never
fills it.

Counter rule: the counter advances by ``step`` per sample modulo ``modulo``, so it
wraps every W = modulo / step samples. Against the row before, a row that is

- ahead by d = 1 .. W/2 samples follows d - 1 lost samples;
- ahead by 0 (the same counter again) or behind by 1 .. W/2 - 1 (the counter
  stepped back: a re-sent packet) repeats a sample already handed over: it is
  dropped and counted as a duplicate, and so is every row after it until the
  counter passes the highest value seen.

The counter cannot see whole counter periods lost, nor tell a step back by k from
a loss of W - k samples. The time can: ``arrived`` gives, per row, how many sample
periods after the last sample kept the row arrived (by the sample clock). A row
that arrived n counter periods later than its counter says, n = floor((arrived -
counted) / W + 1/8), is n * W samples further on; a later row bounds an earlier
one (a backlog that catches up within the read counts as the fresh rows at its end
say, and re-sent rows, which arrive late for their count, never lower it). A row
may arrive W / 8 periods earlier than the sample clock expects. A delivery backlog
under 7/8 W is never taken for a lost period (at 1 kHz with W = 256: a stall up to
224 ms with a continuous counter is no loss), and a re-sent packet back by k is
never taken for a loss while the backlog stays under 7/8 W - k (3/8 W for any k).
The scan says how many of the samples it finds lost are such whole periods
(``periods_lost``): a backlog delivered over several reads looks like them until
its fresh rows come, so the source holds those rows back a while to see (see
:mod:`acquisition.brainflow_source`).
After a restart (no last counter) the gap before the first row is how much later
than counted the rows arrived (the least of them, rounded to periods). A row whose
arrival is not finite (BrainFlow stamped it NaN) says nothing: it is ignored; so is a
row that arrived more than W / 8 periods earlier than the sample clock allows (its
stamp is off: the wall clock stepped within the read), which would bound the rows
before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WRAP_TOLERANCE = 0.125  # of a counter period (W): how much earlier than the sample clock expects a row may arrive


@dataclass(frozen=True)
class GapScan:
    """What a detector found in one read: rows to keep, where gaps are and how big."""

    keep: np.ndarray | None  # bool per row read; None = keep all
    gap_rows: np.ndarray  # row (among kept rows) each gap precedes, ascending
    gap_sizes: np.ndarray  # samples missing before that row (>= 1)
    duplicates: int
    periods_lost: int = 0  # of gap_sizes, samples in whole counter periods found from arrival times


def scan_package_counter(
    counter: np.ndarray, last: int | None, modulo: int, step: int = 1, arrived: np.ndarray | None = None
) -> GapScan:
    """Gaps and duplicates in ``counter`` (one value per row), continuing from ``last``, the
    counter of the last sample kept (None: no reference, e.g. after a restart); ``arrived``:
    per row, sample periods after the last sample kept that it arrived (None: no clock yet)."""
    wrap = modulo // step
    c = np.asarray(counter).astype(np.int64)
    previous = np.empty_like(c)
    previous[1:] = c[:-1]
    previous[0] = c[0] - step if last is None else last
    moves = ((c - previous) % modulo) // step
    moves[moves > wrap // 2] -= wrap
    position = np.cumsum(moves)  # samples after the last one kept, as the counter says
    periods_lost = 0
    if arrived is not None:
        missed = _missed_by_the_counter(np.asarray(arrived, dtype=np.float64) - position, last is None, wrap)
        position += missed
        periods_lost = 0 if last is None else int(np.max(missed))
    kept = position > np.maximum.accumulate(np.concatenate(([0], position[:-1])))
    steps = np.diff(position[kept], prepend=0)
    gap_rows = np.flatnonzero(steps > 1)
    return GapScan(None if kept.all() else kept, gap_rows, steps[gap_rows] - 1, int(c.size - steps.size), periods_lost)


def _missed_by_the_counter(late: np.ndarray, no_reference: bool, wrap: int) -> np.ndarray | int:
    """Samples before each row that its counter cannot show, from how many periods ``late`` (than
    counted) it arrived: whole counter periods, or after a restart the least lateness, rounded."""
    known = np.isfinite(late) & (late >= -WRAP_TOLERANCE * wrap)  # else its time says nothing of its arrival
    if no_reference:
        return max(int(np.rint(late[known].min())), 0) if known.any() else 0
    periods = np.where(known, np.floor(late / wrap + WRAP_TOLERANCE), np.inf)
    bound = np.minimum.accumulate(periods[::-1])[::-1]  # a later row bounds an earlier one
    bounded = np.isfinite(bound)  # rows after the last known one: as many periods as it
    bound = np.where(bounded, bound, bound[bounded].max() if bounded.any() else 0)
    return wrap * np.maximum(bound, 0).astype(np.int64)


def scan_stamps(late: np.ndarray, tolerance: float) -> GapScan:
    """Gaps in a stream without a counter, from its rows' timestamps against its sample clock:
    ``late``, per row, how many periods later than its count from the next index the clock puts
    it. A later row bounds an earlier one (a loss makes every row after it late, jitter does not),
    so a row whose bound is later than ``tolerance`` periods (>= 0.5) beyond the samples already
    found lost follows round(bound) - (those) more lost samples; jitter within it is no gap."""
    bound = np.minimum.accumulate(late[::-1])[::-1]
    gap_rows: list[int] = []
    sizes: list[int] = []
    lost = 0
    row = -1
    while (over := np.flatnonzero(bound[row + 1 :] > lost + tolerance)).size:
        row += 1 + int(over[0])
        size = int(np.rint(bound[row])) - lost
        gap_rows.append(row)
        sizes.append(size)
        lost += size
    return GapScan(None, np.array(gap_rows, dtype=np.int64), np.array(sizes, dtype=np.int64), 0)


def without_rows(scan: GapScan, keep: np.ndarray) -> GapScan:
    """The scan of the rows ``keep`` leaves (a scan without dropped rows): each row dropped is one
    more sample lost before the next row kept."""
    lost = np.zeros(keep.size, dtype=np.int64)
    lost[scan.gap_rows] = scan.gap_sizes
    steps = np.diff(np.cumsum(lost + 1)[keep], prepend=0)
    gap_rows = np.flatnonzero(steps > 1)
    return GapScan(None, gap_rows, steps[gap_rows] - 1, scan.duplicates)


def steps_back(stamps_s: np.ndarray, previous_s: float | None) -> int:
    """How many timestamps are earlier than the one before (``previous_s``: the last of the read before)."""
    return int(np.count_nonzero(np.diff(stamps_s, prepend=stamps_s[0] if previous_s is None else previous_s) < 0))


def lost_counted_from(parts: list[tuple[int, int, int, int]], handed_stop: int) -> list[tuple[int, int, int, int]]:
    """``parts`` (from :func:`segments`) with the first one's lost samples counted from ``handed_stop``,
    the index after the last sample handed over: samples dropped at the end of an earlier read count too."""
    if not parts:
        return parts
    start, stop, index, _ = parts[0]
    return [(start, stop, index, index - handed_stop), *parts[1:]]


def segments(n_rows: int, scan: GapScan, next_index: int) -> list[tuple[int, int, int, int]]:
    """Split ``n_rows`` kept rows at the gaps: (row_start, row_stop, first_sample_index,
    samples lost just before), in order; the index jumps over each gap."""
    bounds = [0, *scan.gap_rows.tolist(), n_rows]
    lost = [0, *scan.gap_sizes.tolist()]
    out: list[tuple[int, int, int, int]] = []
    index = next_index
    for start, stop, lost_before in zip(bounds[:-1], bounds[1:], lost):
        index += lost_before
        if stop > start:
            out.append((start, stop, index, lost_before))
        index += stop - start
    return out
