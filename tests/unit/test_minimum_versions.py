"""The lower bounds in pyproject.toml are the versions `./dev test` installs in .venv-min.

That second venv runs part of the suite on exactly these versions, so a bound is only written
down once it has been tested; this test keeps the two lists from drifting apart.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_minimum_txt_pins_every_lower_bound_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    bounds = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", requirement)
        assert match, f"{requirement}: every runtime dependency needs a plain >= lower bound"
        bounds[match[1].lower()] = match[2]
    pins = {}
    for line in (ROOT / ".ci" / "minimum.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    assert pins == bounds
