"""Work arrays reused from chunk to chunk, so the per-sample path allocates no array data.

A stage asks for the first ``n`` rows it needs and gets a view of storage that only
grows (to the next power of two) the first time a bigger chunk comes; in the live
loop chunks have one size, so after the first chunk nothing is allocated. Arrays
handed out are overwritten by the stage's next call: copy what must be kept.
"""

from __future__ import annotations

import numpy as np


def _capacity_for(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Rows:
    """``rows(n)``: the first ``n`` rows of a reused (capacity, *tail) array."""

    def __init__(self, *tail: int, dtype: type | np.dtype = np.float64) -> None:
        self._tail = tail
        self._dtype = dtype
        self._store = np.empty((0, *tail), dtype=dtype)

    def __call__(self, n: int) -> np.ndarray:
        if n > len(self._store):
            self._store = np.empty((_capacity_for(n), *self._tail), dtype=self._dtype)
        return self._store[:n]


class Columns:
    """``columns(n)``: a reused (n, n_channels) array whose columns are contiguous.

    Every per-sample (samples, channels) array of the estimator has this layout: the
    SOS kernel wants each channel's samples contiguous (``.T`` is its C-contiguous
    input), and numpy runs element-wise operations between arrays of one layout and
    dtype without a buffer of its own; mixing layouts or dtypes, or broadcasting an
    array, makes it allocate up to 8192 elements per call.
    """

    def __init__(self, n_channels: int, dtype: type | np.dtype = np.float64) -> None:
        self._n_channels = n_channels
        self._dtype = dtype
        self._flat = np.empty(0, dtype=dtype)

    def __call__(self, n: int) -> np.ndarray:
        size = self._n_channels * n
        if size > len(self._flat):
            self._flat = np.empty(self._n_channels * _capacity_for(n), dtype=self._dtype)
        return self._flat[:size].reshape(self._n_channels, n).T


class RowIndex:
    """``index(n)``: read-only (n, n_channels) int64 whose row i is all i, in the :class:`Columns` layout."""

    def __init__(self, n_channels: int) -> None:
        self._n_channels = n_channels
        self._values = np.empty((0, n_channels), dtype=np.int64)

    def __call__(self, n: int) -> np.ndarray:
        if n > len(self._values):
            capacity = _capacity_for(n)
            values = np.empty((self._n_channels, capacity), dtype=np.int64).T
            values[:] = ramp(0, capacity)[:, np.newaxis]
            values.flags.writeable = False
            self._values = values
        return self._values[:n]


class RepeatedRow:
    """``repeated(n)``: read-only (n, n_channels) whose every row is ``row``, in the :class:`Columns` layout.

    For comparing a block against per-channel values: numpy broadcasts a 1-D row
    through a buffer of its own (allocated per call); a full array of the same layout needs none.
    """

    def __init__(self, row: np.ndarray) -> None:
        self._row = np.array(row)
        self._values = np.empty((0, len(self._row)), dtype=self._row.dtype)

    def __call__(self, n: int) -> np.ndarray:
        if n > len(self._values):
            values = np.empty((len(self._row), _capacity_for(n)), dtype=self._row.dtype).T
            values[:] = self._row
            values.flags.writeable = False
            self._values = values
        return self._values[:n]


def column_steps(x: np.ndarray, previous: np.ndarray, out: np.ndarray, op: np.ufunc = np.subtract) -> None:
    """``out[t] = op(x[t], x[t - 1])`` per channel, ``previous`` standing for ``x[-1]``.

    ``x`` and ``out`` in the :class:`Columns` layout: computed on the channels laid end
    to end (one contiguous run, so numpy needs no buffer), then each channel's first
    entry is set from ``previous``. ``op=np.not_equal`` marks changes of a boolean.
    """
    flat_x, flat_out = np.reshape(x.T, -1, copy=False), np.reshape(out.T, -1, copy=False)
    op(flat_x[1:], flat_x[:-1], out=flat_out[1:])
    op(x[0], previous, out=out[0])


class _Ramp:
    """Read-only views of one growing ``arange``: sample offsets without allocating them per chunk."""

    def __init__(self) -> None:
        self._values = np.arange(0, dtype=np.int64)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if stop > len(self._values):
            self._values = np.arange(_capacity_for(stop), dtype=np.int64)
            self._values.flags.writeable = False
        return self._values[start:stop]


ramp = _Ramp()
"""``ramp(start, stop)``: the integers [start, stop) as a read-only int64 view."""


def _ring_split(ring: np.ndarray, start: int, n: int) -> tuple[int, int]:
    """Where absolute row ``start`` sits in ``ring``, and how many of ``n`` rows fit before the wrap."""
    at = start % len(ring)
    return at, min(n, len(ring) - at)


def write_ring(ring: np.ndarray, start: int, block: np.ndarray) -> None:
    """Store ``block`` (at most ``len(ring)`` rows) at absolute row ``start`` of a ring (row index mod length)."""
    n = len(block)
    at, first = _ring_split(ring, start, n)
    ring[at : at + first] = block[:first]
    ring[: n - first] = block[first:]


def read_ring(ring: np.ndarray, start: int, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` with the ring's rows from absolute row ``start``; returns ``out``."""
    n = len(out)
    at, first = _ring_split(ring, start, n)
    out[:first] = ring[at : at + first]
    out[first:] = ring[: n - first]
    return out


def fill_ring(ring: np.ndarray, start: int, n: int, value: float) -> None:
    """Set ``n`` rows (at most ``len(ring)``) of a ring from absolute row ``start``."""
    at, first = _ring_split(ring, start, n)
    ring[at : at + first] = value
    ring[: n - first] = value
