"""Build hook: compiles the data plane's hot modules with mypyc when this machine can.

The compiled build is an accelerator, not a requirement: the same modules run as plain Python
everywhere. `TURNOUT_COMPILE` chooses:

    auto (default)  compile if mypyc and a C compiler with the Python headers are here; a compile
                    that fails anyway warns and leaves pure Python
    1               compile, or fail the build
    0               pure Python; the default of an editable install (`pip install -e .`,
                    `./dev setup`), so that an edited module takes effect without a rebuild

`./dev compile` builds the compiled modules into the tree; `./dev pure` removes them.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import cast

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Every module a request passes through, and only those: mypyc gains most on attribute access
# and calls between compiled code, and nothing on the control plane's asyncio glue.
HOT_MODULES = [
    "proxy/core/counters.py",
    "proxy/core/exchange_state.py",
    "proxy/core/headers.py",
    "proxy/core/routing.py",
    "proxy/core/sticky.py",
    "proxy/core/wsframes.py",
    "proxy/dataplane/accesslog.py",
    "proxy/dataplane/http1.py",
    "proxy/dataplane/upstream.py",
    "proxy/dataplane/writes.py",
]


def compile_mode() -> str:
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


class OptionalBuildExt(build_ext):
    """In auto mode a compile error leaves the pure-Python package instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a compiler's failure has no one exception type
            if compile_mode() == "1":
                raise
            # A half-built set would import a module whose shared runtime is missing.
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            print(f"turnout: compiling failed ({exc}); installing pure Python", file=sys.stderr)


def extensions() -> list[Extension]:
    mode = compile_mode()
    if mode == "0":
        return []
    reason = missing_toolchain()
    try:
        from mypyc.build import mypycify
    except ImportError:
        reason = reason or "mypyc is not installed"
    if reason is not None:
        if mode == "1":
            sys.exit(f"TURNOUT_COMPILE=1 but {reason}")
        print(f"turnout: {reason}; installing pure Python", file=sys.stderr)
        return []
    return cast("list[Extension]", mypycify(HOT_MODULES, opt_level="3", group_name="proxy.hot"))


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
