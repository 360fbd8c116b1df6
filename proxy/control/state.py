"""The state file: runtime split changes and rollout state that must survive a restart.

```json
{
  "version": 1,
  "splits": {"api": {"blue": 0.0, "green": 100.0}},
  "rollouts": {"api": {"state": "running", "step": 1, ...}}
}
```

`splits` holds the runtime splits set with `PUT /admin/routes/{name}/split`; `rollouts` holds each
route's rollout state as `proxy.core.rollout.to_json` writes it (kept opaque here: the rollout
controller reads it back with `from_json`). Unknown top-level keys are ignored, so a newer
Turnout may add some.

Writes are atomic: a temporary file in the same folder, fsync, rename over the state file, fsync
of the folder. A reader (or a crash at any moment) sees the old content or the new, never half.
A file that cannot be parsed at start, or holds what no config could (a weight above 1000000,
a route or upstream that is not a name), is moved aside to `<name>.corrupt-<UTC time>` with a
warning, never silently overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from proxy.core.config import NAME_RE
from proxy.core.spec import MAX_WEIGHT

log = logging.getLogger("turnout.state")

STATE_VERSION = 1


class StateFileError(ValueError):
    """State file content that cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True, slots=True)
class SavedState:
    """What the state file holds: route -> runtime split weights, route -> rollout state."""

    splits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    rollouts: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


def encode_state(state: SavedState) -> bytes:
    """The state file's bytes (indented JSON and a final newline: people read this file)."""
    document = {
        "version": STATE_VERSION,
        "splits": {route: dict(weights) for route, weights in state.splits.items()},
        "rollouts": {route: dict(rollout) for route, rollout in state.rollouts.items()},
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


def decode_state(data: bytes) -> SavedState:
    """Parse the state file's bytes; StateFileError naming the bad key otherwise."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StateFileError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise StateFileError("the top level must be a JSON object")
    version = document.get("version")
    if version != STATE_VERSION:
        raise StateFileError(f"version: expected {STATE_VERSION}, got {_shown(version)}")
    splits: dict[str, dict[str, float]] = {}
    for route, weights in _object(document.get("splits", {}), "splits").items():
        where = f"splits.{_name(route, 'splits')}"
        splits[route] = {
            upstream: _weight(value, f"{where}.{_name(upstream, where)}")
            for upstream, value in _object(weights, where).items()
        }
    rollouts = {
        _name(route, "rollouts"): _object(rollout, f"rollouts.{route}")
        for route, rollout in _object(document.get("rollouts", {}), "rollouts").items()
    }
    return SavedState(splits=splits, rollouts=rollouts)


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise StateFileError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _shown(value: object) -> str:
    """`value` for a message, cut short: the file may hold anything."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _name(key: str, where: str) -> str:
    """A route or upstream name as the config allows them (the file only ever holds those)."""
    if not NAME_RE.match(key):
        raise StateFileError(f"{where}: {_shown(key)} is not a route or upstream name")
    return key


def _weight(value: object, where: str) -> float:
    # bool is an int to Python but never a weight.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StateFileError(f"{where}: expected a number, got {_shown(value)}")
    weight = float(value)
    # The config's bound: larger weights make sums of weights overflow (no share at all).
    if not 0 <= weight <= MAX_WEIGHT:
        raise StateFileError(
            f"{where}: expected a number from 0 to {MAX_WEIGHT:.0f}, got {_shown(value)}"
        )
    return weight


def load_state(path: str) -> SavedState:
    """Read the state file at start; never fails.

    Missing: an empty state (logged). Unreadable: an empty state and an error in the log (the
    next change replaces the file). Corrupt: moved aside to `<name>.corrupt-<time>` with a
    warning naming both files, and an empty state.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        log.info("state file %s does not exist yet; the config file's splits are in force", path)
        return SavedState()
    except OSError as exc:
        log.error(
            "cannot read the state file %s (%s); starting without it, and the next runtime "
            "change will replace it",
            path,
            exc.strerror,
        )
        return SavedState()
    try:
        return decode_state(data)
    except StateFileError as exc:
        aside = _move_aside(path)
        if aside is None:
            log.warning(
                "state file %s is corrupt (%s) and could not be moved aside; ignoring it, and "
                "the next runtime change will replace it",
                path,
                exc,
            )
        else:
            log.warning(
                "state file %s is corrupt (%s); moved it to %s and starting without it",
                path,
                exc,
                aside,
            )
        return SavedState()


def _move_aside(path: str) -> str | None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = f"{path}.corrupt-{stamp}"
    serial = 1
    while os.path.exists(aside):
        serial += 1
        aside = f"{path}.corrupt-{stamp}-{serial}"
    try:
        os.rename(path, aside)
    except OSError:
        return None
    return aside


def save_state(path: str, state: SavedState) -> None:
    """Write the state file atomically (see the module docstring); OSError when it fails.

    On failure the old file is untouched and no temporary file is left behind.
    """
    folder = os.path.dirname(path) or "."
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    data = encode_state(state)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the folder's entry is on disk.
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
