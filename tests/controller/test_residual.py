"""Residual response removal: the multi-channel canceller against a one-sample-at-a-time
oracle of the specification, chunk invariance, and removal of a repeating response."""

from __future__ import annotations

import bisect

import numpy as np
import pytest

from controller.residual import ResponseCanceller

WINDOW = 40


def oracle(x: np.ndarray, added: dict[int, list[int]], method: str, taps: int, step: float) -> np.ndarray:
    """One channel, one sample at a time: pulses in ``added[t]`` become known just before sample t.

    A pulse within merge samples of the current window's pulse or of a pending one is dropped,
    a pending pulse before t is dropped (too late), a pulse starts a window (closing the
    previous one), the prediction needs ``taps`` recorded responses, and closing a window
    adapts the weights (normalized LMS) before the response is remembered.
    """
    k = taps if method == "adaptive" else 1
    merge = max(2, WINDOW // 10)
    weights, responses, current = np.full(k, 1.0 / k), np.zeros((k, WINDOW)), np.zeros(WINDOW)
    filled, start, pending = 0, None, []
    y = x.astype(np.float64).copy()

    def finish() -> None:
        nonlocal weights, responses, current, filled, start
        if method == "adaptive" and filled >= k:
            error = current - weights @ responses
            weights = weights + step * (responses @ error) / (np.sum(responses**2) + 1e-12)
        responses = np.vstack((current, responses[:-1]))
        current, filled, start = np.zeros(WINDOW), filled + 1, None

    for t in range(len(x)):
        for index in added.get(t, []):
            known = ([start] if start is not None else []) + pending
            if all(abs(index - other) > merge for other in known):
                bisect.insort(pending, index)
        pending = [p for p in pending if p >= t]
        if pending and pending[0] == t:
            if start is not None:
                finish()
            start = pending.pop(0)
        if start is not None:
            offset = t - start
            current[offset] = x[t]
            if filled >= k:
                y[t] = (x[t] - weights @ responses[:, offset]) / np.sqrt(1.0 + weights @ weights)
            if offset == WINDOW - 1:
                finish()
    return y


@pytest.mark.parametrize("method", ["comb", "adaptive"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_channel_equals_the_oracle_for_random_pulses_and_chunks(method: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, n_channels = 3000, 5
    x = rng.normal(0, 10, (n, n_channels))
    response = 300.0 * np.sin(np.linspace(0, 3 * np.pi, WINDOW))
    chunks = np.cumsum(rng.integers(1, 90, 200))
    chunks = np.concatenate(([0], chunks[chunks < n], [n]))
    added: list[dict[int, list[int]]] = [{} for _ in range(n_channels)]
    canceller = ResponseCanceller(n_channels, WINDOW, method, taps=3, step=0.3)
    shared = list(range(20, n - WINDOW, 47))  # e.g. artifacts detected in the signal: every channel
    own = [sorted(rng.choice(np.arange(n), 60, replace=False).tolist()) for _ in range(n_channels)]
    late = [rng.choice(np.arange(100, n), 20, replace=False).tolist() for _ in range(n_channels)]
    for c in range(n_channels):
        for p in own[c] + shared:
            x[p : p + WINDOW, c] += response[: n - p]
    out = []
    for lo, hi in zip(chunks[:-1], chunks[1:]):
        # Known before this chunk: pulses up to 100 samples ahead, some twice, and some too late.
        for c in range(n_channels):
            for index in late[c]:
                if lo - 40 <= index < lo - 5:
                    added[c].setdefault(int(lo), []).append(index)
                    canceller.add_pulse(index, c)
            for index in own[c] + shared:
                if lo - 30 <= index < hi + 100 and index not in added[c].get(-1, []):
                    added[c].setdefault(int(lo), []).append(index)
                    added[c].setdefault(-1, []).append(index)
                    canceller.add_pulse(index, c)
                    if rng.random() < 0.2:  # seen twice, 1 sample off (pulses stream and detection)
                        added[c][int(lo)].append(index + 1)
                        canceller.add_pulse(index + 1, c)
        out.append(canceller.process(x[lo:hi], int(lo)).copy())  # the output is a reused buffer
    y = np.vstack(out)
    for c in range(n_channels):
        expected = oracle(x[:, c], added[c], method, taps=3, step=0.3)
        np.testing.assert_allclose(y[:, c], expected, rtol=1e-9, atol=1e-9, err_msg=f"channel {c}")
    assert not np.allclose(y, x)  # something was cancelled


def test_chunked_equals_one_block() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 10, (4000, 3))
    pulses = list(range(13, 3900, 61))
    whole = ResponseCanceller(3, WINDOW, "adaptive", taps=4, step=0.2)
    chunked = ResponseCanceller(3, WINDOW, "adaptive", taps=4, step=0.2)
    for p in pulses:
        whole.add_pulse(p)
        chunked.add_pulse(p)
    bounds = np.concatenate(([0], np.sort(rng.choice(np.arange(1, 4000), 150, replace=False)), [4000]))
    y = np.vstack([chunked.process(x[lo:hi], int(lo)).copy() for lo, hi in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(y, whole.process(x, 0), rtol=1e-12, atol=1e-12)


def test_comb_and_adaptive_remove_a_repeating_response_and_keep_the_noise_level() -> None:
    rng = np.random.default_rng(3)
    window, period, n = 50, 60, 6000
    response = 500.0 * np.sin(np.linspace(0, 3 * np.pi, window))
    noise = rng.normal(size=(n, 2)) * 10.0
    x = noise.copy()
    for p in range(0, n - window, period):
        x[p : p + window] += response[:, np.newaxis]
    for method in ("comb", "adaptive"):
        canceller = ResponseCanceller(2, window, method, taps=4, step=0.2)
        for p in range(0, n - window, period):
            canceller.add_pulse(p)
        y = np.vstack([canceller.process(x[s : s + 37], s).copy() for s in range(0, n, 37)])
        assert (np.std(y[1000:], axis=0) < 1.3 * np.std(noise[1000:], axis=0)).all(), method  # gone, level kept


def test_a_gap_closes_open_windows_and_predicts_nothing_into_the_samples_after_it() -> None:
    """Samples lost mid-window: the window closes on what arrived, nothing predicted for it is
    subtracted after the gap, and windows after the gap are cancelled again."""
    window, period = 50, 100
    response = 500.0 * np.sin(np.linspace(0, 3 * np.pi, window))
    canceller = ResponseCanceller(1, window, "comb")
    x = np.zeros((4000, 1))
    for p in range(0, 4000 - window, period):
        x[p : p + window, 0] += response
        canceller.add_pulse(p)
    before = canceller.process(x[:1020], 0).copy()  # a window opened at 1000 and is open at the gap
    assert np.abs(before[200:1000]).max() < 1e-9  # cancelled before the gap
    after = canceller.process(x[1530:1600], 1530).copy()  # 1020..1529 lost, the window of 1500 too
    np.testing.assert_array_equal(after, x[1530:1600])  # no prediction survives the gap
    later = canceller.process(x[1600:4000], 1600)
    # The next window is predicted from the response closed at the gap: its 20 samples, zeros after
    # (the comb's divisor sqrt(2) applies to the whole window).
    assert np.abs(later[:20]).max() < 1e-9
    np.testing.assert_allclose(later[20:window], x[1620 : 1600 + window] / np.sqrt(2.0), rtol=1e-12)
    assert np.abs(later[100:2300]).max() < 1e-9  # then whole responses, cancelled again
