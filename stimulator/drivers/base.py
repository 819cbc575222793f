"""The driver seam: what the stimulator loop needs from any output device.

The loop owns time and calls every method from its one thread; a driver never
starts threads, never blocks for long (bounded writes, non-blocking reads) and
never keeps a device alive by itself: ``keep_alive`` is called only right after a
fresh command was processed, so a dead loop lets the device's own watchdog fire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from fesloop import protocol


class DriverFault(RuntimeError):
    """The device or its link failed: the cause, and the channels concerned by name."""

    def __init__(self, cause: str, channels: Sequence[str] = ()) -> None:
        self.cause = cause
        self.channels = tuple(channels)
        where = f" (channels: {', '.join(self.channels)})" if self.channels else ""
        super().__init__(f"{cause}{where}")


class Driver(Protocol):
    pulses_delivered: int

    def ready(self) -> bool:
        """True when output can be delivered now (device connected and set up)."""
        ...

    def set_output(self, amplitude_ma: np.ndarray, pulse_width_us: np.ndarray, now_s: float) -> None:
        """The output per configured channel from now on (already checked by the kernel)."""
        ...

    def keep_alive(self, now_s: float) -> None:
        """Feed the device watchdog; called only after a fresh command was processed."""
        ...

    def deliver_due(self, now_s: float) -> protocol.Pulses | None:
        """Service the device and return the pulses delivered up to ``now_s``; DriverFault on failure."""
        ...

    def take_crank(self) -> protocol.Crank | None:
        """Ergometer readings the device sent since the last call (MOTOmed on a RehaStim2), or None."""
        ...

    def next_event_s(self) -> float:
        """When the loop should call ``deliver_due`` next at the latest."""
        ...

    def zero(self) -> None:
        """Output to zero at once. Never raises: it runs on every failure path."""
        ...

    def close(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """Driver state and counters, JSON-able, for the status stream."""
        ...
