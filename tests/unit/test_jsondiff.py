"""JSON comparison with ignored paths (`proxy.core.jsondiff`): tables, then properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.jsondiff import IgnorePaths, diff, parse_path


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("id", ("id",)),
        ("meta.request_id", ("meta", "request_id")),
        ("items[].id", ("items", "[]", "id")),
        ("grid[][]", ("grid", "[]", "[]")),
        ("[].id", ("[]", "id")),
        ("*", ("*",)),
        ("data.*.etag", ("data", "*", "etag")),
        ("*[].x", ("*", "[]", "x")),
        ("a[b", ("a[b",)),
    ],
)
def test_parse_path(text: str, segments: tuple[str, ...]) -> None:
    assert parse_path(text) == segments


@pytest.mark.parametrize("text", ["", "a..b", ".a", "a."])
def test_parse_path_rejects_empty_segments(text: str) -> None:
    with pytest.raises(ValueError, match="empty segment"):
        parse_path(text)


CASES: list[tuple[str, Any, Any, tuple[str, ...], list[str]]] = [
    ("equal scalars", 1, 1, (), []),
    ("int equals float", {"n": 1}, {"n": 1.0}, (), []),
    ("true is not 1", {"n": True}, {"n": 1}, (), ["n"]),
    ("false is not 0.0", [False], [0.0], (), ["[0]"]),
    ("null is not 0", {"n": None}, {"n": 0}, (), ["n"]),
    ("root scalar", "a", "b", (), ["$"]),
    ("root types", {}, [], (), ["$"]),
    ("member differs", {"a": {"b": 1}}, {"a": {"b": 2}}, (), ["a.b"]),
    ("member only left", {"a": 1, "b": 2}, {"a": 1}, (), ["b"]),
    ("member only right", {"a": 1}, {"a": 1, "c": 3}, (), ["c"]),
    ("key order ignored", {"a": 1, "b": 2}, {"b": 2, "a": 1}, (), []),
    ("list order matters", [1, 2], [2, 1], (), ["[0]", "[1]"]),
    ("list longer", {"x": [1]}, {"x": [1, 2, 3]}, (), ["x[1]", "x[2]"]),
    ("type change stops", {"a": {"b": 1}}, {"a": [1]}, (), ["a"]),
    ("ignored member", {"id": 1, "v": 1}, {"id": 2, "v": 1}, ("id",), []),
    ("ignored member missing", {"id": 1, "v": 1}, {"v": 1}, ("id",), []),
    ("ignore is exact", {"id": 1, "idx": 1}, {"id": 2, "idx": 2}, ("id",), ["idx"]),
    ("ignored subtree", {"meta": {"a": 1}}, {"meta": {"b": [2]}}, ("meta",), []),
    (
        "dotted",
        {"meta": {"request_id": "x", "v": 1}},
        {"meta": {"request_id": "y", "v": 2}},
        ("meta.request_id",),
        ["meta.v"],
    ),
    (
        "list elements",
        {"items": [{"id": 1, "v": 1}, {"id": 2, "v": 2}]},
        {"items": [{"id": 7, "v": 1}, {"id": 8, "v": 3}]},
        ("items[].id",),
        ["items[1].v"],
    ),
    (
        "elements path does not match an object",
        {"items": {"id": 1}},
        {"items": {"id": 2}},
        ("items[].id",),
        ["items.id"],
    ),
    ("whole list elements", {"x": [1, 2]}, {"x": [3]}, ("x[]",), []),
    ("root list", [{"id": 1, "v": 0}], [{"id": 2, "v": 0}], ("[].id",), []),
    ("nested lists", {"g": [[1, 2], [3]]}, {"g": [[9], [9, 9]]}, ("g[][]",), []),
    (
        "wildcard member",
        {"a": {"ts": 1, "v": 1}, "b": {"ts": 2, "v": 1}},
        {"a": {"ts": 3, "v": 1}, "b": {"ts": 4, "v": 2}},
        ("*.ts",),
        ["b.v"],
    ),
    ("wildcard element", [{"ts": 1}], [{"ts": 2}], ("*.ts",), []),
    ("wildcard everything", {"a": 1}, {"b": 2}, ("*",), []),
    (
        "several ignores",
        {"id": 1, "at": "t1", "items": [{"etag": "a", "n": 1}]},
        {"id": 2, "at": "t2", "items": [{"etag": "b", "n": 1}]},
        ("id", "at", "items[].etag"),
        [],
    ),
    (
        "document order",
        {"a": {"x": 1}, "b": 1, "c": [1, 2]},
        {"a": {"x": 2}, "c": [1], "d": 0},
        (),
        ["a.x", "b", "c[1]", "d"],
    ),
]


@pytest.mark.parametrize(
    ("a", "b", "ignore", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_diff(a: Any, b: Any, ignore: tuple[str, ...], expected: list[str]) -> None:
    assert diff(a, b, IgnorePaths(ignore), limit=10) == expected
    # The comparison is symmetric in which paths differ (the order may follow `a`).
    assert sorted(diff(b, a, IgnorePaths(ignore), limit=10)) == sorted(expected)


def test_limit_bounds_the_sample() -> None:
    a = {f"k{i}": i for i in range(100)}
    b = {f"k{i}": -i - 1 for i in range(100)}
    assert diff(a, b, limit=5) == ["k0", "k1", "k2", "k3", "k4"]
    assert diff(a, b, limit=0) == []


def test_deep_nesting_does_not_recurse() -> None:
    depth = 5000  # deeper than Python's recursion limit
    a: Any = 1
    b: Any = 2
    for _ in range(depth):
        a, b = [a], [b]
    assert diff(a, b) == ["[0]" * depth]


# -- properties ------------------------------------------------------------------------------

# Member names a path can name: no ".", "[", "]" or "*".
KEYS = st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=4)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=25,
)

Step = str | int  # a member name or a list index


def locations(value: Any, at: tuple[Step, ...] = ()) -> list[tuple[Step, ...]]:
    """Every concrete location in `value`, the root included."""
    found = [at]
    if isinstance(value, dict):
        for key, child in value.items():
            found.extend(locations(child, (*at, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.extend(locations(child, (*at, index)))
    return found


def get(value: Any, at: tuple[Step, ...]) -> Any:
    for step in at:
        value = value[step]
    return value


def replaced(value: Any, at: tuple[Step, ...], new: Any) -> Any:
    """A copy of `value` with the value at `at` replaced by `new`."""
    if not at:
        return new
    head, rest = at[0], at[1:]
    if isinstance(value, dict):
        copy_d = dict(value)
        copy_d[head] = replaced(value[head], rest, new)
        return copy_d
    copy_l = list(value)
    copy_l[head] = replaced(value[head], rest, new)  # type: ignore[index]
    return copy_l


def concrete(at: tuple[Step, ...]) -> str:
    """The path `diff` reports for a location."""
    text = ""
    for step in at:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text = f"{text}.{step}" if text else step
    return text or "$"


def pattern(at: tuple[Step, ...], choices: list[int]) -> str:
    """An ignore path that matches `at`: each index as `[]` or `*`, each key as itself or `*`."""
    parts: list[str] = []
    for step, choice in zip(at, choices, strict=False):
        if isinstance(step, int):
            if choice % 2 == 0 and parts:
                parts[-1] += "[]"
            elif choice % 2 == 0:
                parts.append("[]")
            else:
                parts.append("*")
        else:
            parts.append("*" if choice % 3 == 0 else step)
    return ".".join(parts)


def different(old: Any) -> Any:
    """A value of another JSON type than `old`, so it differs at exactly that path."""
    return "changed" if isinstance(old, dict) else {"changed": True}


@given(JSON, st.lists(st.text(alphabet="ab.*[]", min_size=1, max_size=6), max_size=3))
def test_a_value_equals_itself(value: Any, ignore: list[str]) -> None:
    try:
        paths = IgnorePaths(ignore)
    except ValueError:
        paths = IgnorePaths()
    assert diff(value, value, paths) == []


@settings(max_examples=300)
@given(JSON, st.data())
def test_differences_only_at_ignored_paths_compare_equal(value: Any, data: st.DataObject) -> None:
    spots = data.draw(st.lists(st.sampled_from(locations(value)[1:] or [()]), max_size=3))
    changed = value
    ignore: list[str] = []
    for at in spots:
        if not at:
            continue
        choices = data.draw(st.lists(st.integers(0, 5), min_size=len(at), max_size=len(at)))
        try:
            new = different(get(changed, at))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change replaced this spot's parent
        changed = replaced(changed, at, new)
        ignore.append(pattern(at, choices))
    assert diff(value, changed, IgnorePaths(ignore)) == []


@settings(max_examples=300)
@given(JSON, st.data())
def test_a_difference_is_reported_at_its_path(value: Any, data: st.DataObject) -> None:
    at = data.draw(st.sampled_from(locations(value)))
    changed = replaced(value, at, different(get(value, at)))
    assert diff(value, changed) == [concrete(at)]
    assert diff(changed, value) == [concrete(at)]


@given(JSON, JSON)
def test_equal_means_no_paths_both_ways(a: Any, b: Any) -> None:
    assert (diff(a, b) == []) == (diff(b, a) == [])
