"""Continuous channel list timing for the RehaStim2, planned from the channel configs.

Pure. The device processes one channel list every main interval t1 = code * 0.5 ms + 1 ms
(8-1025 ms); each selected channel has a fixed 1.5 ms slot, in channel order (module A,
channels 1-4, then module B, 5-8). Channels listed as low-frequency skip
``low_frequency_factor`` lists out of ``factor + 1``. So every channel runs at one main
frequency, or at that frequency divided by one common n = 2..8.

t1 is rounded *up* to the 0.5 ms grid: the delivered frequency is never above the
configured one, so the electrode limit checked at the configured frequency still holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stimulator import sciencemode2 as sm2
from stimulator.limits import LimitError

if TYPE_CHECKING:  # fesloop.config imports this module to check configs at load
    from fesloop.config import StimulationChannel

_RATIO_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ChannelListPlan:
    """What the device is told (``init``) and when each configured channel pulses."""

    init: sm2.ChannelListInit
    period_s: float  # t1 as given to the device
    offset_s: np.ndarray  # per configured channel: slot start within the list
    every_n_lists: np.ndarray  # per configured channel: 1, or factor + 1 if low-frequency
    order: np.ndarray  # configured-channel indices in increasing device channel order

    def frequency_hz(self) -> np.ndarray:
        """The pulse frequency each configured channel actually gets."""
        return 1.0 / (self.period_s * self.every_n_lists)


def plan_channel_list(channels: Sequence[StimulationChannel]) -> ChannelListPlan:
    """The channel list for these channels, or LimitError naming the frequency that cannot be met."""
    if not channels:
        raise LimitError("stimulation", 0, "RehaStim2 channel list needs at least one channel")
    frequencies = np.array([c.frequency_hz for c in channels], dtype=np.float64)
    main_hz = float(frequencies.max())
    code = math.ceil(((1e3 / main_hz) - 1.0) / 0.5 - 1e-9)
    init_code = max(code, int((sm2.MIN_INTERVAL_MS - 1.0) / 0.5))
    if init_code > sm2.MAX_MAIN_INTERVAL_CODE:
        raise LimitError("frequency_hz", main_hz, "RehaStim2 main interval is at most 1025 ms (about 0.98 Hz)")
    period_s = (init_code * 0.5 + 1.0) / 1e3
    every = np.ones(len(channels), dtype=np.int64)
    factor = 0
    for i, frequency in enumerate(frequencies):
        ratio = main_hz / frequency
        n = round(ratio)
        if abs(ratio - n) > _RATIO_TOLERANCE * ratio or n > sm2.MAX_LOW_FREQUENCY_FACTOR + 1 or (n > 1 and factor and n - 1 != factor):
            raise LimitError(
                f"stimulation[{i}].frequency_hz",
                float(frequency),
                f"RehaStim2 channel list: every channel at {main_hz:g} Hz, or at {main_hz:g} Hz / n "
                f"with one n = 2..{sm2.MAX_LOW_FREQUENCY_FACTOR + 1} for all low-frequency channels",
            )
        if n > 1:
            factor = n - 1
            every[i] = n
    device = np.array([c.device_channel for c in channels], dtype=np.int64)
    order = np.argsort(device, kind="stable")
    offset_s = np.empty(len(channels))
    offset_s[order] = np.arange(len(channels)) * sm2.SLOT_MS / 1e3
    active = sum(1 << int(d) for d in device)
    low = sum(1 << int(d) for d, n in zip(device, every) if n > 1)
    inter_pulse_code = int((sm2.MIN_INTERVAL_MS - 1.5) / 0.5)
    init = sm2.ChannelListInit(factor, active, low, inter_pulse_code, init_code)
    return ChannelListPlan(init, period_s, offset_s, every, order)
