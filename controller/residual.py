"""Removal of the stimulus-locked response that blanking leaves (M-waves, artifact tails).

Pure and chunk-invariant. After each pulse, the next ``window`` samples of a channel
are one *response*. The response to the current pulse is predicted from the responses
to the previous pulses, sample for sample, and the prediction is subtracted:

- ``comb``: period difference, prediction = the previous response (fixed weight 1);
- ``adaptive``: prediction = weighted sum of the previous ``taps`` responses, weights
  adapted after every complete response by normalized LMS (a prediction-error filter
  at the stimulation period), so it follows M-waves that change with intensity and fatigue.

Voluntary EMG is uncorrelated from one period to the next, so subtracting the
prediction adds its variance; the output is divided by sqrt(1 + |w|^2) to keep the
EMG level (and the calibration) unchanged. Samples outside response windows pass.

All channels are processed together: a block is split only where some channel's
window starts (a pulse) or ends, and within each piece every channel in a window is
predicted at once with array operations (pulses come ~30 times a second, chunks
hundreds of times).
"""

from __future__ import annotations

import bisect

import numpy as np

NO_WINDOW = -1  # start of a channel that is not in a response window
NEVER = np.iinfo(np.int64).max


class ResponseCanceller:
    """Pulse-locked prediction-error filter for ``n_channels`` channels, each with its own pulses."""

    def __init__(self, n_channels: int, window: int, method: str, taps: int = 1, step: float = 0.0) -> None:
        if method not in ("comb", "adaptive"):
            raise ValueError(f"method {method!r}: expected 'comb' or 'adaptive'")
        self.window = window
        self._adaptive = method == "adaptive"
        k = taps if self._adaptive else 1
        self.weights = np.full((n_channels, k), 1.0 / k)
        self._step = step
        self._responses = np.zeros((n_channels, k, window))  # [channel, 0 = newest, sample in window]
        self._current = np.zeros((n_channels, window))
        self._filled = np.zeros(n_channels, dtype=np.int64)  # responses recorded (prediction once all taps are)
        self._start = np.full(n_channels, NO_WINDOW, dtype=np.int64)  # absolute index of each window's pulse
        self._pulses: list[list[int]] = [[] for _ in range(n_channels)]  # sorted, pending
        self._next_pulse = np.full(n_channels, NEVER, dtype=np.int64)
        self._merge = max(2, window // 10)

    def add_pulse(self, index: int, channel: int | None = None) -> None:
        """Register a pulse at absolute sample ``index`` on ``channel`` (None: every channel).

        Any order and any source. A pulse within ``merge`` samples of a known one is the
        same pulse seen twice (e.g. from the ``pulses`` stream and from detection in the
        signal) and is dropped.
        """
        channels = range(len(self._pulses)) if channel is None else (channel,)
        for c in channels:
            pulses = self._pulses[c]
            known = [int(self._start[c])] if self._start[c] != NO_WINDOW else []
            position = bisect.bisect_left(pulses, index)
            neighbours = known + pulses[max(position - 1, 0) : position + 1]
            if all(abs(index - other) > self._merge for other in neighbours):
                pulses.insert(position, index)
                self._next_pulse[c] = pulses[0]

    def process(self, x: np.ndarray, first_index: int) -> np.ndarray:
        """Cancel predicted responses in a (n_samples, n_channels) block starting at absolute ``first_index``."""
        y = np.array(x, dtype=np.float64)
        end = first_index + len(x)
        self._drop_late(first_index)
        position = first_index
        while True:
            window_end = np.where(self._start != NO_WINDOW, self._start + self.window, NEVER)
            boundary = min(int(self._next_pulse.min()), int(window_end.min()), end)
            if boundary > position:
                self._cancel(x, y, position, boundary, first_index)
                position = boundary
            ended = np.flatnonzero(window_end == position)
            if len(ended):
                self._finish(ended)
            if position == end:
                return y
            pulsed = np.flatnonzero(self._next_pulse == position)
            self._finish(pulsed[self._start[pulsed] != NO_WINDOW])
            self._start[pulsed] = position
            for c in pulsed:
                self._pulses[c].pop(0)
                self._next_pulse[c] = self._pulses[c][0] if self._pulses[c] else NEVER

    def _drop_late(self, position: int) -> None:
        """Pulses before ``position`` arrived too late: their windows are gone."""
        for c in np.flatnonzero(self._next_pulse < position):
            pulses = self._pulses[c]
            del pulses[: bisect.bisect_left(pulses, position)]
            self._next_pulse[c] = pulses[0] if pulses else NEVER

    def _cancel(self, x: np.ndarray, y: np.ndarray, lo: int, hi: int, first_index: int) -> None:
        """Samples [lo, hi) (absolute), in which no window starts or ends."""
        inside = np.flatnonzero(self._start != NO_WINDOW)
        if not len(inside):
            return
        offsets = (lo - self._start[inside])[:, np.newaxis] + np.arange(hi - lo)  # (channels, samples)
        segment = x[lo - first_index : hi - first_index, inside].T
        self._current[inside[:, np.newaxis], offsets] = segment
        predicting = self._filled[inside] >= self.weights.shape[1]
        if not predicting.any():
            return
        chans, offsets, segment = inside[predicting], offsets[predicting], segment[predicting]
        weights = self.weights[chans]
        taps = np.arange(weights.shape[1])[np.newaxis, :, np.newaxis]
        past = self._responses[chans[:, np.newaxis, np.newaxis], taps, offsets[:, np.newaxis, :]]  # (c, k, samples)
        prediction = np.einsum("ck,cks->cs", weights, past)
        scale = np.sqrt(1.0 + np.einsum("ck,ck->c", weights, weights))[:, np.newaxis]
        y[lo - first_index : hi - first_index, chans] = ((segment - prediction) / scale).T

    def _rows(self, channels: np.ndarray) -> np.ndarray | slice:
        """Index for ``channels``: a slice (views, no copies) when it is every channel, as after a detected artifact."""
        return slice(None) if len(channels) == len(self._start) else channels

    def _finish(self, channels: np.ndarray) -> None:
        """Close the current response of ``channels``: adapt their weights on it, then remember it."""
        if not len(channels):
            return
        self._start[channels] = NO_WINDOW
        taps = self.weights.shape[1]
        adapting = channels[self._filled[channels] >= taps] if self._adaptive else channels[:0]
        if len(adapting):  # tap by tap: temporaries of one response per channel
            rows = self._rows(adapting)
            weights = self.weights[rows]
            error = self._current[rows] - weights[:, 0, np.newaxis] * self._responses[rows, 0]
            power = np.einsum("cw,cw->c", self._responses[rows, 0], self._responses[rows, 0]) + 1e-12
            for tap in range(1, taps):
                error -= weights[:, tap, np.newaxis] * self._responses[rows, tap]
                power += np.einsum("cw,cw->c", self._responses[rows, tap], self._responses[rows, tap])
            for tap in range(taps):
                weights[:, tap] += self._step * np.einsum("cw,cw->c", self._responses[rows, tap], error) / power
            self.weights[rows] = weights
        rows = self._rows(channels)
        for tap in range(taps - 1, 0, -1):
            self._responses[rows, tap] = self._responses[rows, tap - 1]
        self._responses[rows, 0] = self._current[rows]
        self._current[rows] = 0.0
        self._filled[rows] += 1
