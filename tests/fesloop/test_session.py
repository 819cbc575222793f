"""Operator confirmations: never silent, each item named, refusals say what is missing."""

from __future__ import annotations

import pytest

from fesloop.session import CONFIRMATION_ITEMS, ConfirmationMissing, check_confirmation, confirm

ALL = list(CONFIRMATION_ITEMS)


def test_flags_naming_every_item_confirm_without_asking() -> None:
    def never(_prompt: str) -> str:
        raise AssertionError("must not ask")

    record = confirm("AB", ALL, interactive=False, ask=never, now=lambda: 1000.0)
    assert record.operator == "AB" and record.items == tuple(ALL) and record.time_unix_s == 1000.0
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

    record = confirm(None, ["stop-button"], interactive=True, ask=ask, now=lambda: 5.0)
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
