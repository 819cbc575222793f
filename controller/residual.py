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
"""

from __future__ import annotations

import bisect

import numpy as np


class ResponseCanceller:
    """Pulse-locked prediction-error filter for one channel."""

    def __init__(self, window: int, method: str, taps: int = 1, step: float = 0.0) -> None:
        if method not in ("comb", "adaptive"):
            raise ValueError(f"method {method!r}: expected 'comb' or 'adaptive'")
        self.window = window
        self._adaptive = method == "adaptive"
        k = taps if self._adaptive else 1
        self.weights = np.full(k, 1.0 / k)
        self._step = step
        self._responses = np.zeros((k, window))
        self._current = np.zeros(window)
        self._filled = 0  # responses recorded so far (prediction starts once all taps are)
        self._start: int | None = None  # absolute index of the current window's pulse
        self._pulses: list[int] = []  # sorted, pending
        self._merge = max(2, window // 10)

    def add_pulse(self, index: int) -> None:
        """Register a pulse at absolute sample ``index``, in any order and from any source.

        A pulse within ``merge`` samples of a known one is the same pulse seen twice (e.g.
        from the ``pulses`` stream and from detection in the signal) and is dropped.
        """
        known = [self._start] if self._start is not None else []
        position = bisect.bisect_left(self._pulses, index)
        neighbours = known + self._pulses[max(position - 1, 0) : position + 1]
        if all(abs(index - other) > self._merge for other in neighbours):
            self._pulses.insert(position, index)

    def process(self, x: np.ndarray, first_index: int) -> np.ndarray:
        """Cancel predicted responses in a 1-D block starting at absolute ``first_index``."""
        y = x.copy()
        position = first_index
        end = first_index + len(x)
        while position < end:
            while self._pulses and self._pulses[0] < position:  # arrived late: its window is gone
                self._pulses.pop(0)
            next_pulse = self._pulses[0] if self._pulses else end
            if next_pulse == position:
                self._finish()
                self._start = self._pulses.pop(0)
                continue
            stop = min(end, next_pulse)
            if self._start is not None:
                offset = position - self._start
                stop = min(stop, self._start + self.window)
                if offset >= self.window:
                    self._finish()
                    continue
                self._cancel(x, y, position - first_index, stop - first_index, offset)
            position = stop
        return y

    def _cancel(self, x: np.ndarray, y: np.ndarray, lo: int, hi: int, offset: int) -> None:
        segment = x[lo:hi]
        self._current[offset : offset + hi - lo] = segment
        if self._filled >= len(self.weights):
            prediction = self.weights @ self._responses[:, offset : offset + hi - lo]
            y[lo:hi] = (segment - prediction) / np.sqrt(1.0 + self.weights @ self.weights)
        if offset + hi - lo == self.window:
            self._finish()

    def _finish(self) -> None:
        """Close the current response: adapt the weights on it, then remember it."""
        if self._start is None:
            return
        self._start = None
        if self._adaptive and self._filled >= len(self.weights):
            error = self._current - self.weights @ self._responses
            power = float(np.sum(self._responses * self._responses)) + 1e-12
            self.weights += self._step * (self._responses @ error) / power
        self._responses = np.roll(self._responses, 1, axis=0)
        self._responses[0] = self._current
        self._current[:] = 0.0
        self._filled += 1
