"""Operator confirmations: never silent, each item named, refusals say what is missing."""

from __future__ import annotations

import pytest

from fesloop.session import CONFIRMATION_ITEMS, ConfirmationMissing, check_confirmation, confirm

ALL = list(CONFIRMATION_ITEMS)


def test_flags_naming_every_item_confirm_without_asking() -> None:
    def never(_prompt: str) -> str:
        raise AssertionError("must not ask")

    record = confirm("AB", ALL, interactive=False, ask=never, now=lambda: 1764000000.0)
    assert record.operator == "AB" and record.items == tuple(ALL) and record.time_unix_s == 1764000000.0
    assert len(record.markers()) == 3 and all("confirmed by AB" in m for m in record.markers())
    assert check_confirmation(record.as_dict()) == record


@pytest.mark.parametrize("missing", ALL)
def test_a_missing_flag_is_refused_naming_it(missing: str) -> None:
    given = [item for item in ALL if item != missing]
    with pytest.raises(ConfirmationMissing, match=f"--confirm {missing}"):
        confirm("AB", given, interactive=False)


def test_no_operator_is_refused() -> None:
    with pytest.raises(ConfirmationMissing, match="--operator"):
        confirm(None, ALL, interactive=False)


def test_unknown_item_is_refused() -> None:
    with pytest.raises(ConfirmationMissing, match="unknown"):
        confirm("AB", [*ALL, "no-pacemaker"], interactive=False)


def test_interactive_asks_operator_and_each_missing_item() -> None:
    answers = iter(["CD", "yes", "yes"])
    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return next(answers)

    record = confirm(None, ["stop-button"], interactive=True, ask=ask, now=lambda: 1764000005.0)
    assert record.operator == "CD" and set(record.items) == set(ALL)
    assert len(asked) == 3 and "pacemaker" in asked[1]


def test_interactive_anything_but_yes_refuses() -> None:
    answers = iter(["CD", "y"])
    with pytest.raises(ConfirmationMissing, match="pacemaker"):
        confirm(None, [], interactive=True, ask=lambda _p: next(answers))


@pytest.mark.parametrize(
    "record",
    [None, {}, {"operator": "AB"}, {"operator": "", "items": ALL, "time_unix_s": 1.0},
     {"operator": "AB", "items": ALL[:2], "time_unix_s": 1.0}, {"operator": "AB", "items": ALL}],
)  # fmt: skip
def test_incomplete_records_are_refused(record: object) -> None:
    with pytest.raises(ConfirmationMissing):
        check_confirmation(record)


@pytest.mark.parametrize("stamp", [float("nan"), float("inf"), 1e300, 10**400, True, 1.0, "1764000000"])
def test_a_confirmation_time_that_is_not_a_unix_time_is_refused(stamp: object) -> None:
    """NaN or 1e300 passed, then raised in time.localtime inside the stimulator's arm handler, which
    latched FAULT (even while ARMED) instead of refusing the request."""
    with pytest.raises(ConfirmationMissing, match="not a Unix time in seconds"):
        check_confirmation({"operator": "AB", "items": ALL, "time_unix_s": stamp})


def test_the_operator_goes_on_record_as_one_printable_line() -> None:
    confirmation = check_confirmation({"operator": "A\nB\ud800", "items": ALL, "time_unix_s": 1764000000.0})
    assert confirmation.operator == "A?B?" and all("\n" not in m for m in confirmation.markers())
