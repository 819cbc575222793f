"""Lost and repeated samples, from a wrap-around package counter or from timestamps.

Pure functions over numpy arrays, no I/O. Both detectors report a gap as the row
(of the samples kept) it precedes and the number of samples missing there; the
source then numbers the samples so that the index jumps over the gap and never
fills it.

Counter rule (modulo M): a step s = (c[i] - c[i-1]) mod M means s - 1 samples
were lost, s = 0 that the same sample came again (dropped, counted as a
duplicate). The counter alone cannot see whole counter periods: a loss of M - 1
samples looks like a duplicate, a loss of M + 3 like a loss of 3. With the
samples' timestamps the delay beyond the counter step is rounded to whole
periods and added (``dealias``), which assumes that samples reach the host with
less jitter than half a counter period (128 samples: 128 ms at 1 kHz). A counter
that jumps back by k < M reads as a loss of M - k samples: over-reporting a loss
is the safe side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GapScan:
    """What a detector found in one read: rows to keep, where gaps are and how big."""

    keep: np.ndarray | None  # bool per row read; None = keep all
    gap_rows: np.ndarray  # row (among kept rows) each gap precedes, ascending
    gap_sizes: np.ndarray  # samples missing before that row (>= 1)
    duplicates: int


def scan_package_counter(
    counter: np.ndarray,
    last: int | None,
    modulo: int,
    dealias: tuple[np.ndarray, float | None, float] | None = None,
) -> GapScan:
    """Gaps and duplicates in ``counter`` (one value per sample), continuing from ``last``.

    ``dealias = (stamps_s, last_stamp_s, sampling_rate_hz)`` adds whole counter periods
    that the timestamps show were lost too.
    """
    c = np.asarray(counter).astype(np.int64) % modulo
    previous = np.empty_like(c)
    previous[1:] = c[:-1]
    previous[0] = (c[0] - 1) if last is None else last
    steps = (c - previous) % modulo
    if dealias is not None:
        stamps_s, last_stamp_s, rate_hz = dealias
        stamps_s = np.asarray(stamps_s, dtype=np.float64)
        first_s = stamps_s[0] - 1.0 / rate_hz if last is None or last_stamp_s is None else last_stamp_s
        periods = np.diff(stamps_s, prepend=first_s) * rate_hz
        steps = steps + modulo * np.maximum(np.floor((periods - steps) / modulo + 0.5), 0).astype(np.int64)
    duplicate = steps == 0
    n_duplicates = int(duplicate.sum())
    keep = None
    if n_duplicates:
        keep = ~duplicate
        steps = steps[keep]
    gap_rows = np.flatnonzero(steps > 1)
    return GapScan(keep, gap_rows, steps[gap_rows] - 1, n_duplicates)


def samples_missing(interval_s: float, sampling_rate_hz: float, tolerance: float = 0.5) -> int:
    """Samples missing between two samples ``interval_s`` apart (0 unless the interval
    exceeds one period by more than ``tolerance`` periods)."""
    periods = interval_s * sampling_rate_hz
    if periods <= 1.0 + tolerance:
        return 0
    return max(int(round(periods)) - 1, 1)


def scan_timestamps(
    stamps_s: np.ndarray, last_s: float | None, sampling_rate_hz: float, tolerance: float = 0.5
) -> GapScan:
    """Gaps in regularly sampled timestamps: an interval above (1 + tolerance) periods
    is a gap of round(interval * fs) - 1 samples."""
    stamps_s = np.asarray(stamps_s, dtype=np.float64)
    intervals_s = np.diff(stamps_s, prepend=stamps_s[0] if last_s is None else last_s)
    periods = intervals_s * sampling_rate_hz
    gap_rows = np.flatnonzero(periods > 1.0 + tolerance)
    sizes = np.maximum(np.rint(periods[gap_rows]).astype(np.int64) - 1, 1)
    return GapScan(None, gap_rows, sizes, 0)


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
