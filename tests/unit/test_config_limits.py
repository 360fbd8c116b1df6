"""Limits on the config file itself: every edge case a located error, never a traceback.

Issue 17 item 8: lone surrogates that broke /admin/config, deep nesting and huge integers that
printed tracebacks, values without bounds, unreachable routes, unbounded error logs.
"""

from __future__ import annotations

import re

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.config import (
    LOG_ISSUE_LIMIT,
    MAX_FILE_BYTES,
    ConfigError,
    ConfigIssue,
    format_issues,
    parse_config,
    spec_to_dict,
    summary,
)
from proxy.core.routing import match_route
from proxy.core.spec import ConfigSpec, Endpoint, Match, RouteSpec, UpstreamSpec
from proxy.core.table import compile_table

HEAD = """\
upstreams:
  blue: {endpoints: [127.0.0.1:9001]}
  green: {endpoints: [127.0.0.1:9101]}
routes:
"""
# HEAD is 4 lines: a route given to `table` starts on line 5.
ROUTE = "  - name: api\n    split: {blue: 1}\n"

# Lines of an error: `file:line:col: path: message` (the path may be absent).
ISSUE_RE = re.compile(r"f\.yaml:[0-9]+:[0-9]+: ")


def table(route: str = ROUTE, top: str = "") -> str:
    return HEAD + route + top


def outcome(text: str) -> ConfigSpec | list[ConfigIssue]:
    """The spec parse_config returns, or the issues it raises (any other exception escapes)."""
    try:
        return parse_config(text, "f.yaml")
    except ConfigError as exc:
        return exc.issues


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml")
    return [str(issue) for issue in caught.value.issues]


def the_error(text: str) -> str:
    (error,) = errors_of(text)
    return error


# --- strings the admin plane could not dump ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            table(
                "  - name: api\n    split: {blue: 1}\n"
                '    overrides: [{header: x, value: "\\udc80", to: blue}]\n'
            ),
            "f.yaml:7:36: routes[0].overrides[0].value: '\\udc80' is half of a UTF-16 surrogate "
            "pair, not a character; write the character itself (or \\U0001F600 for one above "
            "U+FFFF)",
        ),
        (
            table(top='state_file: "x\\ud83d\\ude00.json"\n'),
            "f.yaml:7:13: state_file: '\\ud83d' is half of a UTF-16 surrogate pair, not a "
            "character; write the character itself (or \\U0001F600 for one above U+FFFF)",
        ),
        (
            table('  - name: api\n    match: {path_prefix: "/\\udc80"}\n    split: {blue: 1}\n'),
            "f.yaml:6:26: routes[0].match.path_prefix: '\\udc80' is half of a UTF-16 surrogate "
            "pair, not a character; write the character itself (or \\U0001F600 for one above "
            "U+FFFF)",
        ),
        (
            # A key: the path shows it escaped, so the message itself stays valid UTF-8.
            table(top='"k\\udc80": 1\n'),
            "f.yaml:7:1: k\\udc80: '\\udc80' is half of a UTF-16 surrogate pair, not a "
            "character; write the character itself (or \\U0001F600 for one above U+FFFF)",
        ),
    ],
    ids=["override-value", "state-file-pair", "path-prefix", "key"],
)
def test_lone_surrogates_are_located_errors(text: str, expected: str) -> None:
    # Before: accepted, and orjson could not dump the config (/admin/config answered 500).
    errors = errors_of(text)
    assert errors == [expected]
    assert all(error.encode("utf-8") for error in errors)


def test_a_surrogate_under_an_unknown_key_is_still_reported() -> None:
    errors = errors_of(table(top='extra: {a: "\\udc80"}\n'))
    assert errors == [
        "f.yaml:7:1: extra: unknown key 'extra' (allowed: listen, admin, workers, state_file, "
        "via, timeouts, limits, drain, annotations, fleet, upstreams, routes)",
        "f.yaml:7:12: '\\udc80' is half of a UTF-16 surrogate pair, not a character; write the "
        "character itself (or \\U0001F600 for one above U+FFFF)",
    ]


def test_real_non_ascii_characters_are_kept_and_dump_as_json() -> None:
    text = table(
        "  - name: api\n    split: {blue: 1}\n"
        '    overrides: [{header: x, value: "\\U0001F600é", to: blue}]\n'
    )
    spec = parse_config(text, "f.yaml")
    assert spec.routes[0].overrides[0].value == "\U0001f600é"
    assert "\U0001f600é" in orjson.dumps(spec_to_dict(spec)).decode()


def test_control_characters_in_a_quoted_value_are_escaped_in_messages() -> None:
    # Before: the newline went into the message, splitting one error over two log lines.
    assert errors_of(table(top='workers: "two\\nlines\\x00"\n')) == [
        "f.yaml:7:10: workers: expected an integer from 1 to 1024 or 'auto', "
        "got a string 'two\\nlines\\x00'"
    ]


# --- nesting, sizes and digits ----------------------------------------------------------------


def test_deep_nesting_is_a_located_error_not_a_recursion_error() -> None:
    text = table(top="extra: " + "[" * 600 + "]" * 600 + "\n")
    assert len(text) < 1400
    # The top mapping is level 1 and `extra`'s list level 2: the 64th list is the 65th level.
    assert errors_of(text) == [
        "f.yaml:7:71: lists and mappings are nested more than 64 deep; "
        "the rest of the file was not read"
    ]


def test_nesting_up_to_the_limit_is_read() -> None:
    # 63 lists under the top mapping: read, and refused only as an unknown key.
    errors = errors_of(table(top="extra: " + "[" * 63 + "]" * 63 + "\n"))
    assert errors == [
        "f.yaml:7:1: extra: unknown key 'extra' (allowed: listen, admin, workers, state_file, "
        "via, timeouts, limits, drain, annotations, fleet, upstreams, routes)"
    ]


def test_deep_block_mappings_are_bounded_too() -> None:
    text = "".join(f"{' ' * level}k:\n" for level in range(100))
    assert errors_of(text) == [
        "f.yaml:65:65: lists and mappings are nested more than 64 deep; "
        "the rest of the file was not read"
    ]


def test_a_file_over_the_size_limit_is_refused_before_parsing() -> None:
    text = table() + "#" * MAX_FILE_BYTES
    assert errors_of(text) == [
        f"f.yaml:1:1: the file is {len(text)} bytes; at most 16MiB ({MAX_FILE_BYTES} bytes) is read"
    ]


def test_the_size_limit_counts_utf8_bytes() -> None:
    comment = "#" + "é" * (MAX_FILE_BYTES // 2)
    text = table() + comment
    assert len(text) < MAX_FILE_BYTES < len(text.encode("utf-8"))
    assert errors_of(text)[0].startswith("f.yaml:1:1: the file is ")


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        # Before: ValueError from int() (Python's 4300-digit limit), a traceback.
        (
            "workers: " + "1" * 5000 + "\n",
            "f.yaml:7:10: workers: too long: 5000 characters (at most 4096 for any key or "
            "value, 63 for a name)",
        ),
        ("workers: " + "1" * 4000 + "\n", "f.yaml:7:10: workers: must be from 1 to 1024"),
        ("workers: 100000\n", "f.yaml:7:10: workers: must be from 1 to 1024"),
        ("workers: 1025\n", "f.yaml:7:10: workers: must be from 1 to 1024"),
        (
            "limits: {max_connections: 100000000000000000000}\n",
            "f.yaml:7:27: limits.max_connections: must be from 1 to 1000000",
        ),
        (
            "limits: {max_connections: 1e20}\n",
            "f.yaml:7:27: limits.max_connections: expected an integer, got a string '1e20'",
        ),
        (
            "limits: {max_connections: 1000001}\n",
            "f.yaml:7:27: limits.max_connections: must be from 1 to 1000000",
        ),
        (
            "limits: {max_headers: 10001}\n",
            "f.yaml:7:23: limits.max_headers: must be from 1 to 10000",
        ),
        (
            "limits: {max_concurrent_streams: 0}\n",
            "f.yaml:7:34: limits.max_concurrent_streams: must be from 1 to 10000",
        ),
        (
            "limits: {max_header_size: 2MiB}\n",
            "f.yaml:7:27: limits.max_header_size: must be from 1 to 1MiB",
        ),
        (
            "limits: {max_request_body: 1025GiB}\n",
            "f.yaml:7:28: limits.max_request_body: must be from 1 to 1024GiB",
        ),
        (
            # Before: accepted, and orjson could not dump it (over 64 bits).
            "limits: {max_request_body: 99999999999999999999999}\n",
            "f.yaml:7:28: limits.max_request_body: size '99999999999999999999999' is too large",
        ),
        (
            "limits: {max_request_body: " + "9" * 4000 + "KiB}\n",
            "f.yaml:7:28: limits.max_request_body: size '" + "9" * 61 + "...' is too large",
        ),
    ],
    ids=[
        "workers-5000-digits",
        "workers-4000-digits",
        "workers-100000",
        "workers-1025",
        "connections-20-digits",
        "connections-exponent",
        "connections-over",
        "headers-over",
        "streams-zero",
        "header-size-over",
        "body-over",
        "body-23-digits",
        "body-4000-digits",
    ],
)
def test_numbers_have_bounds(top: str, expected: str) -> None:
    assert errors_of(table(top=top)) == [expected]


def test_numbers_at_their_bounds_are_accepted() -> None:
    spec = parse_config(
        table(
            "  - name: api\n    split: {blue: 1000000}\n"
            "    mirror: {to: green, max_body: 1GiB, max_in_flight: 10000}\n"
            "    rollout: {baseline: blue, canary: green, min_requests: 1000000000}\n",
            "workers: 1024\n"
            "limits: {max_connections: 1000000, max_headers: 10000, max_header_size: 1MiB,"
            " max_request_body: 1024GiB, max_concurrent_streams: 10000}\n",
        ).replace(
            "blue: {endpoints: [127.0.0.1:9001]}",
            "blue: {endpoints: [127.0.0.1:9001], health: {unhealthy_after: 1000, "
            "healthy_after: 1000}}",
        ),
        "f.yaml",
    )
    assert spec.workers == 1024
    assert spec.limits.max_request_body == 1 << 40
    assert spec.limits.max_concurrent_streams == 10000
    assert spec.routes[0].mirror is not None
    assert spec.routes[0].mirror.max_body == 1 << 30
    # Everything in force can be dumped by the admin plane.
    assert orjson.dumps(spec_to_dict(spec))


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (
            "  - name: api\n    split: {blue: 1}\n    mirror: {to: green, max_body: 2GiB}\n",
            "f.yaml:7:35: routes[0].mirror.max_body: must be from 0 to 1GiB",
        ),
        (
            "  - name: api\n    split: {blue: 1}\n    mirror: {to: green, max_in_flight: 10001}\n",
            "f.yaml:7:40: routes[0].mirror.max_in_flight: must be from 1 to 10000",
        ),
        (
            "  - name: api\n    split: {blue: 1}\n"
            "    rollout: {baseline: blue, canary: green, min_requests: 1000000001}\n",
            "f.yaml:7:60: routes[0].rollout.min_requests: must be from 1 to 1000000000",
        ),
        (
            "  - name: api\n    split: {blue: 1}\n"
            "    rollout: {baseline: blue, canary: green, steps: ["
            + ", ".join(str(n / 2) for n in range(1, 103))
            + "]}\n",
            "f.yaml:7:53: routes[0].rollout.steps: at most 100 steps (this list has 102)",
        ),
        (
            "  - name: api\n    split: {blue: 1}\n    overrides: ["
            + ", ".join("{header: x, to: green}" for _ in range(1001))
            + "]\n",
            "f.yaml:7:16: routes[0].overrides: at most 1000 overrides (this list has 1001)",
        ),
        (
            "  - name: api\n    split: {blue: 1}\n    mirror: {to: green, methods: ["
            + ", ".join(["GET"] * 10)
            + "]}\n",
            "f.yaml:7:34: routes[0].mirror.methods: at most 9 methods (this list has 10)",
        ),
    ],
    ids=["mirror-body", "in-flight", "min-requests", "steps", "overrides", "methods"],
)
def test_route_numbers_and_lists_have_bounds(route: str, expected: str) -> None:
    assert errors_of(table(route)) == [expected]


def test_endpoint_count_is_bounded() -> None:
    endpoints = ", ".join(f"127.0.0.1:{port}" for port in range(2000, 3001))
    text = table().replace("[127.0.0.1:9001]", f"[{endpoints}]")
    assert errors_of(text) == [
        "f.yaml:2:21: upstreams.blue.endpoints: at most 1000 endpoints (this list has 1001)"
    ]


def test_health_counts_are_bounded() -> None:
    text = table().replace(
        "blue: {endpoints: [127.0.0.1:9001]}",
        "blue: {endpoints: [127.0.0.1:9001], health: {healthy_after: 1001}}",
    )
    assert errors_of(text) == [
        "f.yaml:2:63: upstreams.blue.health.healthy_after: must be from 1 to 1000"
    ]


# --- names and strings ------------------------------------------------------------------------


def test_a_huge_route_name_is_refused_without_being_echoed() -> None:
    # Before: accepted (the issue used 10 MB); 100k characters make the same point faster.
    text = table(f"  - name: {'a' * 100_000}\n    split: {{blue: 1}}\n")
    assert errors_of(text) == [
        "f.yaml:5:11: routes[0].name: too long: 100000 characters (at most 4096 for any key or "
        "value, 63 for a name)"
    ]


@pytest.mark.parametrize("what", ["route", "upstream"])
def test_names_are_at_most_63_characters(what: str) -> None:
    long, ok = "a" * 64, "b" * 63
    if what == "route":
        text = table(f"  - name: {long}\n    split: {{blue: 1}}\n")
        where = "f.yaml:5:11: routes[0].name"
    else:
        text = table().replace("  green:", f"  {long}:")
        where = f"f.yaml:3:3: upstreams.{long}"
    assert errors_of(text) == [
        f"{where}: {what} name of 64 characters; at most 63 (a DNS label, like a Kubernetes name)"
    ]
    accepted = table(f"  - name: {ok}\n    split: {{{ok}: 1}}\n").replace("  green:", f"  {ok}:")
    spec = parse_config(accepted, "f.yaml")
    assert spec.routes[0].name == ok
    assert spec.upstreams[1].name == ok


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (
            "  - name: api\n    split: {blue: 1}\n    sticky: {header: " + "x" * 257 + "}\n",
            "f.yaml:7:22: routes[0].sticky.header: a name of 257 characters; at most 256",
        ),
        (
            "  - name: api\n    split: {blue: 1}\n    overrides: [{cookie: "
            + "c" * 257
            + ", to: blue}]\n",
            "f.yaml:7:26: routes[0].overrides[0].cookie: a name of 257 characters; at most 256",
        ),
        (
            "  - name: api\n    match: {path_prefix: /" + "p" * 1024 + "}\n    split: {blue: 1}\n",
            "f.yaml:6:26: routes[0].match.path_prefix: a path of 1025 characters; at most 1024",
        ),
        (
            "  - name: api\n    match: {host: "
            + "h" * 64
            + ".example.com}\n    split: {blue: 1}\n",
            "f.yaml:6:19: routes[0].match.host: host too long: at most 253 characters, 63 between "
            "dots (DNS limits)",
        ),
        (
            "  - name: api\n    match: {host: '*."
            + ".".join(["h" * 60] * 5)
            + "'}\n    split: {blue: 1}\n",
            "f.yaml:6:19: routes[0].match.host: host too long: at most 253 characters, 63 between "
            "dots (DNS limits)",
        ),
        (
            "  - name: api\n    split: {blue: 1}\n    overrides: [{header: x, value: "
            + "v" * 4097
            + ", to: blue}]\n",
            "f.yaml:7:36: routes[0].overrides[0].value: too long: 4097 characters (at most 4096 "
            "for any key or value, 63 for a name)",
        ),
    ],
    ids=["header", "cookie", "path", "host-label", "host-length", "value"],
)
def test_strings_have_bounds(route: str, expected: str) -> None:
    assert errors_of(table(route)) == [expected]


def test_endpoint_host_names_have_dns_bounds() -> None:
    text = table().replace("127.0.0.1:9001", "h" * 64 + ".internal:9001")
    assert errors_of(text) == [
        "f.yaml:2:22: upstreams.blue.endpoints[0]: bad address '"
        + "h" * 61
        + "...': the host is too long (at most 253 characters, 63 between dots)"
    ]


def test_echoed_values_are_cut_short() -> None:
    key = "k" * 200
    (error,) = errors_of(table(top=f"{key}: 1\n"))
    shown = "k" * 61 + "..."
    assert error.startswith(f"f.yaml:7:1: {shown}: unknown key '{shown}' (allowed: ")


def test_unknown_upstream_lists_at_most_ten_known_names() -> None:
    upstreams = "".join(f"  u{n:03}: {{endpoints: [127.0.0.1:{9000 + n}]}}\n" for n in range(100))
    text = f"upstreams:\n{upstreams}routes:\n  - name: api\n    split: {{nope: 1, u000: 1}}\n"
    known = ", ".join(f"u{n:03}" for n in range(10))
    assert errors_of(text) == [
        f"f.yaml:104:13: routes[0].split.nope: unknown upstream 'nope' "
        f"(known: {known}, ... (100 in all))"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"/"', "'/' names a folder; give a file, e.g. turnout.state.json"),
        ("state/", "'state/' names a folder; give a file, e.g. turnout.state.json"),
        ('"."', "'.' names a folder; give a file, e.g. turnout.state.json"),
        ('".."', "'..' names a folder; give a file, e.g. turnout.state.json"),
        ("state/..", "'state/..' names a folder; give a file, e.g. turnout.state.json"),
        ('""', "expected a file path"),
        ("f.yaml", "must not be the config file itself"),
        ("./sub/../f.yaml", "must not be the config file itself"),
    ],
)
def test_state_file_must_name_a_file(value: str, message: str) -> None:
    # Before: `state_file: "/"` was accepted; every save then failed at run time.
    with pytest.raises(ConfigError) as caught:
        parse_config(table(top=f"state_file: {value}\n"), "/etc/turnout/f.yaml")
    assert [str(issue) for issue in caught.value.issues] == [
        f"/etc/turnout/f.yaml:7:13: state_file: {message}"
    ]


def test_state_file_next_to_the_config_is_fine() -> None:
    spec = parse_config(table(top="state_file: f.state.json\n"), "/etc/turnout/f.yaml")
    assert spec.state_file == "/etc/turnout/f.state.json"


# --- counts of routes and upstreams -----------------------------------------------------------


def test_five_thousand_routes_are_fine() -> None:
    routes = "".join(
        f"  - {{name: r{n}, match: {{path_prefix: /r{n}}}, split: {{blue: 1}}}}\n"
        for n in range(5000)
    )
    spec = parse_config(HEAD + routes + ROUTE, "f.yaml")
    assert len(spec.routes) == 5001


# --- unreachable routes -----------------------------------------------------------------------


def two_routes(first: str, second: str) -> str:
    """Routes `a` (match `first`, line 5) and `b` (match `second`, line 8); `{}` for none."""
    return table(
        f"  - name: a\n    match: {first}\n    split: {{blue: 1}}\n"
        f"  - name: b\n    match: {second}\n    split: {{green: 1}}\n"
    )


UNREACHABLE = (
    "f.yaml:9:12: routes[1].match: unreachable: route 'a' (line 5) comes first and matches "
    "every request this route matches; put this route before it, or narrow that one"
)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("{}", "{path_prefix: /api}"),
        ("{path_prefix: /}", "{host: api.example.com}"),
        ("{}", "{host: '*.example.com', path_prefix: /x}"),
        ("{path_prefix: /api}", "{path_prefix: /api/v1}"),
        ("{path_prefix: /api/}", "{path_prefix: /api}"),
        ("{path_prefix: /api}", "{path_prefix: /api}"),
        ("{host: api.example.com}", "{host: API.Example.com., path_prefix: /x}"),
        ("{host: '*.example.com'}", "{host: a.example.com}"),
        ("{host: '*.example.com'}", "{host: a.b.example.com}"),
        ("{host: '*.example.com'}", "{host: '*.a.example.com'}"),
        ("{host: '*.example.com', path_prefix: /a}", "{host: '*.example.com', path_prefix: /a/b}"),
        ("{host: '*.com'}", "{host: '*.example.com'}"),
        ("{host: '[::1]'}", "{host: '::1'}"),
    ],
    ids=[
        "catch-all-first",
        "slash-then-host",
        "catch-all-then-wildcard",
        "sub-path",
        "trailing-slash",
        "same-match",
        "host-case-and-dot",
        "wildcard-then-exact",
        "wildcard-then-deeper-exact",
        "wildcard-then-deeper-wildcard",
        "wildcard-paths",
        "wildcard-then-narrower-wildcard",
        "ipv6-forms",
    ],
)
def test_unreachable_routes_are_errors(first: str, second: str) -> None:
    # Before: accepted silently; route b never saw a request.
    assert errors_of(two_routes(first, second)) == [UNREACHABLE]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("{host: x.example.com}", "{host: y.example.com}"),
        ("{host: x.example.com}", "{}"),
        ("{host: '*.example.com'}", "{host: example.com}"),
        ("{host: '*.a.example.com'}", "{host: '*.example.com'}"),
        ("{host: a.example.com}", "{host: '*.example.com'}"),
        ("{host: '*.example.com'}", "{}"),
        ("{path_prefix: /api}", "{path_prefix: /apix}"),
        ("{path_prefix: /api/v1}", "{path_prefix: /api}"),
        ("{path_prefix: /api}", "{}"),
        ("{host: '*.example.com', path_prefix: /a/b}", "{host: x.example.com, path_prefix: /a}"),
    ],
)
def test_routes_that_can_still_match_are_accepted(first: str, second: str) -> None:
    spec = parse_config(two_routes(first, second), "f.yaml")
    assert [route.name for route in spec.routes] == ["a", "b"]


def test_unreachable_names_the_first_covering_route_and_points_at_the_route() -> None:
    text = table(
        "  - name: a\n    match: {path_prefix: /api}\n    split: {blue: 1}\n"  # 5
        "  - name: all\n    split: {blue: 1}\n"  # 8
        "  - name: b\n    split: {green: 1}\n    retries: 1\n"  # 10
        "  - name: c\n    match: {path_prefix: /api/v2}\n    split: {green: 1}\n"  # 13
    )
    assert errors_of(text) == [
        "f.yaml:10:5: routes[2]: unreachable: route 'all' (line 8) comes first and matches every "
        "request this route matches; put this route before it, or narrow that one",
        "f.yaml:14:12: routes[3].match: unreachable: route 'a' (line 5) comes first and matches "
        "every request this route matches; put this route before it, or narrow that one",
    ]


def test_a_route_with_a_bad_match_does_not_hide_later_ones() -> None:
    # Its match unreadable, route a is not taken for a catch-all.
    errors = errors_of(two_routes("{host: 'bad host'}", "{path_prefix: /x}"))
    assert errors == [
        "f.yaml:6:19: routes[0].match.host: bad host 'bad host' "
        "(expected e.g. api.example.com or *.example.com)"
    ]


def test_the_shipped_catch_all_last_pattern_is_fine() -> None:
    spec = parse_config(
        table(
            "  - name: api\n    match: {host: api.example.com, path_prefix: /api}\n"
            "    split: {blue: 1}\n"
            "  - name: wild\n    match: {host: '*.example.com'}\n    split: {blue: 1}\n"
            "  - name: web\n    split: {green: 1}\n"
        ),
        "f.yaml",
    )
    assert [route.name for route in spec.routes] == ["api", "wild", "web"]


HOSTS = st.sampled_from(
    [None, "a.com", "b.a.com", "*.a.com", "*.b.a.com", "*.com", "b.com", "::1", "a.net"]
)
PREFIXES = st.sampled_from(["/", "/x", "/x/", "/x/y", "/xy", "/y", "/x/y/z"])


def witness(match: Match) -> tuple[str, str]:
    """A request only this match (among HOSTS x PREFIXES) is sure to take: names outside them."""
    host = match.host.rstrip(".") if match.host is not None else "q.zz"
    if host.startswith("*."):
        host = "qq" + host[1:]
    return host, match.path_prefix.rstrip("/") + "/qq"


@settings(max_examples=300)
@given(st.lists(st.tuples(HOSTS, PREFIXES), min_size=1, max_size=6))
def test_unreachable_agrees_with_routing(matches: list[tuple[str | None, str]]) -> None:
    """A route is reported unreachable exactly when routing never picks it for its witness."""
    routes = tuple(
        RouteSpec(name=f"r{n}", split=(("blue", 1.0),), match=Match(host=host, path_prefix=prefix))
        for n, (host, prefix) in enumerate(matches)
    )
    spec = ConfigSpec(
        upstreams=(UpstreamSpec("blue", (Endpoint("127.0.0.1", 9001),)),), routes=routes
    )
    issues = outcome(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    flagged: set[int] = set()
    if not isinstance(issues, ConfigSpec):
        assert all("unreachable" in found.message for found in issues)
        flagged = {int(found.path.split("[")[1].split("]")[0]) for found in issues}
    compiled = compile_table(spec, generation=1, sha256="")
    for index, route in enumerate(routes):
        host, path = witness(route.match)
        chosen = match_route(compiled, host, path)
        assert chosen is not None
        assert (chosen.index != index) == (index in flagged), (index, host, path, chosen.name)


# --- bounded logs -----------------------------------------------------------------------------


def issue(n: int) -> ConfigIssue:
    return ConfigIssue("f.yaml", n, 1, "routes", f"problem {n}")


def test_format_issues_keeps_short_lists_whole() -> None:
    assert format_issues([]) == []
    issues = [issue(n) for n in range(1, LOG_ISSUE_LIMIT + 1)]
    assert format_issues(issues) == [str(i) for i in issues]


def test_format_issues_cuts_long_lists_with_a_count() -> None:
    issues = [issue(n) for n in range(1, 100_001)]
    lines = format_issues(issues)
    assert len(lines) == LOG_ISSUE_LIMIT + 1
    assert lines[:-1] == [str(i) for i in issues[:LOG_ISSUE_LIMIT]]
    assert lines[-1] == (
        f"... and {100_000 - LOG_ISSUE_LIMIT} more errors (`turnout validate` lists every one)"
    )
    assert format_issues(issues[:3], limit=2)[-1] == (
        "... and 1 more error (`turnout validate` lists every one)"
    )
    # Plain strings too: the supervisor's read errors are not ConfigIssues.
    assert format_issues(["a", "b", "c"], limit=1) == [
        "a",
        "... and 2 more errors (`turnout validate` lists every one)",
    ]


def test_a_file_with_thousands_of_errors_logs_a_bounded_summary() -> None:
    split = ", ".join(f"x{n}: 1" for n in range(5000))
    with pytest.raises(ConfigError) as caught:
        parse_config(table(f"  - name: api\n    split: {{{split}}}\n"), "f.yaml")
    issues = caught.value.issues
    # `turnout validate` gets every one...
    assert len(issues) == 5000
    # ...a log line or last_error a bounded summary.
    lines = format_issues(issues)
    assert len(lines) == LOG_ISSUE_LIMIT + 1
    assert lines[-1].startswith("... and 4980 more errors")


# --- no traceback on any input ----------------------------------------------------------------


CONTRACT_LIKE = """\
listen: 127.0.0.1:8080
admin: 127.0.0.1:9901
workers: 2
state_file: state.json
timeouts: {connect: 2s, response: 30s}
limits: {max_request_body: 64MiB, max_connections: 10000}
upstreams:
  blue:
    endpoints: [127.0.0.1:9001, '[::1]:9002']
    health: {path: /ready, interval: 2s}
  canary: {endpoints: [127.0.0.1:9201]}
routes:
  - name: api
    match: {host: api.example.com, path_prefix: /api}
    overrides:
      - {header: x-canary, value: "true", to: canary}
    split: {blue: 90, canary: 10}
    sticky: {cookie: session_id, set: true}
    mirror: {to: canary, percent: 10, methods: [GET]}
    rollout: {baseline: blue, canary: canary, steps: [1, 50, 100]}
  - name: web
    split: {blue: 1}
"""

NASTY = [
    '"\\udc80"',
    '"\\ud83d\\ude00"',
    "\\",
    "[" * 80,
    "{" * 80,
    "]",
    "9" * 5000,
    "9" * 25,
    "1e400",
    "-1",
    "&a ",
    "*a",
    "<<: *a",
    "!!python/object:os.system ",
    "!custom ",
    "? ",
    ": ",
    "- ",
    "\t",
    "\n",
    "\n  ",
    "'",
    '"',
    "#",
    "%YAML 1.2\n---\n",
    "---\n",
    "\x00",
    "\x85",
    "\ufeff",
    "\U0001f600",
    "/",
    "*.",
    "[::1]",
    "auto",
    "0x10",
    "010",
    "1_000",
    ".inf",
    "~",
    "null",
    "yes",
    "x" * 5000,
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """The example with a few spans replaced by nasty fragments or arbitrary characters."""
    text = CONTRACT_LIKE
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        start = draw(st.integers(min_value=0, max_value=len(text)))
        end = draw(st.integers(min_value=start, max_value=min(len(text), start + 12)))
        fragment = draw(st.sampled_from(NASTY) | st.text(max_size=8))
        text = text[:start] + fragment + text[end:]
    return text


ANY_CHARACTER = st.characters(blacklist_categories=())


def assert_spec_or_located_errors(text: str) -> None:
    """parse_config returns a spec the admin plane can dump, or raises ConfigError only."""
    result = outcome(text)
    if isinstance(result, ConfigSpec):
        summary(result, "f.yaml")
        orjson.dumps(spec_to_dict(result))
        return
    assert result
    for found in result:
        line = str(found)
        assert ISSUE_RE.match(line), line
        assert found.line >= 1
        assert found.col >= 1
        # One printable line of bounded length, whatever the input.
        line.encode("utf-8")
        assert "\n" not in line
        assert len(line) <= 1500, line


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_configs_give_a_spec_or_located_errors(text: str) -> None:
    assert_spec_or_located_errors(text)


@settings(max_examples=300)
@given(st.text(ANY_CHARACTER, max_size=200))
def test_arbitrary_characters_give_a_spec_or_located_errors(text: str) -> None:
    assert_spec_or_located_errors(text)


@settings(max_examples=300)
@given(st.text(st.sampled_from(list("ab:-[]{}&*!,'\"\\\n #0129.%|>?~/u")), max_size=300))
def test_yaml_like_text_gives_a_spec_or_located_errors(text: str) -> None:
    assert_spec_or_located_errors(text)


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("/..", "climbs above the root"),
        ("/a%zz", "escape"),
    ],
)
def test_a_path_prefix_no_request_can_have_is_an_error(prefix: str, message: str) -> None:
    text = (
        "upstreams: {b: {endpoints: ['127.0.0.1:1']}}\n"
        f"routes: [{{name: r, match: {{path_prefix: '{prefix}'}}, split: {{b: 1}}}}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml")
    (issue,) = caught.value.issues
    assert issue.path == "routes[0].match.path_prefix"
    assert message in issue.message
