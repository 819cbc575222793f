"""Which lines allocate: tracemalloc's peak read between consecutive traced lines.

``line_allocations(run, prefixes)`` runs ``run()`` with a line tracer on the files
whose path contains one of ``prefixes`` and returns, per (file, line), the most
memory that line's execution raised the traced total by (temporaries included, even
when freed before the next line). Slow (a tracer on every line): for tests and
diagnosis, never for timing.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable
from types import FrameType
from typing import Any


def line_allocations(run: Callable[[], None], prefixes: tuple[str, ...]) -> dict[tuple[str, int], int]:
    """Per (file, line) of the traced files: the largest rise of traced memory while that line ran."""
    worst: dict[tuple[str, int], int] = {}
    last: list[Any] = [None, 0]  # the line running now, and the traced total when it started

    def close_line() -> None:
        _, peak = tracemalloc.get_traced_memory()
        if last[0] is not None:
            worst[last[0]] = max(worst.get(last[0], 0), peak - last[1])

    def on_line(frame: FrameType, event: str, arg: object) -> Callable | None:
        if event in ("line", "return"):
            close_line()
            if event == "line":
                last[0] = (frame.f_code.co_filename, frame.f_lineno)
            else:
                last[0] = None
            tracemalloc.reset_peak()
            last[1] = tracemalloc.get_traced_memory()[0]
        return on_line

    def on_call(frame: FrameType, event: str, arg: object) -> Callable | None:
        if any(prefix in frame.f_code.co_filename for prefix in prefixes):
            close_line()  # the caller's line is suspended: what the callee allocates is its own lines'
            last[0] = None
            return on_line
        return None

    tracemalloc.start()
    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(None)
        tracemalloc.stop()
    return worst
