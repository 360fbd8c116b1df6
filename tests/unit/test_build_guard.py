"""The suite's guard against a compiled module older than its source (tests/support/build.py)."""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from tests.support.build import stale_modules

SUFFIX = EXTENSION_SUFFIXES[0]


def write(path: Path, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_a_source_edited_after_compiling_is_named(tmp_path: Path) -> None:
    package = tmp_path / "proxy"
    write(package / "dataplane" / f"http1{SUFFIX}", 1_000)
    write(package / "dataplane" / "http1.py", 2_000)  # edited after the compile
    write(package / "core" / f"routing{SUFFIX}", 2_000)
    write(package / "core" / "routing.py", 1_000)  # compiled after the last edit
    assert stale_modules(package) == ["proxy/dataplane/http1.py"]


def test_a_pure_tree_has_nothing_stale(tmp_path: Path) -> None:
    package = tmp_path / "proxy"
    write(package / "core" / "routing.py", 1_000)
    assert stale_modules(package) == []
