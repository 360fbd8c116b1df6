"""Every example table in config/ is valid and says what its comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.core.config import parse_config, spec_to_dict, summary
from proxy.core.spec import ConfigSpec, Endpoint, Match, Mirror, Override, Rollout, Sticky

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))


def load(name: str) -> ConfigSpec:
    """Parse config/<name> as `turnout run` would, with its real path."""
    path = CONFIG_DIR / name
    return parse_config(path.read_text(encoding="utf-8"), str(path))


def test_the_examples_are_there() -> None:
    names = {path.name for path in EXAMPLES}
    assert {
        "blue-green.yaml",
        "canary-sticky.yaml",
        "demo.yaml",
        "header-pinned.yaml",
        "shadow.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_every_example_parses_and_round_trips(path: Path) -> None:
    spec = parse_config(path.read_text(encoding="utf-8"), str(path))
    assert summary(spec, path.name).startswith(f"{path.name}: OK — ")
    dumped = yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
    assert parse_config(dumped, str(path)) == spec


def test_demo_matches_what_turnout_demo_starts() -> None:
    spec = load("demo.yaml")
    assert summary(spec, "config/demo.yaml") == (
        "config/demo.yaml: OK — 4 upstreams, 2 routes, listen 127.0.0.1:8080, "
        "admin 127.0.0.1:9901, workers 1"
    )
    assert {u.name: u.endpoints for u in spec.upstreams} == {
        "blue": (Endpoint("127.0.0.1", 9001),),
        "green": (Endpoint("127.0.0.1", 9101),),
        "canary": (Endpoint("127.0.0.1", 9201),),
        "shadow": (Endpoint("127.0.0.1", 9301),),
    }
    api, web = spec.routes
    assert api.name == "api"
    assert api.match == Match(path_prefix="/api")
    assert api.overrides == (
        Override(to="canary", header="x-canary", value="true"),
        Override(to="canary", cookie="release", value="canary"),
    )
    assert api.split == (("blue", 80.0), ("canary", 20.0))
    assert api.sticky == Sticky(cookie="session_id", set=True)
    assert api.mirror == Mirror(to="shadow", percent=100.0)
    assert api.rollout == Rollout(
        baseline="blue",
        canary="canary",
        steps=(20.0, 50.0, 100.0),
        interval=10.0,
        check=2.0,
        min_requests=20,
    )
    assert web.name == "web"
    assert web.match == Match(path_prefix="/")
    assert web.split == (("blue", 50.0), ("green", 50.0))


def test_blue_green_sends_everything_to_blue() -> None:
    spec = load("blue-green.yaml")
    (route,) = spec.routes
    assert dict(route.split) == {"blue": 100.0, "green": 0.0}
    assert spec.state_file == str(CONFIG_DIR / "turnout.state.json")
    assert all(upstream.health is not None for upstream in spec.upstreams)


def test_canary_sticky_is_ninety_ten_by_cookie_with_a_rollout() -> None:
    spec = load("canary-sticky.yaml")
    route = spec.routes[0]
    assert [weight for _, weight in route.split] == [90.0, 10.0]
    assert route.sticky is not None
    assert route.sticky.cookie is not None
    assert route.sticky.set is True
    assert route.rollout is not None
    assert route.rollout.canary == "canary"
    assert route.rollout.steps[-1] == 100.0


def test_header_pinned_pins_testers_by_header_and_cookie() -> None:
    route = load("header-pinned.yaml").routes[0]
    assert any(o.header is not None and o.to == "v2" for o in route.overrides)
    assert any(o.cookie is not None and o.to == "v2" for o in route.overrides)
    assert dict(route.split) == {"v1": 100.0, "v2": 0.0}


def test_shadow_mirrors_ten_percent() -> None:
    route = load("shadow.yaml").routes[0]
    assert route.mirror is not None
    assert route.mirror.percent == 10.0
    assert route.mirror.to not in {upstream for upstream, weight in route.split if weight > 0}
