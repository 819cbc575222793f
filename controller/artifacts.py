"""Stimulation artifacts found without the ``pulses`` stream: a sync channel or the signal itself.

Pure and chunk-invariant. Detection looks ahead by a short delay (the blanking
``pre`` time): the signal leaving :class:`ArtifactFinder` is the input delayed by
``delay`` samples, so a window can start ``pre`` before the sample where the artifact
was seen, even across chunk boundaries.
"""

from __future__ import annotations

import numpy as np


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
        self._previous: np.ndarray | None = None
        self._previous_sync = np.inf
        self._last_artifact = -(1 << 62)
        self._primed = False

    def process(
        self, emg_uv: np.ndarray, first_index: int, sync: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(delayed emg, valid mask of the delayed samples, indices of new artifacts)."""
        n = emg_uv.shape[0]
        if not self._primed and n:
            self._buffer[:] = emg_uv[0]
            self._previous = emg_uv[0].copy()
            self._primed = True
        hit = np.zeros(n, dtype=bool)
        if self._slope_per_sample is not None and n:
            steps = np.abs(np.diff(emg_uv, axis=0, prepend=self._previous[np.newaxis]))
            hit |= (steps > self._slope_per_sample).any(axis=1)
            self._previous[:] = emg_uv[-1]
        if sync is not None and self._sync_threshold is not None and n:
            level = np.asarray(sync, dtype=np.float64)
            above = level > self._sync_threshold
            before = np.concatenate(([self._previous_sync > self._sync_threshold], above[:-1]))
            hit |= above & ~before
            self._previous_sync = float(level[-1])
        index = np.arange(first_index, first_index + n)
        hits = index[hit]
        window = self.delay + self._post
        new = hits[np.diff(hits, prepend=self._last_artifact) > window]
        last = np.maximum.accumulate(np.where(hit, index, self._last_artifact))
        if n:
            self._last_artifact = int(last[-1])
        valid = (index - self.delay) - last > self._post
        if self.delay:
            joined = np.concatenate((self._buffer, emg_uv))
            delayed = joined[:n]
            self._buffer[:] = joined[n:]
        else:
            delayed = emg_uv
        return delayed, valid, new
