"""What setup.py and the build backend both decide: the compile mode, and whether this machine
can compile C extensions at all. Standard library only: the backend imports it before any
build requirement is installed.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path


def compile_mode() -> str:
    """TURNOUT_COMPILE: `auto` (the default), `1` or `0`; anything else stops the build."""
    mode = os.environ.get("TURNOUT_COMPILE", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TURNOUT_COMPILE must be auto, 0 or 1, not {mode!r}")
    return mode


def missing_toolchain() -> str | None:
    """Why this machine cannot compile C extensions, or None when it can."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers (Python.h)"
    return None
