"""Reused work arrays: the layout the estimator relies on, growth, and rings across the wrap."""

from __future__ import annotations

import numpy as np
import pytest

from controller.buffers import Columns, RepeatedRow, RowIndex, Rows, column_steps, fill_ring, ramp, read_ring, write_ring


def test_columns_are_channel_contiguous_reused_and_grow_only_for_a_bigger_chunk() -> None:
    columns = Columns(3)
    block = columns(5)
    assert block.shape == (5, 3) and block.T.flags.c_contiguous  # what the SOS kernel takes
    block[:] = 7.0
    again = columns(4)
    assert np.shares_memory(again, block)  # the same storage, no allocation
    bigger = columns(9)
    assert bigger.shape == (9, 3) and bigger.T.flags.c_contiguous and not np.shares_memory(bigger, block)


def test_rows_row_index_and_ramp() -> None:
    rows = Rows(dtype=bool)
    assert rows(6).shape == (6,) and np.shares_memory(rows(3), rows(6))
    index = RowIndex(2)(4)
    np.testing.assert_array_equal(index, [[0, 0], [1, 1], [2, 2], [3, 3]])
    np.testing.assert_array_equal(ramp(3, 7), [3, 4, 5, 6])
    with pytest.raises(ValueError):
        ramp(0, 3)[0] = 1  # shared: read-only


def test_repeated_row_in_the_columns_layout_read_only_and_growing() -> None:
    repeated = RepeatedRow(np.array([1.5, -2.0, np.inf]))
    block = repeated(3)
    np.testing.assert_array_equal(block, [[1.5, -2.0, np.inf]] * 3)
    assert block.strides[0] == block.itemsize and np.shares_memory(repeated(2), block)  # each channel's run contiguous
    np.testing.assert_array_equal(repeated(9), [[1.5, -2.0, np.inf]] * 9)
    with pytest.raises(ValueError):
        block[0, 0] = 0.0  # shared: read-only


def test_column_steps_per_channel_with_the_previous_sample() -> None:
    x = Columns(2)(3)
    x[:] = [[1.0, 10.0], [4.0, 20.0], [9.0, 25.0]]
    out = Columns(2)(3)
    column_steps(x, np.array([0.0, 5.0]), out)
    np.testing.assert_array_equal(out, [[1.0, 5.0], [3.0, 10.0], [5.0, 5.0]])
    flags, changed = Columns(1, dtype=bool)(3), Columns(1, dtype=bool)(3)
    flags[:, 0] = [True, True, False]
    column_steps(flags, np.array([False]), changed, np.not_equal)
    np.testing.assert_array_equal(changed[:, 0], [True, False, True])


def test_rings_store_and_read_back_across_the_wrap() -> None:
    ring = np.zeros((5, 2))
    block = np.arange(8.0).reshape(4, 2)
    write_ring(ring, 13, block)  # rows 13..16 -> ring rows 3, 4, 0, 1
    np.testing.assert_array_equal(read_ring(ring, 13, np.empty((4, 2))), block)
    np.testing.assert_array_equal(ring[2], [0.0, 0.0])  # untouched
    fill_ring(ring, 14, 3, -1.0)  # ring rows 4, 0, 1
    np.testing.assert_array_equal(ring[[4, 0, 1], 0], [-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(ring[3], block[0])
