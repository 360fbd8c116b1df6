"""Which build of the data plane this installation runs: compiled (mypyc) or pure Python.

setup.py compiles the hot modules when the machine can; Python then imports the extension
module in place of the `.py` file beside it. Looked up, not imported, so that the supervisor can
report it without loading the data plane.
"""

from __future__ import annotations

import importlib.util
from importlib.machinery import EXTENSION_SUFFIXES

# The module every request passes through: compiled or not, the others follow it (setup.py
# compiles them all together or none).
_PROBE = "proxy.dataplane.http1"


def data_plane_build() -> str:
    """`compiled` or `pure`."""
    spec = importlib.util.find_spec(_PROBE)
    origin = spec.origin if spec is not None else None
    return "compiled" if origin and origin.endswith(tuple(EXTENSION_SUFFIXES)) else "pure"
