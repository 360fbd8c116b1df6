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

import sys
from pathlib import Path
from typing import cast

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# `python setup.py build_ext` (./dev compile) runs without the build backend's path.
sys.path.insert(0, str(Path(__file__).resolve().parent / "buildtools"))
from turnout_toolchain import compile_mode, missing_toolchain

# Every module a request passes through, and only those: mypyc gains most on attribute access
# and calls between compiled code, and nothing on the control plane's asyncio glue.
HOT_MODULES = [
    "proxy/core/counters.py",
    "proxy/core/exchange_state.py",
    "proxy/core/headers.py",
    "proxy/core/routing.py",
    "proxy/core/spec.py",
    "proxy/core/table.py",
    "proxy/core/sticky.py",
    "proxy/core/wsframes.py",
    "proxy/dataplane/accesslog.py",
    "proxy/dataplane/h2upstream.py",
    "proxy/dataplane/http1.py",
    "proxy/dataplane/upstream.py",
    "proxy/dataplane/writes.py",
]


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
