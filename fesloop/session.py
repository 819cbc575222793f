"""Operator confirmations before a real stimulator may be armed.

Per session the operator confirms each contraindication and setup item, by name or
initials. Interactive at a terminal; a lab script passes each item explicitly
(``--confirm ITEM`` per item and ``--operator NAME``), never silently. The record
travels with the arm request, and the stimulator refuses to arm a real device
without a complete one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CONFIRMATION_ITEMS: dict[str, str] = {
    "no-implant": "The patient has no pacemaker or other implanted electronic device",
    "electrodes-checked": "Electrodes are placed as configured (muscle, size) and the skin was checked",
    "stop-button": "The stimulator's hardware stop button is within the operator's reach",
}


class ConfirmationMissing(RuntimeError):
    """Arming a real stimulator without every confirmation item; the message lists what is missing."""


@dataclass(frozen=True)
class Confirmation:
    operator: str
    items: tuple[str, ...]
    time_unix_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"operator": self.operator, "items": list(self.items), "time_unix_s": self.time_unix_s}

    def markers(self) -> list[str]:
        """One line per item, for the session log and the LSL marker stream."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time_unix_s))
        return [f"confirmed by {self.operator} at {stamp}: {CONFIRMATION_ITEMS[item]}" for item in self.items]


MAX_RECORD_CHARS = 200


def printable(text: object) -> str:
    """``text`` as one line of printable characters for the record (markers, log, status): anything
    else (newlines, control characters, lone surrogates liblsl cannot encode) becomes '?'; at most
    MAX_RECORD_CHARS."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text)[:MAX_RECORD_CHARS]).strip()


def check_confirmation(record: Any) -> Confirmation:
    """Validate a confirmation record (from an arm request); raise ConfirmationMissing naming the gap."""
    if not isinstance(record, dict):
        raise ConfirmationMissing(_missing_message(list(CONFIRMATION_ITEMS)))
    operator = record.get("operator")
    items = record.get("items")
    stamp = record.get("time_unix_s")
    if not isinstance(operator, str) or not printable(operator):
        raise ConfirmationMissing("the operator's name or initials are missing (--operator NAME)")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfirmationMissing(_missing_message(list(CONFIRMATION_ITEMS)))
    missing = [item for item in CONFIRMATION_ITEMS if item not in items]
    if missing:
        raise ConfirmationMissing(_missing_message(missing))
    unknown = [item for item in items if item not in CONFIRMATION_ITEMS]
    if unknown:
        raise ConfirmationMissing(f"unknown confirmation items {unknown}; known: {list(CONFIRMATION_ITEMS)}")
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not 1e9 <= stamp <= 1e11:  # NaN fails too
        raise ConfirmationMissing(f"the confirmation's time is not a Unix time in seconds: {printable(repr(stamp))}")
    return Confirmation(printable(operator), tuple(CONFIRMATION_ITEMS), float(stamp))


def _missing_message(missing: Sequence[str]) -> str:
    lines = "; ".join(f"--confirm {item} ({CONFIRMATION_ITEMS[item]})" for item in missing)
    return f"arming a real stimulator needs the operator's confirmation of: {lines}"


def confirm(
    operator: str | None,
    given: Sequence[str],
    interactive: bool,
    ask: Callable[[str], str] = input,
    now: Callable[[], float] = time.time,
) -> Confirmation:
    """Collect the confirmations: from flags, or by asking each missing item at a terminal."""
    items = [item for item in CONFIRMATION_ITEMS if item in given]
    unknown = [item for item in given if item not in CONFIRMATION_ITEMS]
    if unknown:
        raise ConfirmationMissing(f"unknown confirmation items {unknown}; known: {list(CONFIRMATION_ITEMS)}")
    if interactive:
        while not operator or not operator.strip():
            operator = ask("Operator name or initials: ")
        for item in [item for item in CONFIRMATION_ITEMS if item not in items]:
            answer = ask(f"{CONFIRMATION_ITEMS[item]}? Type yes to confirm: ")
            if answer.strip().lower() != "yes":
                raise ConfirmationMissing(f"not confirmed: {CONFIRMATION_ITEMS[item]}; the stimulator stays disarmed")
            items.append(item)
    return check_confirmation({"operator": operator, "items": items, "time_unix_s": now()})
