"""Gap and duplicate detection from package counters and timestamps (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acquisition.gaps import samples_missing, scan_package_counter, scan_timestamps, segments


def test_counter_gap_across_the_wrap_is_counted_exactly() -> None:
    counter = np.array([250, 251, 252, 2, 3, 4, 10])  # 253..255, 0, 1 lost; then 5..9
    scan = scan_package_counter(counter, last=249, modulo=256)
    assert scan.keep is None and scan.duplicates == 0
    assert scan.gap_rows.tolist() == [3, 6]
    assert scan.gap_sizes.tolist() == [5, 5]
    assert segments(7, scan, next_index=100) == [(0, 3, 100, 0), (3, 6, 108, 5), (6, 7, 116, 5)]


def test_gap_before_the_first_row_of_a_read() -> None:
    scan = scan_package_counter(np.array([7, 8]), last=3, modulo=256)
    assert scan.gap_rows.tolist() == [0] and scan.gap_sizes.tolist() == [3]
    assert segments(2, scan, next_index=10) == [(0, 2, 13, 3)]


def test_repeated_counter_is_a_duplicate_dropped_not_a_gap() -> None:
    scan = scan_package_counter(np.array([5, 5, 6, 7, 7, 7, 8]), last=4, modulo=256)
    assert scan.duplicates == 3
    assert scan.keep.tolist() == [True, False, True, True, False, False, True]
    assert scan.gap_rows.size == 0


def test_first_read_without_history_has_no_gap() -> None:
    scan = scan_package_counter(np.array([77, 78]), last=None, modulo=256)
    assert scan.gap_rows.size == 0 and scan.duplicates == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 254), min_size=1, max_size=40),  # losses between delivered samples (< modulo)
    st.integers(0, 255),
    st.lists(st.integers(1, 30), min_size=1, max_size=10),
)
def test_counter_losses_are_recovered_exactly_whatever_the_reads(losses, start, reads) -> None:
    """Delivered sample k has true index sum(losses[:k]) + k; any split into reads gives it back."""
    true_index = np.cumsum(np.array(losses)) + np.arange(len(losses)) + start
    counter = true_index % 256
    last, next_index, got = None, int(true_index[0]), []
    position, r = 0, 0
    while position < len(counter):
        part = counter[position : position + reads[r % len(reads)]]
        scan = scan_package_counter(part, last, 256)
        for row_start, row_stop, first, _lost in segments(len(part), scan, next_index):
            got.extend(range(first, first + row_stop - row_start))
            next_index = first + row_stop - row_start
        last, position, r = int(part[-1]), position + len(part), r + 1
    assert got == true_index.tolist()


def test_timestamp_gaps() -> None:
    fs_hz = 1000.0
    stamps_s = 5.0 + np.array([0, 1, 2, 5, 6, 6.9, 8.1, 20]) / fs_hz  # 2 lost, jitter, then 11 lost
    scan = scan_timestamps(stamps_s, last_s=5.0 - 1 / fs_hz, sampling_rate_hz=fs_hz)
    assert scan.gap_rows.tolist() == [3, 7]
    assert scan.gap_sizes.tolist() == [2, 11]


@pytest.mark.parametrize(("interval_ms", "missing"), [(1.0, 0), (1.4, 0), (1.6, 1), (2.0, 1), (3.0, 2), (10.2, 9)])
def test_samples_missing(interval_ms: float, missing: int) -> None:
    assert samples_missing(interval_ms * 1e-3, 1000.0) == missing


def test_timestamps_tell_a_duplicate_from_a_loss_of_a_whole_counter_period() -> None:
    fs_hz = 1000.0
    counter = np.array([10, 10, 10, 11, 20])
    # second 10: same time (a duplicate); third 10: 256 periods later (255 lost); 20: 9 + 512 lost
    stamps_s = np.array([0.0, 0.0, 0.256, 0.257, 0.257 + 521 / fs_hz])
    scan = scan_package_counter(counter, last=9, modulo=256, dealias=(stamps_s, -0.001, fs_hz))
    assert scan.duplicates == 1
    assert scan.gap_rows.tolist() == [1, 3] and scan.gap_sizes.tolist() == [255, 8 + 512]
    jittered = np.array([0.0, 0.0, 0.1, 0.1, 0.1])  # 100 ms late arrivals are not a lost period
    assert scan_package_counter(np.array([10, 11, 12, 13, 14]), 9, 256, (jittered, -0.001, fs_hz)).gap_rows.size == 0
