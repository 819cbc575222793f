"""The RehaStim2 emulator (with a MOTOmed) in a process of its own, as the device has a CPU of its own.

As a thread of the pytest process it shared that process's interpreter and share of the CPU: in a
long closed-loop test (four channels, a Start every few ms for 15 s) its answer once came later than
the 100 ms the driver allows (CI, under the full suite). The test asks for the device's record over a
pipe.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from stimulator.rehastim2_emulator import EmulatedMotomed, PtyEmulator, RehaStim2Emulator

START_TIMEOUT_S = 30.0


def _serve(conn: Connection, cadence_rpm: float) -> None:
    with PtyEmulator(RehaStim2Emulator(EmulatedMotomed(cadence_rpm=cadence_rpm))) as emulator:
        conn.send(emulator.path)
        while True:
            request = conn.recv()
            with emulator.lock:
                device = emulator.device
                if request == "stimulating":
                    reply: Any = device.stimulating
                elif request == "pulse_count":
                    reply = len(device.pulses)
                elif request == "record":  # (pulses, ActualValues readings with their times)
                    reply = (list(device.pulses), list(device.actual_values))
                elif request == "unplug_motomed":  # no more ActualValues; the time of the last one
                    device.motomed = None
                    reply = device.actual_values[-1][0]
                else:
                    reply = None
            conn.send(reply)
            if request == "close":
                return


class EmulatorProcess:
    """``path``: the pty to give the stimulator; :meth:`ask` one of the requests ``_serve`` answers."""

    def __init__(self, cadence_rpm: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, cadence_rpm), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise RuntimeError("the emulator process did not start")
        self.path: str = self._conn.recv()

    def ask(self, request: str) -> Any:
        self._conn.send(request)
        return self._conn.recv()

    def close(self) -> None:
        try:
            self.ask("close")
        except (OSError, EOFError):
            pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
