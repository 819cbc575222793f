"""Console output that never holds up its caller.

The supervisor's loop is also its stop path (Ctrl+C, --duration, a dying child): it must
not wait on a terminal or a pipe nobody reads (a launcher that captures stdout and never
reads it fills the pipe in minutes). Text goes to a queue; a thread writes it, to the file
descriptor itself where there is one (a writer blocked in a syscall holds no Python lock,
so the interpreter still exits). Lines that do not fit the queue are counted and dropped.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from typing import TextIO

MAX_PENDING = 1000  # writes waiting; beyond them, output is dropped (counted)


class DetachedOutput:
    """``write`` returns at once; a thread hands the text on to ``out``."""

    def __init__(self, out: TextIO, max_pending: int = MAX_PENDING) -> None:
        self._out = out
        self._isatty = out.isatty()
        out.flush()  # what was written before keeps its place
        try:
            self._fd: int | None = out.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None  # e.g. a StringIO
        self._queue: queue.Queue[str | None] = queue.Queue(max_pending)
        self.dropped = 0  # writes that did not fit the queue
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def isatty(self) -> bool:
        return self._isatty

    def write(self, text: str) -> None:
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def flush(self) -> None:
        """Nothing to do: the thread writes as soon as it can."""

    def close(self, timeout_s: float) -> bool:
        """Let the thread write what is queued, for at most ``timeout_s``; whether it all went out."""
        self.write(None)  # type: ignore[arg-type]  # the end (dropped too if the queue is full)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (text := self._queue.get()) is not None:
            if self._fd is None:
                self._out.write(text)
                self._out.flush()
                continue
            data = text.encode(errors="replace")
            while data:
                data = data[os.write(self._fd, data) :]
