"""Settings checked as they are read: mappings turned into frozen dataclasses, every problem named by its key.

    config = from_mapping(TrainConfig, {"lr": 3e-4, "batch_size": 8})

`from_mapping(cls, data)` builds any dataclass from a mapping (YAML, JSON, a checkpoint's config.json).
Every problem (an unknown key, with the nearest known one suggested; a wrong type; a value out of range)
is collected and raised together as one `ConfigError` whose lines name the key path:

    tokenize.val_fraction: must be in (0, 1), got 1.5

A dataclass checks its own values in a `problems()` method that yields `(key, message)` pairs (the
`check_*` helpers below write the usual ones); the loader prefixes the path. It imports nothing of the
project's, so that every schema can use it: llm.model's ModelConfig, and llm.config's sections of
params.yaml, which build on the model's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Problem = tuple[str, str]  # (key path, message)


class ConfigError(ValueError):
    """Invalid settings; `problems` holds every `(key path, message)` found, not just the first."""

    def __init__(self, problems: list[Problem], source: str = "params.yaml"):
        self.problems = problems
        lines = "\n".join(f"  {key}: {message}" if key else f"  {message}" for key, message in problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source} has {count}; fix {'them' if len(problems) != 1 else 'it'} and rerun:\n{lines}")


def bulleted(lines: list[str], limit: int = 5) -> str:
    """The first `limit` lines, each on a new indented line, and how many more there are: how a list of
    problems is shown in an error message."""
    more = [f"and {len(lines) - limit} more"] if len(lines) > limit else []
    return "".join(f"\n  {line}" for line in lines[:limit] + more)


# ---------------------------------------------------------------------------------------------------
# The generic loader


# Returned for a value that could not be built at all, so that its parents skip their own checks.
_INVALID: Any = object()


def from_mapping(cls: type[T], data: Any, source: str = "params.yaml") -> T:
    """Build dataclass `cls` from a mapping, raising one ConfigError that lists every problem."""
    problems: list[Problem] = []
    value = _convert(cls, data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return value


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, Mapping) else "a mapping"


def _convert(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """Check `value` against type `tp`; append problems, return the value or _INVALID."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path, problems)
        for candidate in inner:  # first member that accepts the value
            trial: list[Problem] = []
            result = _convert(candidate, value, path, trial)
            if result is not _INVALID:
                problems.extend(trial)
                return result
        problems.append((path, f"must be one of {', '.join(_type_name(a) for a in inner)}, got {_describe(value)}"))
        return _INVALID
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append((path, f"must be one of {choices}, got {value!r}"))
            return _INVALID
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append((path, f"must be a list, got {_describe(value)}"))
            return _INVALID
        item_type = args[0] if args else Any
        items = [_convert(item_type, item, _join(path, i), problems) for i, item in enumerate(value)]
        if any(item is _INVALID for item in items):
            return _INVALID
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append((path, f"must be a mapping, got {_describe(value)}"))
            return _INVALID
        value_type = args[1] if args else Any
        converted = {k: _convert(value_type, v, _join(path, str(k)), problems) for k, v in value.items()}
        return _INVALID if _INVALID in converted.values() else converted
    if tp is Any:
        return value
    if tp is float:
        # YAML writes 1 for 1.0; bool is an int subclass but never a number here.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML 1.2 reads .nan and .inf as floats (JSON's NaN and Infinity too); a NaN slips past checks such
            # as `value <= 0` (every comparison with it is False). Refused here, once for every section.
            if not math.isfinite(value):
                problems.append((path, f"must be a finite number, got {value}"))
                return _INVALID
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append((path, f"must be {_type_name(tp)}, got {_describe(value)}"))
    return _INVALID


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert_dataclass(cls: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    if value is None:
        value = {}  # an empty YAML section means "all defaults"
    if not isinstance(value, Mapping):
        problems.append((path, f"must be a mapping of settings, got {_describe(value)}"))
        return _INVALID
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    valid = True
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            problems.append((_join(path, str(key)), f"unknown key{hint}"))
            valid = False
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], _join(path, name), problems)
            valid = valid and kwargs[name] is not _INVALID
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((_join(path, name), "is required"))
            valid = False
    if not valid:
        return _INVALID
    instance = cls(**kwargs)
    check = getattr(instance, "problems", None)
    if check is not None:
        problems.extend((_join(path, key), message) for key, message in check())
    return instance


# ---------------------------------------------------------------------------------------------------
# Small checks shared by the sections


def check_range(
    key: str, value: float, low: float | None = None, high: float | None = None, *, closed: str = "[]"
) -> Iterator[Problem]:
    """Yield a problem when `value` is outside the interval; `closed` says which ends are included."""
    low_ok = low is None or (value >= low if closed[0] == "[" else value > low)
    high_ok = high is None or (value <= high if closed[1] == "]" else value < high)
    if not (low_ok and high_ok):
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        yield key, f"must be in {closed[0]}{left}, {right}{closed[1]}, got {value!r}"


def check_fractions(key: str, value: float, other_key: str, other: float, rest: str) -> Iterator[Problem]:
    """Two splits' shares of the records, each in (0, 1), which must leave some records for split `rest`."""
    yield from check_range(key, value, 0, 1, closed="()")
    yield from check_range(other_key, other, 0, 1, closed="()")
    if value + other >= 1:
        yield other_key, f"{key} + {other_key} must leave some records for {rest}, got {value} + {other}"


def check_positive(key: str, value: float) -> Iterator[Problem]:
    if value <= 0:
        yield key, f"must be > 0, got {value!r}"
