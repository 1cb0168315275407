"""Hypothesis strategies for fuzzing the JSON that Raptor's files carry (embedding metadata, probe fields).

Shared by the embedding and the probe fuzz tests: every path into a JSON value,
any JSON value, and a value's JSON kind, so a test can swap one field for a
value of another kind and check the file loads as written or fails in one line.
"""

from __future__ import annotations

from hypothesis import strategies as st


def json_paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices), the empty path first."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_paths(item, prefix + (index,))


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def json_kind(value) -> str:
    """``number`` for ints and floats (not bools), else the type's name."""
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
