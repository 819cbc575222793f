"""Build frozen dataclasses from parsed TOML, refusing anything unexpected.

Each dataclass field may carry ``metadata={"range": (lo, hi), "unit": "..."}``.
Errors name the key path, the value given and what is allowed. A dataclass can add
cross-field checks in a ``check(self)`` method that raises :class:`ConfigError`
with a key relative to itself; the builder prefixes the path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong: names the key path, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key} = {value!r}: {allowed}")

    def under(self, prefix: str) -> ConfigError:
        key = f"{prefix}.{self.key}" if not self.key.startswith("[") else f"{prefix}{self.key}"
        return ConfigError(key if prefix else self.key, self.value, self.allowed)


def bounded(default: Any = dataclasses.MISSING, lo: float | None = None, hi: float | None = None, unit: str = "") -> Any:
    """A dataclass field with an inclusive range, checked at load."""
    kwargs: dict[str, Any] = {"metadata": {"range": (lo, hi), "unit": unit}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def build(cls: type[T], raw: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from the mapping ``raw`` (keys checked, values typed)."""
    if not isinstance(raw, dict):
        raise ConfigError(path or "<root>", raw, f"must be a table of {cls.__name__} settings")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = _join(path, unknown[0])
        raise ConfigError(key, raw[unknown[0]], f"unknown key; allowed keys here: {', '.join(sorted(fields))}")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = _join(path, name)
        if name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(key, None, "required key is missing")
            continue
        value = _convert(hints[name], raw[name], key)
        _check_range(field, value, key)
        values[name] = value
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise exc.under(path) from None
    return obj


def check_ranges(obj: Any, path: str = "") -> None:
    """The bounded fields of a dataclass built in code, not by :func:`build`: each finite and in its range,
    in nested tables too (``stimulator.dose`` built with a NaN limit was never reached)."""
    for field in dataclasses.fields(obj):
        value, key = getattr(obj, field.name), _join(path, field.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
            continue
        if isinstance(value, tuple) and value and all(dataclasses.is_dataclass(item) for item in value):
            for index, item in enumerate(value):
                check_ranges(item, f"{key}[{index}]")
            continue
        if "range" not in field.metadata:
            continue
        items = value if isinstance(value, tuple) else (value,)
        if any(not math.isfinite(item) for item in items):
            raise ConfigError(key, value, "must be a finite number")
        _check_range(field, value, key)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values"
    if dataclasses.is_dataclass(tp):
        return f"a table ({tp.__name__})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in typing.get_args(tp)
        ):
            raise ConfigError(key, value, f"must be {_describe(tp)}")
        return value
    if origin in (types.UnionType, typing.Union):
        tagged = _tagged_options(typing.get_args(tp))
        if tagged and isinstance(value, dict):
            return _convert_tagged(tagged, value, key)
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, value, "must be " + " or ".join(_describe(o) for o in typing.get_args(tp)))
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, value, f"must be {_describe(tp)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, value, f"must be {_describe(tp)}")
        return tuple(_convert(a, item, f"{key}[{i}]") for i, (a, item) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    raise TypeError(f"schema type {tp!r} at {key} is not supported")


def _tagged_options(options: tuple[Any, ...]) -> dict[Any, Any]:
    """Union members that are dataclasses told apart by a one-value Literal ``kind`` ({} otherwise)."""
    tags: dict[Any, Any] = {}
    for option in options:
        if not dataclasses.is_dataclass(option):
            return {}
        kind = typing.get_type_hints(option).get("kind")
        if typing.get_origin(kind) is not Literal or len(typing.get_args(kind)) != 1:
            return {}
        tags[typing.get_args(kind)[0]] = option
    return tags


def _convert_tagged(tagged: dict[Any, Any], value: dict[str, Any], key: str) -> Any:
    """Build the member named by ``value["kind"]`` so errors come from that member alone.

    Without ``kind``, the member whose ``kind`` has a default is meant (if there is one).
    """
    if "kind" not in value:
        defaults = [
            cls for cls in tagged.values()
            if next(f for f in dataclasses.fields(cls) if f.name == "kind").default is not dataclasses.MISSING
        ]
        if len(defaults) != 1:
            raise ConfigError(f"{key}.kind", None, "required key is missing; one of " + ", ".join(map(repr, tagged)))
        return build(defaults[0], value, key)
    kind = value["kind"]
    cls = next((c for tag, c in tagged.items() if type(tag) is type(kind) and tag == kind), None)
    if cls is None:
        raise ConfigError(f"{key}.kind", kind, "must be one of " + ", ".join(map(repr, tagged)))
    return build(cls, value, key)


def _check_range(field: dataclasses.Field, value: Any, key: str) -> None:
    lo, hi = field.metadata.get("range", (None, None))
    if lo is None and hi is None:
        return
    unit = field.metadata.get("unit", "")
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if (lo is not None and item < lo) or (hi is not None and item > hi):
            span = f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
            raise ConfigError(key, value, f"must be within {span}{' ' + unit if unit else ''}")
