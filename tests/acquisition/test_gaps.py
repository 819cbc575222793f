"""Gap and duplicate detection from package counters and timestamps (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acquisition.gaps import GapScan, scan_package_counter, scan_stamps, segments, steps_back, without_rows

pytestmark = pytest.mark.timeout(60)


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


def scanned(
    reads: list[list[int]], noise: list[list[float] | None], modulo: int, step: int
) -> tuple[list[int], int]:
    """Feed reads of true indices, as counter values, through the scan like the source does: a row
    arrives when the newest sample so far is taken, plus its noise (None: all rows when the read's
    newest is, plus the last row's noise: a backlog caught up at once), counted in periods after
    the last index handed over. Returns the indices handed over and the duplicates."""
    last, next_index, got, duplicates, seen = None, 0, [], 0, []
    for read, read_noise in zip(reads, noise):
        arrived = None
        if read_noise is not None:
            newest = np.maximum.accumulate(np.array(seen + read))[len(seen):]
            caught_up = [newest[-1] - k + read_noise[-1] if x is None else x for k, x in zip(newest, read_noise)]
            late = np.array(caught_up)
            arrived = newest - (next_index - 1) + late
        counter = [(i * step + 1) % modulo for i in read]
        scan = scan_package_counter(np.array(counter), last, modulo, step, arrived)
        kept = np.arange(len(read)) if scan.keep is None else np.flatnonzero(scan.keep)
        for row_start, row_stop, first, _lost in segments(len(kept), scan, next_index):
            got.extend(range(first, first + row_stop - row_start))
            next_index = first + row_stop - row_start
        duplicates += scan.duplicates
        last = counter[kept[-1]] if len(kept) else last
        seen += read
    return got, duplicates


@st.composite
def transport(draw: st.DrawFn, wrap: int, with_time: bool) -> tuple[list[list[int]], list]:
    """A transport that loses runs of samples, repeats a row and re-sends recent rows (back by
    less than half a counter period), read in pieces. With time: each row's arrival noise against
    the sample clock (at most W/8 early, under 3/8 W late) and losses of any size; or a backlog
    caught up at once (every row but the last: None), with losses under half a counter period, as
    without time."""
    rows, reads, noise = [0], [[0]], [None]  # true indices; the first read has no clock yet
    for _ in range(draw(st.integers(1, 10))):
        caught_up = with_time and draw(st.booleans())
        read: list[int] = []
        for _ in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["run", "lose", "repeat", "resend"]))
            high = max(rows + read)
            if kind == "run":
                read += list(range(high + 1, high + 1 + draw(st.integers(1, 20))))
            elif kind == "lose":
                lost = draw(st.integers(1, 3 * wrap if with_time and not caught_up else wrap // 2 - 1))
                read += list(range(high + 1 + lost, high + 2 + lost + draw(st.integers(0, 5))))
            elif kind == "repeat":
                read.append((rows + read)[-1])
            else:
                recent = [i for i in rows + read if i > high - wrap // 2]
                read += recent[-draw(st.integers(1, len(recent))):]
        late = st.floats(-wrap / 8 + 1, 3 * wrap / 8 - 1)
        if not with_time:
            noise.append(None)
        elif caught_up:
            noise.append([None] * (len(read) - 1) + [draw(late)])
        else:
            noise.append(draw(st.lists(late, min_size=len(read), max_size=len(read))))
        rows += read
        reads.append(read)
    return reads, noise


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from([(256, 1), (256, 2), (64, 1)]), st.booleans())
def test_counter_scan_against_a_reference_transport(data, counter, with_time) -> None:
    """Losses, repeats and re-sent packets, any split into reads: every new sample handed over at its
    true index, every repeat dropped and counted (with the arrival times also after losses of
    whole counter periods, and of more than half of one, which the counter reads as a step back)."""
    modulo, step = counter
    reads, noise = data.draw(transport(modulo // step, with_time))
    got, duplicates = scanned(reads, noise, modulo, step)
    rows = [i for read in reads for i in read]
    new = [i for k, i in enumerate(rows) if k == 0 or i > max(rows[:k])]
    assert got == new
    assert duplicates == len(rows) - len(new)


def test_a_resent_packet_is_dropped_as_duplicates_not_read_as_a_loss() -> None:
    """Counter 0..4 then 0..4 again (fault matrix #7): the repeat is five duplicates; 5 follows 4."""
    scan = scan_package_counter(np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]), None, 256)
    assert scan.duplicates == 5 and scan.gap_rows.size == 0
    assert scan.keep.tolist() == [True] * 5 + [False] * 5 + [True] * 2
    across_reads = scan_package_counter(np.array([2, 3, 4, 5]), 4, 256)  # resent rows end one read, start the next
    assert across_reads.keep.tolist() == [False, False, False, True] and across_reads.gap_rows.size == 0


def test_a_loss_the_counter_reads_as_a_step_back_is_a_loss_when_the_rows_came_that_late() -> None:
    """Index 255 (counter 255), then 250 lost: counters 250, 251 look re-sent (back by 5), but they
    arrived 251 periods on: they are indices 506, 507. Arriving soon, they are re-sent rows."""
    late = scan_package_counter(np.array([250, 251]), 255, 256, arrived=np.array([251.0, 252.0]))
    assert late.keep is None and late.gap_rows.tolist() == [0] and late.gap_sizes.tolist() == [250]
    soon = scan_package_counter(np.array([250, 251]), 255, 256, arrived=np.array([1.0, 1.0]))
    assert soon.duplicates == 2 and not soon.keep.any()


def test_rows_without_a_finite_arrival_are_ignored_after_a_restart() -> None:
    """After a restart, a row stamped NaN (or inf) says nothing of when it came: the gap is how
    late the others came (4 periods), where it raised ValueError."""
    for unknown in (np.nan, np.inf):
        scan = scan_package_counter(np.array([10, 11, 12]), None, 256, arrived=np.array([unknown, 6.0, 7.0]))
        assert scan.gap_rows.tolist() == [0] and scan.gap_sizes.tolist() == [4] and scan.keep is None
    assert scan_package_counter(np.array([10]), None, 256, arrived=np.array([np.nan])).gap_rows.size == 0


def test_a_row_without_a_finite_arrival_neither_hides_nor_splits_a_lost_counter_period() -> None:
    """Counter 8, 9, 10 after 7, the rows 257 periods late: a whole counter period lost before the
    first row, whichever row is stamped NaN (it once made every row count as on time)."""
    for arrived in ([258.0, 259.0, np.nan], [np.nan, 259.0, 260.0], [258.0, np.nan, 260.0]):
        scan = scan_package_counter(np.array([8, 9, 10]), 7, 256, arrived=np.array(arrived))
        assert scan.keep is None and scan.gap_rows.tolist() == [0] and scan.gap_sizes.tolist() == [256], arrived


def test_a_delivery_stall_with_a_continuous_counter_is_no_loss() -> None:
    """Read 150 (or even 220) periods late with the counter going on by one: nothing lost; a read
    ~257 periods on with the same counter step is a whole counter period lost."""
    for late in (150.0, 220.0):
        assert scan_package_counter(np.array([8, 9]), 7, 256, arrived=late + np.zeros(2)).gap_rows.size == 0
    lost = scan_package_counter(np.array([8, 9]), 7, 256, arrived=258.0 + np.zeros(2))
    assert lost.gap_rows.tolist() == [0] and lost.gap_sizes.tolist() == [256]


def test_whole_counter_periods_go_before_the_row_that_came_that_much_late() -> None:
    """Rows 8..11 after 7, the third one 300 periods on: a counter period lost before it."""
    scan = scan_package_counter(np.array([8, 9, 10, 11]), 7, 256, arrived=np.array([1.0, 2.0, 259.0, 260.0]))
    assert scan.gap_rows.tolist() == [2] and scan.gap_sizes.tolist() == [256]


def test_a_backlog_that_catches_up_within_the_read_is_no_loss() -> None:
    """After a 300-period stall, 300 rows arrive at once: only the fresh ones at the end count."""
    counter = np.arange(8, 308) % 256
    scan = scan_package_counter(counter, 7, 256, arrived=np.full(300, 301.0))
    assert scan.gap_rows.size == 0 and scan.keep is None


def test_after_a_restart_the_gap_is_how_late_the_rows_arrived() -> None:
    """No last counter: the first row's gap is how much later than counted the rows arrived, rounded."""
    scan = scan_package_counter(np.array([40, 41, 42]), None, 256, arrived=503.4 + np.zeros(3))
    assert scan.gap_rows.tolist() == [0] and scan.gap_sizes.tolist() == [500]


def test_a_daisy_counter_stepping_by_two_is_contiguous() -> None:
    """CYTON_DAISY: odd sample numbers 1, 3, ... 255, 1: one sample per step of 2; a wrap every 128."""
    counter = (2 * np.arange(300) + 1) % 256
    scan = scan_package_counter(counter, None, 256, step=2)
    assert scan.keep is None and scan.gap_rows.size == 0
    lost = scan_package_counter(np.array([9, 15]), 7, 256, step=2)  # 9 follows 7; 11 and 13 lost
    assert lost.gap_rows.tolist() == [1] and lost.gap_sizes.tolist() == [2]


def test_stamps_later_than_the_clock_by_more_than_the_tolerance_follow_a_gap() -> None:
    """Lateness (periods) per row against the stream's clock, tolerance 1 period: jitter is no gap;
    3.1 periods late after none lost is 3 lost; 10.4 after those is 7 more."""
    scan = scan_stamps(np.array([0.0, 0.3, -0.2, 0.9, 3.1, 3.0, 2.8, 3.9, 10.4, 10.0]), 1.0)
    assert scan.gap_rows.tolist() == [4, 8] and scan.gap_sizes.tolist() == [3, 7]


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(st.floats(0.5, 5.0), st.lists(st.tuples(st.integers(0, 30), st.integers(0, 40)), min_size=1, max_size=20),
       st.randoms(use_true_random=False))
def test_stamp_gaps_at_least_the_tolerance_are_recovered_exactly_through_jitter(tolerance, runs, rnd) -> None:
    """Runs of samples with a loss before each (none, or at least the tolerance + 1/2 periods),
    every stamp off by jitter under half a period: exactly those losses, where they are."""
    late, gap_rows, sizes, lost = [], [], [], 0
    for run, loss in runs:
        loss = loss and loss + int(np.ceil(tolerance + 0.5))
        if loss and run:
            gap_rows.append(len(late))
            sizes.append(loss)
        lost += loss if run else 0
        late += [lost + rnd.uniform(-0.49, 0.49) for _ in range(run)]
    scan = scan_stamps(np.array(late), tolerance)
    assert scan.gap_rows.tolist() == gap_rows and scan.gap_sizes.tolist() == sizes


def test_rows_dropped_from_a_scan_are_samples_lost_before_the_next_row_kept() -> None:
    """Six rows, 2 lost before row 3; rows 1, 3 and 5 dropped: kept rows 0, 2, 4 at indices 10, 12, 16."""
    scan = GapScan(None, np.array([3]), np.array([2]), 0)
    kept = without_rows(scan, np.array([True, False, True, False, True, False]))
    assert segments(3, kept, next_index=10) == [(0, 1, 10, 0), (1, 2, 12, 1), (2, 3, 16, 3)]


def test_timestamps_that_go_back_are_counted() -> None:
    assert steps_back(np.array([1.0, 1.001, 1.0005, 1.002, 1.002]), 0.999) == 1
    assert steps_back(np.array([1.0, 1.001]), 1.5) == 1  # the first against the last of the read before
    assert steps_back(np.array([1.0]), None) == 0


def test_the_arrival_tells_a_duplicate_from_a_loss_of_a_whole_counter_period_less_one() -> None:
    """Counter 10 again: a duplicate when it arrived at once; 255 lost when it arrived 256 periods on."""
    soon = scan_package_counter(np.array([10, 11]), 10, 256, arrived=np.array([0.5, 1.0]))
    assert soon.duplicates == 1 and soon.gap_rows.size == 0
    late = scan_package_counter(np.array([10, 11]), 10, 256, arrived=np.array([256.0, 257.0]))
    assert late.duplicates == 0 and late.gap_rows.tolist() == [0] and late.gap_sizes.tolist() == [255]
