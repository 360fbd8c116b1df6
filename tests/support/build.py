"""Which build of the data plane the suite runs, and a guard against a stale compiled one.

`./dev compile` puts extension modules beside the `.py` files; Python then imports those, so
an edit to a `.py` file after compiling would go untested. The suite refuses to start instead.
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from proxy.runtime.build import data_plane_build

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"


def stale_modules(package: Path = PACKAGE) -> list[str]:
    """Compiled modules under `package` older than their source, as `source.py` paths."""
    stale = []
    for suffix in EXTENSION_SUFFIXES:
        for compiled in package.rglob(f"*{suffix}"):
            source = compiled.with_name(compiled.name[: -len(suffix)] + ".py")
            if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
                stale.append(str(source.relative_to(package.parent)))
    return sorted(stale)


def describe() -> str:
    build = data_plane_build()
    return f"turnout data plane: {build}" + (" (mypyc)" if build == "compiled" else " Python")
