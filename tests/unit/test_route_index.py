"""The route index (issue 17 item 12): the same first match as trying every route in order.

Routes used to be tried one by one, so the last route of a 5,000-route table cost 5,000 tries.
`table.build_index` groups routes by host condition and first path segment; `match_route` looks
at the request's groups only. The oracle is the former linear scan, kept here and only here.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.routing import match_route, normalize_host
from proxy.core.spec import ConfigSpec, Endpoint, Match, RouteSpec, UpstreamSpec
from proxy.core.table import CompiledRoute, Table, compile_table, first_segment

UPSTREAMS = (UpstreamSpec("blue", (Endpoint("127.0.0.1", 9001),)),)


def linear_match(table: Table, host: str, path: str) -> CompiledRoute | None:
    """The first route in table order whose host and prefix match (the pre-index algorithm)."""
    for route in table.routes:
        exact = route.host_exact
        if exact is not None:
            if host != exact:
                continue
        else:
            suffix = route.host_suffix
            if suffix is not None and (len(host) <= len(suffix) or not host.endswith(suffix)):
                continue
        prefix = route.prefix
        if prefix and path != prefix and not path.startswith(route.prefix_slash):
            continue
        return route
    return None


def table_of(matches: list[Match]) -> Table:
    routes = tuple(RouteSpec(f"r{i}", (("blue", 1.0),), match) for i, match in enumerate(matches))
    return compile_table(ConfigSpec(upstreams=UPSTREAMS, routes=routes), generation=1, sha256="s")


# Few labels and segments, so random hosts and paths often share suffixes and first segments.
LABELS = ("a", "b", "x", "example", "com", "Example")
SEGMENTS = ("api", "API", "v1", "a", "b", "", "api.v1", "%7e", "..", ".")

names = st.lists(st.sampled_from(LABELS), min_size=0, max_size=4).map(".".join)
route_hosts = st.one_of(
    st.none(),
    names,
    names.map(lambda name: "*." + name),
    names.map(lambda name: name + "."),
    st.sampled_from(["*.example.com", "Example.COM", "*.com", "*.b.example.com"]),
)
paths = st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)
prefixes = st.one_of(
    paths,
    paths.map(lambda path: path + "/"),
    st.sampled_from(["/", "//", "/api", "/api/", "/api/v1", "/API", "/..", "/a/../b"]),
)
matches = st.builds(Match, host=route_hosts, path_prefix=prefixes)
request_hosts = st.one_of(
    names,
    st.sampled_from(["", "example.com", "www.example.com", "a.b.example.com", "com", ".com"]),
    names.map(lambda name: name + ":8080"),
)
request_paths = st.one_of(
    paths,
    paths.map(lambda path: path + "/"),
    st.sampled_from(["*", "", "api", "//api", "/api//x", "/apix"]),
    st.text(alphabet="/a.pi", max_size=8),
)


@settings(max_examples=600, deadline=None)
@given(
    st.lists(matches, min_size=1, max_size=25),
    st.lists(st.tuples(request_hosts, request_paths), min_size=1, max_size=10),
)
def test_index_finds_the_first_route_in_config_order(
    route_matches: list[Match], requests: list[tuple[str, str]]
) -> None:
    table = table_of(route_matches)
    for raw_host, path in requests:
        host = normalize_host(raw_host)
        assert match_route(table, host, path) is linear_match(table, host, path)


@settings(max_examples=300, deadline=None)
@given(st.lists(matches, min_size=1, max_size=25))
def test_index_agrees_on_every_route_own_prefix(route_matches: list[Match]) -> None:
    # Requests aimed exactly at each route, so deep and shadowed routes are exercised too.
    table = table_of(route_matches)
    for route in table.routes:
        host = route.host_exact or ("x" + route.host_suffix if route.host_suffix else "h")
        for path in (route.prefix or "/", route.prefix_slash + "z"):
            assert match_route(table, host, path) is linear_match(table, host, path)


@given(prefixes, paths)
def test_every_path_a_prefix_matches_shares_its_first_segment(prefix: str, rest: str) -> None:
    prefix = prefix.rstrip("/")
    if not prefix:
        return
    for path in (prefix, prefix + rest):  # `rest` starts with '/'.
        assert first_segment(path) == first_segment(prefix)


def test_the_lookup_does_not_grow_with_the_table() -> None:
    # The table: 5,000 prefixes and a catch-all; then 5,000 hosts and a catch-all.
    by_path = table_of([Match(path_prefix=f"/r{i}") for i in range(5000)] + [Match()])
    group = by_path.index.any_host
    assert group is not None
    assert max(len(found) for found in group.by_segment.values()) == 2
    assert group.other == (by_path.routes[-1],)
    last = match_route(by_path, "", "/r4999/x")
    assert last is not None
    assert last.name == "r4999"

    by_host = table_of(
        [Match(host=f"h{i}.example.com", path_prefix="/api") for i in range(5000)]
        + [Match(host="*.example.com"), Match()]
    )
    assert len(by_host.index.exact) == 5000
    assert all(len(g.other) == 1 for g in by_host.index.exact.values())
    found = match_route(by_host, "h4999.example.com", "/api/x")
    assert found is not None
    assert found.name == "r4999"
    other = match_route(by_host, "h4999.example.com", "/other")
    assert other is not None
    assert other.name == "r5000"


def test_routes_after_a_catch_all_of_their_group_are_left_out() -> None:
    wild = [Match(host="*.example.com", path_prefix=f"/{p}") for p in ("a", "c", "d", "e")]
    table = table_of(
        [
            *wild,
            Match(host="*.example.com"),
            Match(host="*.example.com", path_prefix="/b"),
            Match(path_prefix="/b"),
        ]
    )
    group = table.index.wildcard[".example.com"]
    assert {s: [r.name for r in found] for s, found in group.by_segment.items()} == {
        "a": ["r0", "r4"],
        "c": ["r1", "r4"],
        "d": ["r2", "r4"],
        "e": ["r3", "r4"],
    }
    assert [r.name for r in group.other] == ["r4"]
    # r5 can never win; r6 still does for hosts outside example.com.
    assert match_route(table, "www.example.com", "/b") is table.routes[4]
    assert match_route(table, "other.org", "/b") is table.routes[6]


def test_small_groups_are_tried_whole_without_the_segment() -> None:
    small = [Match(path_prefix=p) for p in ("/api/v1", "/api", "/static")] + [Match()]
    table = table_of([Match(host="api.example.com"), *small])
    assert not table.index.segmented
    assert table.index.any_host is not None
    assert [r.name for r in table.index.any_host.other] == ["r1", "r2", "r3", "r4"]
    assert match_route(table, "api.example.com", "/x/y") is table.routes[0]
    assert match_route(table, "other", "/api/v2") is table.routes[2]
    assert match_route(table, "other", "*") is table.routes[4]
    # One more route and the group is indexed by segment.
    table = table_of([*small[:3], Match(path_prefix="/img"), Match()])
    assert table.index.segmented
