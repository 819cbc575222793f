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

Work is done per event, not per sample: when a window opens, its whole prediction
(and divisor) is written into rings indexed by absolute sample, and a chunk is then
one subtraction and one division over every channel, whether in a window or not (a
prediction of 0 and a divisor of 1 outside). Closing a window reads its response back
from a ring of the input. Pulses come ~30 times a second, chunks hundreds of times,
and no chunk allocates array data.
"""

from __future__ import annotations

import bisect

import numpy as np

from controller.buffers import Columns, fill_ring, read_ring, write_ring

NO_WINDOW = -1  # start of a channel that is not in a response window
NEVER = np.iinfo(np.int64).max
BLOCK = 256  # longest piece processed at once (chunks are split): the rings hold a window and a block


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
        self._filled = np.zeros(n_channels, dtype=np.int64)  # responses recorded (prediction once all taps are)
        self._start = np.full(n_channels, NO_WINDOW, dtype=np.int64)  # absolute index of each window's pulse
        self._end = np.full(n_channels, NEVER, dtype=np.int64)  # ... and of the sample after its window
        self._pulses: list[list[int]] = [[] for _ in range(n_channels)]  # sorted, pending
        self._next_pulse = np.full(n_channels, NEVER, dtype=np.int64)
        self._merge = max(2, window // 10)
        ring = window + BLOCK  # rings by absolute sample index (mod ring), (ring, channel) views of channel-major arrays
        self._input = np.zeros((n_channels, ring)).T  # the input
        self._prediction = np.zeros((n_channels, ring)).T  # subtracted from each sample ...
        self._divisor = np.ones((n_channels, ring)).T  # ... then the difference divided by this
        self._next_index: int | None = None
        self._out = Columns(n_channels)
        self._result, self._block_prediction, self._block_divisor = (Columns(n_channels) for _ in range(3))
        self._response = np.zeros((n_channels, window))  # scratch for the windows being opened or closed
        self._error = np.zeros((n_channels, window))
        self._norm = np.zeros(n_channels)
        self._update = np.zeros((n_channels, k))
        self._idle = np.zeros(n_channels, dtype=bool)

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
        """Cancel predicted responses in a (n_samples, n_channels) block starting at absolute ``first_index``.

        The result is a view of a buffer that the next call overwrites.
        """
        y = self._out(len(x))
        for lo in range(0, len(x), BLOCK):
            self._process_block(x[lo : lo + BLOCK], first_index + lo, y[lo : lo + BLOCK])
        return y

    def _process_block(self, x: np.ndarray, first: int, y: np.ndarray) -> None:
        if self._next_index is not None and first > self._next_index:
            self._forget_gap(self._next_index)
        end = first + len(x)
        self._next_index = end
        write_ring(self._input, first, x)
        self._drop_late(first)
        while True:  # windows close and open in time order: a window's prediction uses the weights of its start
            closing, opening = int(self._end.min()), int(self._next_pulse.min())
            if closing <= min(opening, end):
                self._close(np.flatnonzero(self._end == closing), closing)
            elif opening < end:
                self._open(np.flatnonzero(self._next_pulse == opening), opening)
            else:
                break
        # Arithmetic on same-layout copies: numpy needs no buffer of its own for them.
        n = len(x)
        result, prediction, divisor = self._result(n), self._block_prediction(n), self._block_divisor(n)
        np.copyto(result, x)
        read_ring(self._prediction, first, prediction)
        read_ring(self._divisor, first, divisor)
        np.subtract(result, prediction, out=result)
        np.divide(result, divisor, out=result)
        np.copyto(y, result)
        fill_ring(self._prediction, first, n, 0.0)
        fill_ring(self._divisor, first, n, 1.0)

    def _forget_gap(self, received: int) -> None:
        """Samples were lost after ``received``: open windows close on what arrived, nothing stays predicted."""
        open_windows = np.flatnonzero(self._start != NO_WINDOW)
        if len(open_windows):
            self._close(open_windows, received)
        self._input[:] = 0.0
        self._prediction[:] = 0.0
        self._divisor[:] = 1.0

    def _drop_late(self, position: int) -> None:
        """Pulses before ``position`` arrived too late: their windows are gone."""
        for c in np.flatnonzero(self._next_pulse < position):
            pulses = self._pulses[c]
            del pulses[: bisect.bisect_left(pulses, position)]
            self._next_pulse[c] = pulses[0] if pulses else NEVER

    def _groups(self, channels: np.ndarray) -> list[slice]:
        """Channels that share their window's start, as slices: every channel at once (a pulse seen in
        the signal, on every channel), else one at a time (views, never copies)."""
        starts = self._start[channels]
        if len(channels) == len(self._start) and (starts == starts[0]).all():
            return [slice(None)]
        return [slice(c, c + 1) for c in channels.tolist()]

    def _open(self, channels: np.ndarray, position: int) -> None:
        """Pulses at ``position`` on ``channels``: close their open windows, write the new windows' predictions."""
        for c in channels.tolist():
            self._pulses[c].pop(0)
            self._next_pulse[c] = self._pulses[c][0] if self._pulses[c] else NEVER
        still_open = channels[self._start[channels] != NO_WINDOW]
        if len(still_open):
            self._close(still_open, position)
        self._start[channels] = position
        self._end[channels] = position + self.window
        for rows in self._groups(channels):
            weights, prediction, divisor, idle = self.weights[rows], self._response[rows], self._norm[rows], self._idle[rows]
            np.einsum("ck,ckw->cw", weights, self._responses[rows], out=prediction)
            np.einsum("ck,ck->c", weights, weights, out=divisor)
            np.add(divisor, 1.0, out=divisor)
            np.sqrt(divisor, out=divisor)
            np.less(self._filled[rows], weights.shape[1], out=idle)  # too few responses yet to predict
            np.copyto(prediction, 0.0, where=idle[:, np.newaxis])
            np.copyto(divisor, 1.0, where=idle)
            write_ring(self._prediction[:, rows], position, prediction.T)
            write_ring(self._divisor[:, rows], position, np.broadcast_to(divisor, (self.window, len(divisor))))

    def _close(self, channels: np.ndarray, position: int) -> None:
        """Close the windows of ``channels`` at ``position`` (early if a pulse came first): adapt, then remember."""
        for rows in self._groups(channels):
            start = int(self._start[rows][0])
            received = position - start
            response = self._response[rows]
            read_ring(self._input[:, rows], start, response[:, :received].T)
            response[:, received:] = 0.0
            if self._adaptive:
                self._adapt(rows, response)
            past, scratch = self._responses[rows], self._error[rows]
            for tap in range(past.shape[1] - 1, 0, -1):  # through scratch: numpy copies overlapping views first
                np.copyto(scratch, past[:, tap - 1])
                np.copyto(past[:, tap], scratch)
            past[:, 0] = response
            self._filled[rows] += 1
            self._start[rows] = NO_WINDOW
            self._end[rows] = NEVER

    def _adapt(self, rows: slice, response: np.ndarray) -> None:
        """Normalized LMS on the closed response, for the channels that were predicting."""
        weights, past = self.weights[rows], self._responses[rows]
        error, power, update = self._error[rows], self._norm[rows], self._update[rows]
        np.einsum("ck,ckw->cw", weights, past, out=error)
        np.subtract(response, error, out=error)
        np.einsum("ckw,ckw->c", past, past, out=power)
        np.add(power, 1e-12, out=power)
        np.einsum("ckw,cw->ck", past, error, out=update)
        np.multiply(update, self._step, out=update)
        np.divide(update, power[:, np.newaxis], out=update)
        idle = self._idle[rows]
        np.less(self._filled[rows], weights.shape[1], out=idle)
        np.copyto(update, 0.0, where=idle[:, np.newaxis])
        np.add(weights, update, out=weights)
