"""The normal form of request paths (issue 17 item 10): what routing matches and what is sent on.

`/api/../admin` and `/api/%2e%2e/admin` used to match the `/api` route and go upstream as
received; they are now `/admin`. A path above the root, NUL, `#` or a broken escape is refused.
The oracle below is RFC 3986 written out literally (section 5.2.4 step by step, section 6.2.2.1
character by character), independent of the implementation's segment stack and escape table.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.routing import make_view, match_route, normalize_target
from proxy.core.spec import ConfigSpec, Endpoint, Match, RouteSpec, UpstreamSpec
from proxy.core.table import PathError, Table, compile_table, normalize_path, path_from_text

UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
HEX = frozenset(b"0123456789abcdefABCDEF")


def oracle_escapes(path: bytes) -> bytes | None:
    """Section 6.2.2.1 and 6.2.2.2 byte by byte; None for a malformed escape or %00."""
    out = bytearray()
    i = 0
    while i < len(path):
        if path[i] != ord("%"):
            out.append(path[i])
            i += 1
            continue
        digits = path[i + 1 : i + 3]
        if len(digits) != 2 or not all(d in HEX for d in digits):
            return None
        value = int(digits, 16)
        if value == 0:
            return None
        if value in UNRESERVED:
            out.append(value)
        else:
            out += b"%" + digits.upper()
        i += 3
    return bytes(out)


def oracle_remove_dot_segments(path: bytes) -> bytes | None:
    """RFC 3986 section 5.2.4, rules A to E on buffers; None when a `..` finds nothing to
    remove (the RFC would silently stay at the root; Turnout refuses)."""
    inp = path
    out = b""
    while inp:
        if inp.startswith(b"../"):  # A
            inp = inp[3:]
        elif inp.startswith((b"./", b"/./")):  # A, B
            inp = inp[2:]
        elif inp == b"/.":  # B
            inp = b"/"
        elif inp.startswith(b"/../") or inp == b"/..":  # C
            inp = b"/" + inp[4:] if inp.startswith(b"/../") else b"/"
            if not out:
                return None
            out = out[: out.rfind(b"/")]
        elif inp in (b".", b".."):  # D
            inp = b""
        else:  # E
            start = 1 if inp.startswith(b"/") else 0
            end = inp.find(b"/", start)
            end = len(inp) if end < 0 else end
            out += inp[:end]
            inp = inp[end:]
    return out


def oracle(path: bytes) -> bytes | None:
    if not path.startswith(b"/") or b"\x00" in path or b"#" in path:
        return None
    escaped = oracle_escapes(path)
    return None if escaped is None else oracle_remove_dot_segments(escaped)


def normal_or_none(path: bytes) -> bytes | None:
    try:
        return normalize_path(path)
    except PathError:
        return None


# --- examples -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # The two examples.
        (b"/api/../admin", b"/admin"),
        (b"/api/%2e%2e/admin", b"/admin"),
        (b"/api/%2E%2e/admin", b"/admin"),
        (b"/api/.%2e/admin", b"/admin"),
        (b"/api/./users", b"/api/users"),
        (b"/api/users/.", b"/api/users/"),
        (b"/api/users/..", b"/api/"),
        (b"/a/b/../../c", b"/c"),
        (b"/a/..", b"/"),
        (b"/.", b"/"),
        (b"/", b"/"),
        # Unreserved characters decode, everything else keeps its escape with upper-case hex.
        (b"/%7Euser/%41%62%2D%5f", b"/~user/Ab-_"),
        (b"/a%20b", b"/a%20b"),
        (b"/a%2fb", b"/a%2Fb"),
        (b"/a%2Fb", b"/a%2Fb"),
        (b"/a%5cb", b"/a%5Cb"),
        (b"/%c3%a9", b"/%C3%A9"),
        (b"/100%25", b"/100%25"),
        (b"/%2525", b"/%2525"),
        # Encoded slash and backslash are data, not separators: `..%2F` is no dot segment.
        (b"/api/..%2Fadmin", b"/api/..%2Fadmin"),
        (b"/api/..\\admin", b"/api/..\\admin"),
        (b"/api\\..\\admin", b"/api\\..\\admin"),
        # Slashes are not merged; an empty segment is a segment.
        (b"//api//x", b"//api//x"),
        (b"/a//..", b"/a/"),
        (b"//.", b"//"),
        # Not dot segments.
        (b"/.well-known/x", b"/.well-known/x"),
        (b"/a/.../b", b"/a/.../b"),
        (b"/a/..b/.c", b"/a/..b/.c"),
    ],
)
def test_normalize_path_examples(raw: bytes, expected: bytes) -> None:
    assert normalize_path(raw) == expected
    assert oracle(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"/..", "climbs above the root"),
        (b"/../admin", "climbs above the root"),
        (b"/api/../../admin", "climbs above the root"),
        (b"/api/%2e%2e/%2E%2E/etc", "climbs above the root"),
        (b"/a\x00b", "NUL"),
        (b"/a%00b", "NUL (%00)"),
        (b"/a#frag", "fragment"),
        (b"/a%", "malformed percent escape"),
        (b"/a%4", "malformed percent escape"),
        (b"/a%zz", "malformed percent escape"),
        (b"/a%+1", "malformed percent escape"),
        (b"api", "must start with '/'"),
        (b"", "must start with '/'"),
    ],
)
def test_normalize_path_refuses(raw: bytes, reason: str) -> None:
    with pytest.raises(PathError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        normalize_path(raw)
    assert oracle(raw) is None


def test_unchanged_path_and_target_are_the_same_object() -> None:
    # The hot path must not copy a target that needs no work.
    for target in (b"/api/users/42", b"/static/app.js", b"/x?next=/./y&q=%2e", b"/a?b"):
        assert normalize_target(target) is target
    path = b"/api/users/42"
    assert normalize_path(path) is path


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api/../admin?x=1", b"/admin?x=1"),
        (b"/api/%2e%2e/admin?q=%2e%2e/../%00&r", b"/admin?q=%2e%2e/../%00&r"),
        (b"/a/./b?", b"/a/b?"),
        (b"/%7e?%7e", b"/~?%7e"),
        (b"/?/../", b"/?/../"),
    ],
)
def test_normalize_target_leaves_the_query_alone(target: bytes, expected: bytes) -> None:
    assert normalize_target(target) == expected


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/a#frag", "fragment"),
        (b"/a?x=1#frag", "fragment"),
        (b"/a?x=\x00", "NUL"),
        (b"/a%00?x", "NUL"),
        (b"/../x?y", "above the root"),
        (b"/%zz?y", "malformed"),
    ],
)
def test_normalize_target_refuses(target: bytes, reason: str) -> None:
    with pytest.raises(PathError, match=reason):
        normalize_target(target)


# --- properties -----------------------------------------------------------------------------

PIECES = (
    b"/",
    b"/",
    b"a",
    b"B",
    b"~",
    b".",
    b"..",
    b"/.",
    b"/..",
    b"%2e",
    b"%2E",
    b"%2f",
    b"%2F",
    b"%41",
    b"%7e",
    b"%25",
    b"%c3",
    b"%00",
    b"%",
    b"%4",
    b"%g1",
    b"\\",
    b"#",
    b"\x00",
    b"?",
    b"-",
)
raw_paths = st.lists(st.sampled_from(PIECES), max_size=14).map(lambda parts: b"".join(parts))


@settings(max_examples=800)
@given(st.one_of(raw_paths.map(lambda p: b"/" + p), raw_paths, st.binary(max_size=24)))
def test_normalize_path_is_rfc_3986(raw: bytes) -> None:
    assert normal_or_none(raw) == oracle(raw)


@settings(max_examples=500)
@given(raw_paths.map(lambda p: b"/" + p))
def test_normal_form_is_a_fixed_point(raw: bytes) -> None:
    normal = normal_or_none(raw)
    if normal is None:
        return
    assert normalize_path(normal) == normal
    segments = normal.split(b"/")
    assert b"." not in segments
    assert b".." not in segments
    for part in normal.split(b"%")[1:]:
        digits = part[:2]
        assert digits == digits.upper()
        assert int(digits, 16) not in UNRESERVED


@settings(max_examples=500)
@given(
    raw_paths.map(lambda p: b"/" + p),
    st.binary(max_size=16).filter(lambda q: b"#" not in q and b"\x00" not in q),
)
def test_normalize_target_is_normalize_path_plus_the_query(path: bytes, query: bytes) -> None:
    path = path.replace(b"?", b"")
    normal = normal_or_none(path)
    for target, tail in ((path, b""), (path + b"?" + query, b"?" + query)):
        if normal is None:
            with pytest.raises(PathError):
                normalize_target(target)
        else:
            assert normalize_target(target) == normal + tail


# --- routing on the normal form ----------------------------------------------------------------

UPSTREAMS = (UpstreamSpec("blue", (Endpoint("127.0.0.1", 9001),)),)


def table_of(*prefixes: str) -> Table:
    routes = tuple(
        RouteSpec(f"r{i}", (("blue", 1.0),), Match(path_prefix=prefix))
        for i, prefix in enumerate(prefixes)
    )
    return compile_table(ConfigSpec(upstreams=UPSTREAMS, routes=routes), generation=1, sha256="s")


def route_for(table: Table, target: bytes) -> str | None:
    """The route the data plane picks: normalise the target, cut the query, match."""
    path = normalize_target(target).partition(b"?")[0].decode("latin-1")
    route = match_route(table, "", path)
    return None if route is None else route.name


@pytest.mark.parametrize(
    "target", [b"/api/../admin", b"/api/%2e%2e/admin", b"/api/./.%2E/admin/x?y=/api"]
)
def test_dot_segments_cannot_reach_another_route_through_api(target: bytes) -> None:
    table = table_of("/api", "/admin")
    assert route_for(table, target) == "r1"


@pytest.mark.parametrize(
    ("prefix", "target"),
    [
        ("/~user", b"/%7Euser/x"),
        ("/%7euser", b"/~user/x"),
        ("/%7Euser", b"/%7euser"),
        ("/a%2fb", b"/a%2Fb/c"),
        ("/café", b"/caf%c3%a9/menu"),
        ("/a/./b/../c", b"/a/c/d"),
        ("/with space", b"/with%20space"),
    ],
)
def test_prefix_and_request_meet_in_the_normal_form(prefix: str, target: bytes) -> None:
    table = table_of(prefix)
    assert route_for(table, target) == "r0"


def test_encoded_slash_is_not_a_separator() -> None:
    # `/a%2Fb` is one segment: a route for `/a` does not match it, as with Envoy's default.
    table = table_of("/a", "/")
    assert route_for(table, b"/a%2Fb") == "r1"
    assert route_for(table, b"/a/b") == "r0"


@pytest.mark.parametrize("prefix", ["/..", "/a/../..", "/a%zz", "/a%00"])
def test_a_prefix_that_no_request_can_have_matches_nothing(prefix: str) -> None:
    table = table_of(prefix, "/")
    for target in (b"/", b"/a", b"/a/x", b"/x"):
        assert route_for(table, target) == "r1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/api/../admin", "/admin"),
        ("/café", "/caf%C3%A9"),
        ("/a b", "/a%20b"),
        ("/%7e", "/~"),
        ("/\udc80", "/%ED%B2%80"),
    ],
)
def test_path_from_text(text: str, expected: str) -> None:
    assert path_from_text(text) == expected


def test_make_view_routes_on_the_normal_form_like_the_data_plane() -> None:
    # /admin/explain builds its view with make_view: it must see what the data plane sees.
    table = table_of("/api", "/admin")
    req = make_view(table, "GET", "h", "/api/%2e%2e/admin?x=1", [])
    assert req.path == "/admin"
    with pytest.raises(PathError, match="above the root"):
        make_view(table, "GET", "h", "/../etc/passwd", [])
