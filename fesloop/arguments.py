"""Range checks of command-line numbers: argparse's ``type=float`` lets nan, inf and negatives through."""

from __future__ import annotations

import math
import sys


def require_number(
    command: str, option: str, value: float, low: float, high: float = math.inf, *, low_included: bool = False
) -> None:
    """Exit with code 1 (how fesloop commands refuse a value), naming the option, the value and the
    range, unless ``value`` is finite, above ``low`` (or equal, with ``low_included``) and at most ``high``."""
    above = value >= low if low_included else value > low
    if above and value <= high and math.isfinite(value):
        return
    allowed = f"{'>=' if low_included else '>'} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
    sys.exit(f"fesloop {command}: {option} = {value!r}: must be a finite number {allowed}")
