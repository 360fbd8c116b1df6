"""Route matching, the decision (contract section 2), endpoint choice and explain."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.routing import (
    NEW_ID_PLACEHOLDER,
    Decision,
    RequestView,
    decide,
    explain,
    make_view,
    match_route,
    normalize_host,
    parse_cookies,
    pick_endpoint,
)
from proxy.core.spec import (
    ConfigSpec,
    Endpoint,
    Match,
    Mirror,
    Override,
    RouteSpec,
    Sticky,
    UpstreamSpec,
)
from proxy.core.sticky import choose
from proxy.core.table import Table, compile_table

UPSTREAMS = tuple(
    UpstreamSpec(name, (Endpoint("127.0.0.1", 9000 + i),))
    for i, name in enumerate(("blue", "green", "canary", "shadow"))
)


def table_of(
    *routes: RouteSpec,
    split_overrides: Mapping[str, tuple[Mapping[str, float], str]] | None = None,
) -> Table:
    """Compile these routes over the four usual upstreams."""
    spec = ConfigSpec(upstreams=UPSTREAMS, routes=routes)
    return compile_table(spec, generation=7, sha256="s", split_overrides=split_overrides)


def view(
    path: str = "/",
    host: str = "example.com",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> RequestView:
    """A request view with defaults for everything."""
    return RequestView(method, host, path, headers, cookies)


def no_mint() -> str:
    """A mint that must not be called."""
    raise AssertionError("mint called")


class Mint:
    """A mint that counts its calls and hands out id-1, id-2, ..."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"id-{self.calls}"


def run(
    table: Table, req: RequestView, rand: float = 0.5, mint: Callable[[], str] = no_mint
) -> Decision:
    """decide with a fixed mirror draw of 0.99 (sampled only at 100 %)."""
    return decide(table, req, rand, 0.99, mint)


# --- normalize_host, parse_cookies, make_view ---------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com.", "example.com"),
        ("example.com.:443", "example.com"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("[2001:DB8::1]:80", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("127.0.0.1:9", "127.0.0.1"),
        ("", ""),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    ("values", "wanted", "expected"),
    [
        (["a=1; b=2"], {"a", "b"}, {"a": "1", "b": "2"}),
        (["a=1; b=2"], {"b"}, {"b": "2"}),
        (["a=1;b=2;c=3"], {"c"}, {"c": "3"}),
        (["a=1; a=2", "a=3"], {"a"}, {"a": "1"}),
        (["x=1", "a=from-second"], {"a"}, {"a": "from-second"}),
        (['a="quoted value"'], {"a"}, {"a": "quoted value"}),
        (['a="'], {"a"}, {"a": '"'}),
        (["a=x=y"], {"a"}, {"a": "x=y"}),
        (["A=1"], {"a"}, {}),
        (["flag; a=1"], {"flag", "a"}, {"a": "1"}),
        (["a="], {"a"}, {"a": ""}),
        (["  a = 1 ; b=2"], {"a"}, {"a": "1"}),
        (["a=1"], set(), {}),
    ],
)
def test_parse_cookies(values: list[str], wanted: set[str], expected: dict[str, str]) -> None:
    assert parse_cookies(values, frozenset(wanted)) == expected


def test_make_view_keeps_only_what_the_table_reads() -> None:
    table = table_of(
        RouteSpec(
            "r",
            (("blue", 1.0),),
            overrides=(Override(to="green", header="X-Canary"),),
            sticky=Sticky(cookie="sid"),
        )
    )
    req = make_view(
        table,
        "POST",
        "Shop.Example.com:8443",
        "/api/x?q=1&r=2",
        [
            ("X-CANARY", "first"),
            ("x-canary", "second"),
            ("X-Other", "no"),
            ("Cookie", "other=1; sid=abc"),
            ("cookie", "sid=later"),
        ],
    )
    assert (req.method, req.host, req.path) == ("POST", "shop.example.com", "/api/x")
    assert req.headers == {"x-canary": "first"}
    assert req.cookies == {"sid": "abc"}


# --- match_route ---------------------------------------------------------------------------

MATCH_ROUTES = (
    RouteSpec("exact", (("blue", 1.0),), Match(host="API.example.com", path_prefix="/api")),
    RouteSpec("wild", (("blue", 1.0),), Match(host="*.example.com", path_prefix="/api")),
    RouteSpec("deep", (("blue", 1.0),), Match(path_prefix="/static/img/")),
    RouteSpec("any", (("blue", 1.0),), Match(path_prefix="/")),
)


@pytest.mark.parametrize(
    ("raw_host", "path", "expected"),
    [
        ("api.example.com", "/api", "exact"),
        ("API.EXAMPLE.COM:8080", "/api/", "exact"),
        ("api.example.com.", "/api/v1/x", "exact"),
        ("api.example.com", "/apix", "any"),
        ("api.example.com", "/", "any"),
        ("www.example.com", "/api/x", "wild"),
        ("a.b.example.com", "/api", "wild"),
        ("example.com", "/api", "any"),
        ("badexample.com", "/api", "any"),
        ("other.org", "/static/img", "deep"),
        ("other.org", "/static/img/a.png", "deep"),
        ("other.org", "/static/imgs", "any"),
        ("other.org", "/static", "any"),
        ("", "/anything", "any"),
    ],
)
def test_match_route(raw_host: str, path: str, expected: str) -> None:
    route = match_route(table_of(*MATCH_ROUTES), normalize_host(raw_host), path)
    assert route is not None
    assert route.name == expected


def test_match_route_first_in_order_wins_and_none() -> None:
    first = RouteSpec("first", (("blue", 1.0),), Match(path_prefix="/api"))
    second = RouteSpec("second", (("blue", 1.0),), Match(path_prefix="/api/v1"))
    table = table_of(first, second)
    found = match_route(table, "h", "/api/v1/x")
    assert found is not None
    assert found.name == "first"
    assert match_route(table, "h", "/other") is None
    decision = run(table, view("/other"))
    assert decision == Decision(None, None, "no_route", None, None, None)


# --- decide: overrides, split, sticky --------------------------------------------------------

API = RouteSpec(
    "api",
    (("blue", 90.0), ("canary", 10.0), ("green", 0.0)),
    overrides=(
        Override(to="canary", header="X-Canary", value="true"),
        Override(to="green", cookie="release", value="green"),
        Override(to="shadow", header="x-debug"),
    ),
)


@pytest.mark.parametrize(
    ("headers", "cookies", "expected"),
    [
        ({"x-canary": "true"}, {}, "canary"),
        ({"x-canary": "true", "x-debug": "1"}, {"release": "green"}, "canary"),
        ({"x-canary": "TRUE"}, {"release": "green"}, "green"),
        ({"x-canary": "false", "x-debug": ""}, {}, "shadow"),
        ({}, {"release": "Green", "x-debug": "1"}, None),
        ({}, {"release": "blue"}, None),
    ],
)
def test_overrides_in_order(
    headers: dict[str, str], cookies: dict[str, str], expected: str | None
) -> None:
    decision = run(table_of(API), view(headers=headers, cookies=cookies), rand=0.95)
    if expected is None:
        assert (decision.upstream, decision.reason) == ("canary", "weight")
    else:
        assert (decision.upstream, decision.reason) == (expected, "override")
    assert decision.set_cookie is None
    assert decision.mirror is None


@pytest.mark.parametrize(
    ("rand", "expected"),
    [
        (0.0, "blue"),
        (0.5, "blue"),
        (0.8999, "blue"),
        (0.9, "canary"),
        (0.99999, "canary"),
        (1.0, "canary"),
    ],
)
def test_weighted_choice_by_rand(rand: float, expected: str) -> None:
    decision = run(table_of(API), view(), rand=rand)
    assert (decision.upstream, decision.reason, decision.sticky_key) == (expected, "weight", None)


def test_weighted_choice_proportions() -> None:
    table = table_of(RouteSpec("r", (("blue", 1.0), ("green", 0.0), ("canary", 3.0))))
    rng = random.Random(4)
    counts = Counter(run(table, view(), rand=rng.random()).upstream for _ in range(20_000))
    assert counts["green"] == 0
    assert counts["canary"] / 20_000 == pytest.approx(0.75, abs=0.015)


STICKY_HEADER = RouteSpec("s", (("blue", 50.0), ("canary", 50.0)), sticky=Sticky(header="X-User"))
STICKY_COOKIE = RouteSpec(
    "c", (("blue", 50.0), ("canary", 50.0)), sticky=Sticky(cookie="sid", set=True)
)


def test_sticky_header_decides_and_matches_choose() -> None:
    table = table_of(STICKY_HEADER)
    for i in range(200):
        key = f"user-{i}"
        first = run(table, view(headers={"x-user": key}), rand=0.0)
        again = run(table, view(headers={"x-user": key}), rand=0.99)
        assert first.upstream == again.upstream == choose(key, ("blue", "canary"), (50.0, 50.0))
        assert (first.reason, first.sticky_key, first.set_cookie) == ("sticky", key, None)


def test_sticky_header_without_key_falls_back_to_weight() -> None:
    table = table_of(STICKY_HEADER)
    for headers in ({}, {"x-user": ""}):
        decision = run(table, view(headers=headers), rand=0.7)
        assert (decision.upstream, decision.reason, decision.sticky_key) == (
            "canary",
            "weight",
            None,
        )


def test_sticky_cookie_set_mints_only_when_absent() -> None:
    table = table_of(STICKY_COOKIE)
    mint = Mint()
    fresh = run(table, view(), mint=mint)
    assert mint.calls == 1
    assert fresh.reason == "sticky"
    assert fresh.sticky_key == fresh.set_cookie == "id-1"
    assert fresh.upstream == choose("id-1", ("blue", "canary"), (50.0, 50.0))
    # The next request carries the cookie: same upstream, nothing minted.
    back = run(table, view(cookies={"sid": "id-1"}), mint=mint)
    assert mint.calls == 1
    assert (back.upstream, back.set_cookie, back.sticky_key) == (fresh.upstream, None, "id-1")


def test_sticky_cookie_without_set_does_not_mint() -> None:
    route = RouteSpec("c", (("blue", 50.0), ("canary", 50.0)), sticky=Sticky(cookie="sid"))
    decision = run(table_of(route), view(), rand=0.2)
    assert (decision.upstream, decision.reason, decision.set_cookie) == ("blue", "weight", None)


def test_override_wins_over_sticky_and_does_not_mint() -> None:
    route = RouteSpec(
        "c",
        (("blue", 50.0), ("canary", 50.0)),
        overrides=(Override(to="green", header="x-pin"),),
        sticky=Sticky(cookie="sid", set=True),
    )
    decision = run(table_of(route), view(headers={"x-pin": "1"}))
    assert (decision.upstream, decision.reason, decision.set_cookie) == ("green", "override", None)
    keyed = run(table_of(route), view(headers={"x-pin": "1"}, cookies={"sid": "k"}))
    assert (keyed.reason, keyed.sticky_key) == ("override", "k")


def test_single_upstream_split_with_sticky() -> None:
    route = RouteSpec("c", (("blue", 0.0), ("green", 5.0)), sticky=Sticky(cookie="sid", set=True))
    mint = Mint()
    decision = run(table_of(route), view(), mint=mint)
    assert (decision.upstream, decision.reason, decision.set_cookie) == ("green", "sticky", "id-1")


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (view(), "rollout"),
        (view(cookies={"sid": "user-1"}), "rollout"),
        (view(headers={"x-pin": "1"}), "override"),
    ],
)
def test_rollout_reason(req: RequestView, reason: str) -> None:
    route = RouteSpec(
        "r",
        (("blue", 100.0),),
        overrides=(Override(to="green", header="x-pin"),),
        sticky=Sticky(cookie="sid"),
    )
    table = table_of(route, split_overrides={"r": ({"blue": 95.0, "canary": 5.0}, "rollout")})
    assert run(table, req, rand=0.97).reason == reason
    runtime = table_of(route, split_overrides={"r": ({"blue": 95.0, "canary": 5.0}, "runtime")})
    assert run(runtime, req, rand=0.97).reason != "rollout"


def test_rollout_split_sends_the_canary_share() -> None:
    route = RouteSpec("r", (("blue", 100.0),))
    table = table_of(route, split_overrides={"r": ({"blue": 95.0, "canary": 5.0}, "rollout")})
    assert run(table, view(), rand=0.94).upstream == "blue"
    assert run(table, view(), rand=0.96).upstream == "canary"


# --- decide: mirror --------------------------------------------------------------------------


def mirrored(percent: float, methods: frozenset[str] | None = None) -> Table:
    """A table whose one route mirrors `percent` to shadow, sticky by cookie `sid`."""
    route = RouteSpec(
        "m",
        (("blue", 1.0),),
        sticky=Sticky(cookie="sid"),
        mirror=Mirror(to="shadow", percent=percent, methods=methods),
    )
    return table_of(route)


def test_mirror_sampling_by_rand() -> None:
    table = mirrored(20.0)
    assert decide(table, view(), 0.5, 0.1999, no_mint).mirror == "send"
    assert decide(table, view(), 0.5, 0.2, no_mint).mirror is None
    rng = random.Random(11)
    hits = sum(
        decide(table, view(), 0.5, rng.random(), no_mint).mirror == "send" for _ in range(20_000)
    )
    assert hits / 20_000 * 100 == pytest.approx(20.0, abs=1.5)


def test_mirror_sampling_by_sticky_key_is_deterministic() -> None:
    table = mirrored(20.0)
    rng = random.Random(12)
    hits = 0
    for i in range(20_000):
        req = view(cookies={"sid": f"session-{i}"})
        outcomes = {decide(table, req, 0.5, rng.random(), no_mint).mirror for _ in range(3)}
        # The same session is mirrored on every request or on none: the draw plays no part.
        assert len(outcomes) == 1
        hits += outcomes == {"send"}
    assert hits / 20_000 * 100 == pytest.approx(20.0, abs=1.5)


@pytest.mark.parametrize(
    ("percent", "mirror_rand", "method", "expected"),
    [
        (100.0, 0.999999, "GET", "send"),
        (0.0, 0.0, "GET", None),
        (50.0, 0.1, "POST", "skip"),
        (50.0, 0.1, "GET", "send"),
        (50.0, 0.6, "POST", None),
    ],
)
def test_mirror_outcomes(
    percent: float, mirror_rand: float, method: str, expected: str | None
) -> None:
    table = mirrored(percent, methods=frozenset({"GET", "HEAD"}))
    assert decide(table, view(method=method), 0.5, mirror_rand, no_mint).mirror == expected


def test_no_mirror_configured() -> None:
    assert decide(table_of(API), view(), 0.5, 0.0, no_mint).mirror is None


# --- pick_endpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_flight", "healthy", "rand", "expected"),
    [
        ([3, 1, 2], [True, True, True], 0.5, (1, False)),
        ([0, 1, 0], [False, True, True], 0.0, (2, False)),
        ([5, 9], [False, True], 0.3, (1, False)),
        ([2, 2, 2], [True, True, True], 0.0, (0, False)),
        ([2, 2, 2], [True, True, True], 0.34, (1, False)),
        ([2, 2, 2], [True, True, True], 0.99, (2, False)),
        ([2, 2, 2], [True, True, True], 1.0, (2, False)),
        ([4, 1, 3], [False, False, False], 0.5, (1, True)),
        ([1, 0, 0], [False, False, False], 0.9, (2, True)),
        ([7], [True], 0.5, (0, False)),
        ([7], [False], 0.5, (0, True)),
    ],
)
def test_pick_endpoint(
    in_flight: list[int], healthy: list[bool], rand: float, expected: tuple[int, bool]
) -> None:
    assert pick_endpoint(in_flight, healthy, rand) == expected


def test_pick_endpoint_no_endpoints() -> None:
    with pytest.raises(ValueError, match="no endpoints"):
        pick_endpoint([], [], 0.5)


@given(
    st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=8),
    st.floats(0.0, 1.0, exclude_max=True),
)
def test_pick_endpoint_properties(endpoints: list[tuple[int, bool]], rand: float) -> None:
    in_flight = [load for load, _ in endpoints]
    healthy = [ok for _, ok in endpoints]
    index, failed_open = pick_endpoint(in_flight, healthy, rand)
    assert failed_open == (not any(healthy))
    eligible = [i for i in range(len(endpoints)) if healthy[i] or failed_open]
    assert index in eligible
    assert in_flight[index] == min(in_flight[i] for i in eligible)


def test_pick_endpoint_ties_are_uniform() -> None:
    rng = random.Random(3)
    counts = Counter(pick_endpoint([1, 0, 0, 0], [True] * 4, rng.random())[0] for _ in range(9_000))
    assert counts[0] == 0
    for index in (1, 2, 3):
        assert counts[index] / 9_000 == pytest.approx(1 / 3, abs=0.02)


# --- explain ---------------------------------------------------------------------------------


def test_explain_no_route() -> None:
    answer = explain(table_of(RouteSpec("r", (("blue", 1.0),), Match(host="a"))), view(host="b"))
    assert answer["route"] is None
    assert answer["upstream"] is None
    assert answer["reason"] == "no_route"


def test_explain_weighted_shows_shares() -> None:
    answer = explain(table_of(API), view())
    assert answer["route"] == "api"
    assert answer["upstream"] is None
    assert answer["random"] is True
    assert answer["reason"] == "weight"
    assert answer["split"] == {"blue": 90.0, "canary": pytest.approx(10.0), "green": 0.0}
    assert answer["split_source"] == "file"
    assert answer["override"] is None


def test_explain_override() -> None:
    answer = explain(table_of(API), view(headers={"x-debug": "1"}))
    assert (answer["upstream"], answer["reason"], answer["random"]) == ("shadow", "override", False)
    assert answer["override"] == {"index": 2, "header": "x-debug", "value": None, "to": "shadow"}


def test_explain_sticky_and_mirror() -> None:
    route = RouteSpec(
        "c",
        (("blue", 50.0), ("canary", 50.0)),
        sticky=Sticky(cookie="sid", set=True),
        mirror=Mirror(to="shadow", percent=50.0, methods=frozenset({"GET"})),
    )
    table = table_of(route)
    keyed = explain(table, view(cookies={"sid": "user-9"}))
    assert keyed["upstream"] == choose("user-9", ("blue", "canary"), (50.0, 50.0))
    assert (keyed["reason"], keyed["sticky_key"], keyed["set_cookie"]) == (
        "sticky",
        "user-9",
        False,
    )
    expected_sampled = decide(table, view(cookies={"sid": "user-9"}), 0.5, 0.0, no_mint).mirror
    assert keyed["mirror"] == {
        "to": "shadow",
        "percent": 50.0,
        "method_allowed": True,
        "sampled": expected_sampled == "send",
    }
    fresh = explain(table, view(method="POST"))
    assert (fresh["upstream"], fresh["random"], fresh["set_cookie"]) == (None, True, True)
    assert fresh["sticky_key"] == NEW_ID_PLACEHOLDER
    assert fresh["mirror"] == {
        "to": "shadow",
        "percent": 50.0,
        "method_allowed": False,
        "sampled": None,
    }
