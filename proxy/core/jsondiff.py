"""Compare two JSON values, ignoring volatile fields, and say where they differ.

Used by the mirror to compare the primary's and the shadow's JSON response bodies. Pure core:
no I/O, no clock, no randomness; the values come in already parsed (orjson).

Ignore paths (`mirror.ignore_fields`) are dotted paths from the document root:

- `meta.request_id`: the member `request_id` of the member `meta` of the root object;
- `items[].id`: the member `id` of every element of the list `items` (`[]` = each element of a
  list, and it may repeat: `grid[][]`; a bare `[].id` starts at a root list);
- `*`: any member of an object or any element of a list (`*.updated_at`, `data.*.etag`).

A difference at an ignored path, or anywhere below it, does not count, and neither does a member
present on one side only when its path is ignored. Keys that contain `.`, or are exactly `*` or
end in `[]`, cannot be named. Numbers compare by value (`1` equals `1.0`), but `true` is not `1`.

Differing paths are reported concretely: `meta.version`, `items[3].id`, `[0]` (an element of a
root list), and `$` for the root itself.

Never recurse here: a body parsed from untrusted JSON may nest a thousand levels deep.
"""

from __future__ import annotations

from collections.abc import Iterable

WILDCARD = "*"
ELEMENTS = "[]"
ROOT = "$"

_MISSING = object()


class _Node:
    """One step of the ignore trie; `terminal` means: everything at and below is ignored."""

    __slots__ = ("elements", "keys", "terminal", "wildcard")

    def __init__(self) -> None:
        self.keys: dict[str, _Node] = {}
        self.wildcard: _Node | None = None
        self.elements: _Node | None = None
        self.terminal = False


# The trie nodes that still apply at one place in the document; empty: nothing is ignored below.
_Active = tuple[_Node, ...]


class IgnorePaths:
    """A compiled set of ignore paths (see the module docstring for the syntax)."""

    __slots__ = ("_root", "paths")

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.paths = tuple(paths)
        self._root = _Node()
        for text in self.paths:
            node = self._root
            for segment in parse_path(text):
                if segment == WILDCARD:
                    node.wildcard = node = node.wildcard or _Node()
                elif segment == ELEMENTS:
                    node.elements = node = node.elements or _Node()
                else:
                    node = node.keys.setdefault(segment, _Node())
            node.terminal = True

    def root(self) -> _Active:
        """The active nodes at the document root."""
        return (self._root,) if self.paths else ()


def parse_path(text: str) -> tuple[str, ...]:
    """Split an ignore path into segments: member names, `*` and `[]` (one per list level).

    Raises ValueError for an empty path or an empty segment (`a..b`).
    """
    segments: list[str] = []
    for part in text.split("."):
        if part == WILDCARD:
            segments.append(WILDCARD)
            continue
        levels = 0
        while part.endswith(ELEMENTS):
            part = part[: -len(ELEMENTS)]
            levels += 1
        if part == WILDCARD:
            segments.append(WILDCARD)
        elif part:
            segments.append(part)
        elif not levels:
            raise ValueError(f"empty segment in JSON path {text!r}")
        segments.extend([ELEMENTS] * levels)
    return tuple(segments)


def _member(active: _Active, key: str) -> tuple[_Active, bool]:
    """The nodes that apply at object member `key`, and whether it is ignored."""
    found: list[_Node] = []
    for node in active:
        child = node.keys.get(key)
        if child is not None:
            found.append(child)
        if node.wildcard is not None:
            found.append(node.wildcard)
    return tuple(found), any(node.terminal for node in found)


def _element(active: _Active) -> tuple[_Active, bool]:
    """The nodes that apply at any list element, and whether elements are ignored."""
    found: list[_Node] = []
    for node in active:
        if node.elements is not None:
            found.append(node.elements)
        if node.wildcard is not None:
            found.append(node.wildcard)
    return tuple(found), any(node.terminal for node in found)


def _member_path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _scalar_equal(a: object, b: object) -> bool:
    """JSON equality of two values that are not both objects or both lists."""
    # bool is a subclass of int in Python, and True == 1: JSON says they differ.
    a_bool, b_bool = isinstance(a, bool), isinstance(b, bool)
    if a_bool or b_bool:
        return a_bool and b_bool and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def diff(a: object, b: object, ignore: IgnorePaths | None = None, limit: int = 5) -> list[str]:
    """Paths where the JSON values `a` and `b` differ, outside `ignore`; at most `limit`.

    Paths come in document order (members of `a` in its order, then members only `b` has;
    list elements by index). An empty list means: equal. A member or element present on one
    side only is a difference at its own path; two values of different JSON types differ at
    their path (nothing below it is reported).
    """
    found: list[str] = []
    if limit <= 0:
        return found
    root = ignore.root() if ignore is not None else ()
    # Work items: (a, b, concrete path, active ignore nodes), pushed reversed so they pop in
    # document order; _MISSING stands for the side that lacks a member or element.
    stack: list[tuple[object, object, str, _Active]] = [(a, b, "", root)]
    while stack:
        left, right, path, active = stack.pop()
        children: list[tuple[object, object, str, _Active]] = []
        if left is _MISSING or right is _MISSING:
            found.append(path)
        elif isinstance(left, dict) and isinstance(right, dict):
            keys = list(left)
            keys.extend(key for key in right if key not in left)
            for key in keys:
                below, ignored = _member(active, key) if active else ((), False)
                if not ignored:
                    child = (left.get(key, _MISSING), right.get(key, _MISSING))
                    children.append((*child, _member_path(path, key), below))
        elif isinstance(left, list) and isinstance(right, list):
            below, ignored = _element(active) if active else ((), False)
            if not ignored:
                for index in range(max(len(left), len(right))):
                    children.append(
                        (
                            left[index] if index < len(left) else _MISSING,
                            right[index] if index < len(right) else _MISSING,
                            f"{path}[{index}]",
                            below,
                        )
                    )
        elif not _scalar_equal(left, right):
            found.append(path or ROOT)
        if len(found) >= limit:
            return found
        stack.extend(reversed(children))
    return found
