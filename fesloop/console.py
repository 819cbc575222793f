"""Console output that never holds up its caller.

The supervisor's loop is also its stop path (Ctrl+C, --duration, a dying child): it must
not wait on a terminal or a pipe nobody reads (a launcher that captures stdout and never
reads it fills the pipe in minutes; a terminal paused with Ctrl+S). Text is queued and a
thread writes it, to the file descriptor itself where there is one (a writer blocked in a
syscall holds no Python lock, so the interpreter still exits). Messages are never dropped;
status lines are: while output is held up, only the newest one waits.
"""

from __future__ import annotations

import io
import os
import select
import threading
import time
from collections import deque
from typing import TextIO

RETRY_S = 0.05  # a non-blocking descriptor that is full: wait this long before writing again


class DetachedOutput:
    """``write`` and ``status`` return at once; a thread hands the text on to ``out`` in order."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._isatty = out.isatty()
        out.flush()  # what was written before keeps its place
        try:
            self._fd: int | None = out.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None  # e.g. a StringIO
        self._pending: deque[tuple[str, bool]] = deque()  # (text, is a status line)
        self._wake = threading.Condition()
        self._closing = False
        self.replaced = 0  # status lines replaced by a newer one before they went out
        self.lost = 0  # writes the descriptor refused (closed, broken pipe): dropped
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def isatty(self) -> bool:
        return self._isatty

    def write(self, text: str) -> None:
        """A message: always written, in order."""
        self._put(text, status=False)

    def status(self, text: str) -> None:
        """A status line: replaced by the next one if it has not gone out yet."""
        self._put(text, status=True)

    def close(self, timeout_s: float) -> bool:
        """Let the thread write what is queued, for at most ``timeout_s``; whether all of it went out."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive() and not self.lost

    def _put(self, text: str, status: bool) -> None:
        with self._wake:
            if status and self._pending and self._pending[-1][1]:
                self._pending[-1] = (text, True)
                self.replaced += 1
            else:
                self._pending.append((text, status))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                text, _ = self._pending.popleft()
            self._emit(text)

    def _emit(self, text: str) -> None:
        if self._fd is None:
            self._out.write(text)
            self._out.flush()
            return
        data = text.encode(errors="replace")
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except (BlockingIOError, InterruptedError):  # a non-blocking descriptor, full for now
                _wait_writable(self._fd)
            except OSError:  # closed, broken pipe: this text is lost, the rest may still go
                self.lost += 1
                return


def _wait_writable(fd: int) -> None:
    try:
        select.select([], [fd], [], RETRY_S)
    except (OSError, ValueError):  # a descriptor select cannot watch (Windows): just wait
        time.sleep(RETRY_S)
