"""Stimulation artifacts found without the ``pulses`` stream: a sync channel or the signal itself.

Pure and chunk-invariant. Detection looks ahead by a short delay (the blanking
``pre`` time): the signal leaving :class:`ArtifactFinder` is the input delayed by
``delay`` samples, so a window can start ``pre`` before the sample where the artifact
was seen, even across chunk boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from controller.buffers import Columns, Rows, column_steps, ramp

NO_ARTIFACTS: tuple[int, ...] = ()


class ArtifactFinder:
    """Artifact samples from steep slopes on any channel and rising edges of a sync channel.

    ``process`` returns the delayed signal, a validity mask for it (False within
    [artifact - pre, artifact + post] of any artifact) and the absolute indices of the
    artifacts that opened a new window (one per stimulation artifact, not per steep sample).
    """

    def __init__(
        self,
        n_channels: int,
        fs_hz: float,
        pre_s: float,
        post_s: float,
        slope_uv_per_ms: float | None,
        sync_threshold: float | None,
    ) -> None:
        self.delay = int(round(pre_s * fs_hz))
        self._post = int(round(post_s * fs_hz))
        self._slope_per_sample = None if slope_uv_per_ms is None else slope_uv_per_ms * 1e3 / fs_hz
        self._sync_threshold = sync_threshold
        self._buffer = np.zeros((self.delay, n_channels))
        self._previous = np.zeros(n_channels)
        self._previous_sync = np.inf
        self._last_artifact = -(1 << 62)
        self._primed = False
        self._joined = Columns(n_channels)
        self._steps = Columns(n_channels)
        self._delayed = Columns(n_channels)
        self._steepest = Rows()
        self._hit = Rows(dtype=bool)
        self._rising = Rows(dtype=bool)
        self._above = Rows(dtype=bool)
        self._last = Rows(dtype=np.int64)
        self._valid = Rows(dtype=bool)

    def process(
        self, emg_uv: np.ndarray, first_index: int, sync: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, Sequence[int]]:
        """(delayed emg, valid mask of the delayed samples, indices of new artifacts).

        The arrays are views of buffers that the next call overwrites.
        """
        n = emg_uv.shape[0]
        if not self._primed and n:
            self._buffer[:] = emg_uv[0]
            self._previous[:] = emg_uv[0]
            self._primed = True
        hit = self._hit(n)
        hit[:] = False
        if self._slope_per_sample is not None and n:
            steps = self._steps(n)
            column_steps(emg_uv, self._previous, steps)
            np.abs(steps, out=steps)
            steepest = self._steepest(n)
            np.fmax.reduce(steps, axis=1, out=steepest)  # fmax: a NaN channel does not hide the others
            np.greater(steepest, self._slope_per_sample, out=hit)
            self._previous[:] = emg_uv[-1]
        if sync is not None and self._sync_threshold is not None and n:
            above = self._above(n + 1)
            above[0] = self._previous_sync > self._sync_threshold
            np.greater(sync, self._sync_threshold, out=above[1:])
            rising = self._rising(n)
            np.greater(above[1:], above[:-1], out=rising)
            np.logical_or(hit, rising, out=hit)
            self._previous_sync = float(sync[-1])
        valid = self._valid(n)
        any_hit = bool(hit.any())
        new = self._new_artifacts(hit, first_index) if any_hit else NO_ARTIFACTS
        if any_hit:
            last = self._last(n)  # per sample: the newest artifact up to it, relative to first_index
            last[:] = self._last_artifact - first_index  # < 0: the artifact before this block ...
            np.copyto(last, ramp(0, n), where=hit)  # ... or one in it
            np.maximum.accumulate(last, out=last)
            self._last_artifact = first_index + int(last[-1])
            np.subtract(ramp(0, n), last, out=last)
            np.greater(last, self.delay + self._post, out=valid)
        else:
            np.greater(ramp(0, n), self.delay + self._post + self._last_artifact - first_index, out=valid)
        if not self.delay:
            return emg_uv, valid, new
        joined, delayed = self._joined(self.delay + n), self._delayed(n)
        joined[: self.delay] = self._buffer
        joined[self.delay :] = emg_uv
        self._buffer[:] = joined[n:]
        np.copyto(delayed, joined[:n])
        return delayed, valid, new

    def _new_artifacts(self, hit: np.ndarray, first_index: int) -> list[int]:
        """Steep samples that open a window: more than one window after the previous artifact."""
        window = self.delay + self._post
        new, previous = [], self._last_artifact
        for index in (np.flatnonzero(hit) + first_index).tolist():
            if index - previous > window:
                new.append(index)
            previous = index
        return new
