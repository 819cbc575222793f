"""What every EMG source hands over, and the choice of source from the config.

A source hands over blocks of new samples in microvolts, float32 (n_samples,
n_channels), finite, with the index and shared-clock time of the first sample. Lost
samples are never filled: a read that spans a gap returns one block per side, the
second block's index jumps over the gap and its ``lost_samples`` says by how much.
A sample with a non-finite value is lost too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from acquisition.sample_clock import Line, RateOffNominal, SampleClock
from fesloop import protocol
from fesloop.config import Config


@dataclass
class Block:
    first_sample_index: int
    first_sample_time_s: float
    emg_uv: np.ndarray  # may be a view of the source's buffer: valid until its next read
    lost_samples: int = 0  # samples missing just before this block
    truth: np.ndarray | None = None  # simulated patient: voluntary drive per muscle


@dataclass(frozen=True)
class SourceEvent:
    """Something a source noticed that the recording should show (a marker) and the log should say."""

    time_s: float  # shared clock
    marker: str


# Rows whose gap only what follows can confirm (a backlog draining looks like a loss until its
# fresh rows come) are held back at most this long, and handed over this long before the
# acquisition loop would take the source for stalled and reopen it.
HOLD_AT_MOST_S = 0.25
HOLD_MARGIN_S = 0.05


@dataclass(frozen=True)
class HeldRows:
    """Rows read and not handed over yet: parallel arrays in read order, the time of the newest
    read and of the first read held."""

    arrays: tuple[np.ndarray, ...]
    read_s: float
    since_s: float

    def then(self, rows: HeldRows) -> HeldRows:
        """These rows followed by ``rows`` (held since the first)."""
        joined = tuple(np.concatenate((a, b)) for a, b in zip(self.arrays, rows.arrays, strict=True))
        return HeldRows(joined, rows.read_s, self.since_s)

    def copy(self) -> HeldRows:
        """Owned arrays (a read's rows may be views of a reused buffer)."""
        return HeldRows(tuple(a.copy() for a in self.arrays), self.read_s, self.since_s)

    def hold_until(self, handed_s: float, recover_after_s: float) -> float:
        """When these rows must be handed over: after HOLD_AT_MOST_S, and before the loop would reopen
        the source, ``recover_after_s`` after rows were last handed over (at ``handed_s``)."""
        return min(self.since_s + HOLD_AT_MOST_S, handed_s + recover_after_s - HOLD_MARGIN_S)


def joined(held: HeldRows | None, new: HeldRows | None) -> HeldRows | None:
    """The rows held, then the new ones (either may be None)."""
    if held is None or new is None:
        return held or new
    return held.then(new)


class SourceError(RuntimeError):
    """The source cannot be opened or read; the message says which and why."""


def advance_sample_clock(
    clock: SampleClock, stop_index: int, read_s: float, events: list[SourceEvent], name: str
) -> Line:
    """The sample clock's line for a read (see SampleClock.advance): a re-anchor is added to
    ``events`` (the recording shows where EMG times jump); a rate the clock cannot follow
    is a SourceError for ``name`` (EMG timed wrongly must not drive stimulation)."""
    try:
        line = clock.advance(stop_index, read_s)
    except RateOffNominal as exc:
        raise SourceError(f"{name}: {exc}") from None
    if line.jump_s:
        events.append(SourceEvent(read_s, f"sample clock anchored again: EMG times jump {line.jump_s * 1e3:+.1f} ms"))
    return line


class Source(Protocol):
    sampling_rate_hz: float
    n_channels: int
    source_id: str
    duplicate_samples: int
    non_finite_samples: int  # rows dropped as lost for a NaN, an infinity or a value beyond float32
    timestamps_back: int  # the source's own timestamps earlier than the one before (LSL; BrainFlow's arrival stamps)

    def start(self, now_s: float) -> None:
        """Open the device or stream and start sampling; raises SourceError."""

    def read(self, now_s: float) -> list[Block]:
        """Every sample that arrived since the last read, split at gaps (empty: none)."""

    def restart(self, now_s: float) -> None:
        """Close and open again after a stall; the index keeps counting across it."""

    def take_events(self) -> list[SourceEvent]:
        """What it noticed since the last call (e.g. a wall-clock step), oldest first."""

    def on_pulses(self, pulses: protocol.Pulses) -> None:
        """Delivered pulses (only the simulated patient answers them)."""

    def stop(self) -> None:
        """Release the device or stream."""


def n_channels_needed(config: Config) -> int:
    return max(m.emg_channel for m in config.muscles) + 1


def open_source(config: Config) -> Source:
    """The source the config names."""
    if config.acquisition.source == "simulated":
        from acquisition.simulated_source import SimulatedSource

        return SimulatedSource(config)
    if config.acquisition.source == "lsl":
        from acquisition.lsl_source import LslSource

        return LslSource(config)
    from acquisition.brainflow_source import BrainFlowSource

    return BrainFlowSource(config)
