"""compile_table and diff_tables: what the hot path gets precomputed, and what a reload sees."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.spec import (
    ConfigSpec,
    Endpoint,
    HealthCheck,
    Match,
    Mirror,
    Override,
    Rollout,
    RouteSpec,
    Sticky,
    UpstreamSpec,
)
from proxy.core.table import Table, compile_split, compile_table, diff_tables

NAMES = ("blue", "green", "canary", "shadow")


def upstream(name: str, *ports: int, health: HealthCheck | None = None) -> UpstreamSpec:
    """An upstream on 127.0.0.1 with the given ports."""
    return UpstreamSpec(name, tuple(Endpoint("127.0.0.1", port) for port in ports), health)


UPSTREAMS = (
    upstream("blue", 9001, 9002),
    upstream("green", 9101),
    upstream("canary", 9201),
    upstream("shadow", 9301),
)


def config(*routes: RouteSpec, upstreams: tuple[UpstreamSpec, ...] = UPSTREAMS) -> ConfigSpec:
    """A config with these routes over the four usual upstreams."""
    return ConfigSpec(upstreams=upstreams, routes=routes)


def compiled(
    *routes: RouteSpec,
    split_overrides: Mapping[str, tuple[Mapping[str, float], str]] | None = None,
) -> Table:
    """Compile `routes` as generation 1."""
    return compile_table(
        config(*routes), generation=1, sha256="abc", split_overrides=split_overrides
    )


API = RouteSpec(
    name="api",
    split=(("blue", 90.0), ("canary", 10.0), ("green", 0.0)),
    match=Match(host="API.Example.com", path_prefix="/api/"),
    overrides=(
        Override(to="canary", header="X-Canary", value="true"),
        Override(to="green", cookie="Release"),
    ),
    sticky=Sticky(header="X-User-Id"),
    mirror=Mirror(to="shadow", percent=10.0),
    rollout=Rollout(baseline="blue", canary="canary"),
)
WEB = RouteSpec(
    name="web",
    split=(("green", 1.0),),
    match=Match(host="*.Example.com"),
    sticky=Sticky(cookie="session_id", set=True),
)


def test_compile_precomputes_match_fields() -> None:
    table = compiled(API, WEB)
    api, web = table.routes
    assert (api.index, api.name, web.index) == (0, "api", 1)
    assert (api.host_exact, api.host_suffix) == ("api.example.com", None)
    assert (web.host_exact, web.host_suffix) == (None, ".example.com")
    assert (api.prefix, api.prefix_slash) == ("/api", "/api/")
    assert (web.prefix, web.prefix_slash) == ("", "/")
    assert table.generation == 1
    assert table.sha256 == "abc"
    assert table.route("web") is web
    assert table.route("nope") is None
    assert set(table.upstreams) == set(NAMES)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("/", ""),
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/a/b/", "/a/b"),
        ("/api//", "/api"),
        # In the normal form requests are routed on (docs/routing.md, "Request paths").
        ("/%7euser/", "/~user"),
        ("/a%2fb", "/a%2Fb"),
        ("/a/./b/../c/", "/a/c"),
        ("/api/..", ""),
        ("/café", "/caf%C3%A9"),
        # No request path can be like these (refused or normalised first): kept as written.
        ("/..", "/.."),
        ("/a%zz", "/a%zz"),
    ],
)
def test_compile_prefix(prefix: str, expected: str) -> None:
    route = compiled(RouteSpec("r", (("blue", 1.0),), Match(path_prefix=prefix))).routes[0]
    assert route.prefix == expected
    assert route.prefix_slash == expected + "/"


def test_compile_split_shares_and_cumulative() -> None:
    split = compiled(API).routes[0].split
    assert split.upstreams == ("blue", "canary")
    assert split.weights == (90.0, 10.0)
    assert split.cumulative[0] == pytest.approx(0.9)
    assert split.cumulative[1] == 1.0
    assert dict(split.shares) == {"blue": 90.0, "canary": pytest.approx(10.0), "green": 0.0}


@given(
    st.lists(
        st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6)),
        min_size=1,
        max_size=6,
    ).filter(lambda weights: sum(weights) > 0)
)
def test_compile_split_invariants(weights: list[float]) -> None:
    names = tuple(f"u{i}" for i in range(len(weights)))
    split = compile_split(names, dict(zip(names, weights, strict=True)))
    assert math.isclose(sum(split.shares.values()), 100.0, rel_tol=1e-9)
    assert split.cumulative[-1] == 1.0
    assert list(split.cumulative) == sorted(split.cumulative)
    assert split.upstreams == tuple(n for n, w in zip(names, weights, strict=True) if w > 0)
    assert set(split.shares) == set(names)
    total = sum(weights)
    for name, weight in zip(names, weights, strict=True):
        assert split.shares[name] == pytest.approx(weight * 100 / total, abs=1e-9)


@pytest.mark.parametrize(
    "weights",
    [
        {"blue": 0.0},
        {"blue": -1.0, "green": 2.0},
        {"blue": math.nan},
        {"blue": math.inf},
        {},
        {"blue": 1_000_001.0},  # above the bound the config, admin and state file all use
    ],
)
def test_compile_split_rejects_bad_weights(weights: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="weight"):
        compile_split(("blue", "green"), weights, "api")


def test_compile_names_and_upstreams() -> None:
    table = compiled(API, WEB)
    api, web = table.routes
    assert table.header_names == frozenset({"x-canary", "x-user-id"})
    assert table.cookie_names == frozenset({"Release", "session_id"})
    # Names are lower-cased in the compiled rules so decide never folds case.
    assert api.overrides[0].header == "x-canary"
    assert api.sticky is not None
    assert api.sticky.header == "x-user-id"
    # Split (zeros included), override targets, rollout; no mirror target; no duplicates.
    assert api.upstreams == ("blue", "canary", "green")
    assert web.upstreams == ("green",)
    assert api.split_source == "file"
    assert api.mirror == API.mirror
    assert api.spec is API


def test_compile_upstreams_include_override_and_rollout_targets() -> None:
    route = RouteSpec(
        "r",
        (("green", 1.0),),
        overrides=(Override(to="shadow", header="x-a"), Override(to="green", header="x-b")),
        rollout=Rollout(baseline="blue", canary="canary"),
    )
    assert compiled(route).routes[0].upstreams == ("green", "shadow", "blue", "canary")


@pytest.mark.parametrize(
    ("override", "source", "upstreams", "shares"),
    [
        (
            {"blue": 0.0, "green": 100.0},
            "runtime",
            ("green",),
            {"blue": 0.0, "canary": 0.0, "green": 100.0},
        ),
        ({"blue": 95.0, "canary": 5.0}, "rollout", ("blue", "canary"), None),
        (
            {"shadow": 1.0, "blue": 3.0},
            "runtime",
            ("blue", "shadow"),
            {"blue": 75.0, "canary": 0.0, "green": 0.0, "shadow": 25.0},
        ),
    ],
)
def test_compile_split_overrides(
    override: dict[str, float],
    source: str,
    upstreams: tuple[str, ...],
    shares: dict[str, float] | None,
) -> None:
    table = compiled(API, WEB, split_overrides={"api": (override, source)})
    api, web = table.routes
    assert api.split_source == source
    assert web.split_source == "file"
    assert api.split.upstreams == upstreams
    assert sum(api.split.shares.values()) == pytest.approx(100.0)
    if shares is not None:
        assert dict(api.split.shares) == pytest.approx(shares)
    # Every upstream the override can reach is bound for metrics.
    assert set(upstreams) <= set(api.upstreams)


def test_compile_override_for_unknown_route_is_ignored() -> None:
    table = compiled(WEB, split_overrides={"gone": ({"blue": 1.0}, "runtime")})
    assert table.routes[0].split_source == "file"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (({"nope": 1.0}, "runtime"), "unknown upstream"),
        (({"blue": 0.0}, "runtime"), "at least one weight"),
        (({"blue": -1.0, "green": 2.0}, "runtime"), "from 0 to 1000000"),
        (({"blue": 1.0}, "file"), "source"),
    ],
)
def test_compile_bad_override_raises(override: tuple[dict[str, float], str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compiled(API, split_overrides={"api": override})


def test_compiled_table_is_immutable() -> None:
    table = compiled(API)
    with pytest.raises(TypeError):
        table.routes[0].split.shares["blue"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        table.upstreams["x"] = UPSTREAMS[0]  # type: ignore[index]


def test_diff_identical_tables_is_empty() -> None:
    old = compiled(API, WEB)
    diff = diff_tables(old, compiled(API, WEB))
    assert diff.upstreams_removed == diff.upstreams_added == diff.upstreams_changed == ()
    assert diff.routes_removed == diff.routes_split_changed == diff.routes_rollout_changed == ()
    assert dict(diff.endpoints_removed) == {}


def test_diff_upstreams() -> None:
    old = compile_table(config(WEB), generation=1, sha256="a")
    new_upstreams = (
        upstream("blue", 9002, 9003),  # 9001 removed, 9003 added
        upstream("green", 9101, health=HealthCheck(path="/ready")),  # health changed
        upstream("canary", 9201),  # unchanged
        upstream("extra", 9401),  # added; shadow removed
    )
    new = compile_table(config(WEB, upstreams=new_upstreams), generation=2, sha256="b")
    diff = diff_tables(old, new)
    assert diff.upstreams_removed == ("shadow",)
    assert diff.upstreams_added == ("extra",)
    assert diff.upstreams_changed == ("blue", "green")
    assert dict(diff.endpoints_removed) == {"blue": (Endpoint("127.0.0.1", 9001),), "green": ()}
    assert dict(diff.endpoints_added) == {"blue": (Endpoint("127.0.0.1", 9003),), "green": ()}


def test_diff_endpoint_order_alone_is_no_change() -> None:
    old = compile_table(config(WEB), generation=1, sha256="a")
    reordered = (upstream("blue", 9002, 9001), *UPSTREAMS[1:])
    new = compile_table(config(WEB, upstreams=reordered), generation=2, sha256="b")
    assert diff_tables(old, new).upstreams_changed == ()


def test_diff_routes() -> None:
    other = RouteSpec("other", (("blue", 1.0),))
    old = compiled(API, WEB, other)
    new = compiled(
        # Same weights in another order: not a change.
        replace(API, split=(("green", 0.0), ("canary", 10.0), ("blue", 90.0))),
        replace(WEB, split=(("green", 1.0), ("blue", 1.0)), rollout=Rollout("green", "blue")),
    )
    diff = diff_tables(old, new)
    assert diff.routes_removed == ("other",)
    assert diff.routes_split_changed == ("web",)
    assert diff.routes_rollout_changed == ("web",)

    changed_rollout = compiled(replace(API, rollout=Rollout("blue", "canary", interval=5.0)), WEB)
    diff = diff_tables(old, changed_rollout)
    assert diff.routes_rollout_changed == ("api",)
    assert diff.routes_split_changed == ()


def test_diff_ignores_runtime_splits() -> None:
    old = compiled(API)
    new = compiled(API, split_overrides={"api": ({"green": 1.0}, "runtime")})
    assert diff_tables(old, new).routes_split_changed == ()
