"""The build backend: setuptools, asking for mypyc only when setup.py will compile.

A build without a C compiler (or with TURNOUT_COMPILE=0) needs nothing beyond setuptools; one
that compiles also needs mypy, and the packages the compiled modules import, because mypyc
type-checks them exactly as `mypy --strict` does in development.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from turnout_toolchain import compile_mode, missing_toolchain

# The other PEP 517 hooks are setuptools' own.
build_wheel = _setuptools.build_wheel
build_sdist = _setuptools.build_sdist
get_requires_for_build_sdist = _setuptools.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable

# The mypy release the compiled build was last tested with (./dev test builds it).
MYPYC = "mypy>=2.4.1"
TYPING_ONLY = ["types-PyYAML"]


def _editable_default() -> None:
    # An editable install is a working tree: compiled modules there would shadow every later
    # edit of their source, so it is pure Python unless TURNOUT_COMPILE=1 asks otherwise.
    os.environ.setdefault("TURNOUT_COMPILE", "0")


def _compiling() -> bool:
    mode = compile_mode()
    return mode == "1" or (mode == "auto" and missing_toolchain() is None)


def _extra() -> list[str]:
    if not _compiling():
        return []
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    return [MYPYC, *TYPING_ONLY, *project["dependencies"]]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *_extra()]


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    _editable_default()
    return [*_setuptools.get_requires_for_build_editable(config_settings), *_extra()]


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    _editable_default()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
