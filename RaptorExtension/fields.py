"""Explicit type checks for JSON read from users' files (embedding metadata, probe files, batch records).

Why not trust the JSON: a ``k`` of ``"8"``, a ``planes`` of ``3`` or a
``training`` that is a string all parse, and then fail deep inside a reader
or, worse, compare unequal to the right value without a word.  Every field a
reader uses is checked here first, and a wrong one is one
:class:`~.errors.InputError` naming the file, the field and what it holds.

A check is a function ``value -> problem or None``; :func:`check_fields`
applies a ``{field: check}`` schema.  Fields not in the schema are left as
they are (newer files may add some).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import InputError

Check = Callable[[Any], "str | None"]


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, (list, dict)) else f"a {type(value).__name__}"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def INT(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not is_int(value):
            return "must be a whole number"
        if lo is not None and value < lo:
            return f"must be at least {lo}"
        if hi is not None and value > hi:
            return f"must be at most {hi}"
        return None

    return check


def NUMBER(value: Any) -> str | None:
    return None if is_number(value) else "must be a finite number"


def STR(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be text"


def BOOL(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def ANY(value: Any) -> str | None:
    return None


def HEX(length: int) -> Check:
    pattern = re.compile(f"[0-9a-f]{{{length}}}")

    def check(value: Any) -> str | None:
        return None if isinstance(value, str) and pattern.fullmatch(value) else f"must be {length} hexadecimal digits"

    return check


def ONE_OF(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        if any(value == c and type(value) is type(c) for c in choices):
            return None
        return "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def NULLABLE(inner: Check) -> Check:
    def check(value: Any) -> str | None:
        return None if value is None else inner(value)

    return check


def EITHER(*checks: Check, problem: str) -> Check:
    def check(value: Any) -> str | None:
        return None if any(c(value) is None for c in checks) else problem

    return check


def LIST(of: Check = ANY, *, min_len: int = 0, max_len: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return "must be a list"
        if len(value) < min_len:
            return f"must hold at least {min_len} item(s)"
        if max_len is not None and len(value) > max_len:
            return f"must hold at most {max_len} item(s)"
        for i, item in enumerate(value):
            problem = of(item)
            if problem:
                return f"item {i} {problem} (found {_shown(item)})"
        return None

    return check


def DICT(of: Check = ANY, keys: Check = STR) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return "must be an object"
        for key, item in value.items():
            problem = keys(key) or of(item)
            if problem:
                return f"entry {key!r} {problem} (found {_shown(item)})"
        return None

    return check


def SCHEMA(spec: Mapping[str, Check], required: Iterable[str] = ()) -> Check:
    """An object whose fields follow ``spec`` (a nested schema)."""
    required = tuple(required)

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return "must be an object"
        return _problem(value, spec, required)

    return check


def _problem(obj: dict, spec: Mapping[str, Check], required: Iterable[str]) -> str | None:
    for name in required:
        if name not in obj:
            return f"has no field {name!r}"
    for name, check in spec.items():
        if name in obj:
            problem = check(obj[name])
            if problem:
                return f"field {name!r} {problem} (found {_shown(obj[name])})"
    return None


def check_fields(obj: Any, spec: Mapping[str, Check], where: str, *, required: Iterable[str] = (),
                 what: str = "metadata") -> dict:
    """Raise one :class:`InputError` line unless ``obj`` is an object whose fields follow ``spec``; returns it."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: the {what} must be a JSON object (found {_shown(obj)})")
    problem = _problem(obj, spec, required)
    if problem:
        raise InputError(f"{where}: the {what} {problem}")
    return obj


__all__ = ["check_fields", "INT", "NUMBER", "STR", "BOOL", "ANY", "HEX", "ONE_OF", "NULLABLE", "EITHER", "LIST", "DICT",
           "SCHEMA", "is_int", "is_number"]
