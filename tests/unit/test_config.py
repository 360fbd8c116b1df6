"""parse_config: the schema of contract section 1, every error with file:line:col and key path."""

from __future__ import annotations

import string

import orjson
import pytest
import yaml
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.config import (
    ConfigError,
    ConfigIssue,
    config_sha256,
    format_duration,
    format_size,
    parse_config,
    parse_duration,
    parse_size,
    spec_to_dict,
    summary,
)
from proxy.core.spec import (
    ALL_METHODS,
    WEBHOOK_EVENTS,
    Annotations,
    ConfigSpec,
    Drain,
    Endpoint,
    HealthCheck,
    Limits,
    Match,
    Mirror,
    Override,
    Rollout,
    RouteSpec,
    Sticky,
    Timeouts,
    UpstreamSpec,
    Webhook,
)

# Copied verbatim from contract section 1.
CONTRACT_EXAMPLE = """\
listen: 0.0.0.0:8080          # data plane, host:port
admin: 127.0.0.1:9901         # admin plane: /metrics /healthz /readyz /admin/...
workers: 1                    # processes sharing `listen` (SO_REUSEPORT); an integer or "auto"
state_file: turnout.state.json     # optional: where runtime weight changes and rollout state
                                   # persist (see 4, 5); relative to the config file's folder;
                                   # absent: kept in memory only, and a warning at start

timeouts:
  connect: 2s                 # TCP connect to an endpoint
  response: 30s               # until the upstream's response headers arrive
  idle: 60s                   # no byte moved in either direction while streaming a body
  client_keepalive: 75s       # idle keep-alive connection from a client

limits:
  max_request_body: 64MiB     # larger -> 413, the upstream never sees it
  max_connections: 10000      # per worker; beyond -> new connections wait in the backlog
  max_header_size: 64KiB      # whole request head; larger -> 431, nothing forwarded
  max_headers: 100            # header lines; more -> 431

drain:
  reload: 30s                 # how long connections to upstreams a reload removed may finish
  shutdown: 25s               # how long in-flight requests get after SIGTERM
  delay: 0s                   # after SIGTERM keep serving this long with /readyz = 503

upstreams:                    # the versions; names match [a-z0-9][a-z0-9_-]*
  blue:
    endpoints: [127.0.0.1:9001, 127.0.0.1:9002]
    health:                   # optional active check of every endpoint
      path: /ready
      interval: 2s
      timeout: 1s
      unhealthy_after: 3      # consecutive failures
      healthy_after: 2        # consecutive successes
  green:   {endpoints: [127.0.0.1:9101]}
  canary:  {endpoints: [127.0.0.1:9201]}
  shadow:  {endpoints: [127.0.0.1:9301]}

routes:                       # tried in order; the first whose `match` holds wins
  - name: api                 # unique; [a-z0-9][a-z0-9_-]*
    match:
      host: api.example.com   # optional; exact or "*.example.com"; case-insensitive, port ignored
      path_prefix: /api       # optional, default "/"; matches whole path segments
    overrides:                # optional; first that matches pins the upstream, skipping split
      - {header: x-canary, value: "true", to: canary}   # no `value`: header present at all
      - {cookie: release, value: canary, to: canary}
    split: {blue: 90, canary: 10}   # weights >= 0, not all 0; any upstream names
    sticky:                   # optional; exactly one of header / cookie
      cookie: session_id
      set: true               # cookie only: when absent, mint an id and Set-Cookie it
    mirror:                   # optional shadow traffic
      to: shadow
      percent: 10             # 0..100, fractions allowed
      max_body: 1MiB          # larger request bodies are not mirrored (counted as skipped)
      methods: [GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS]   # optional allowlist; default all
    retries: 2                # extra attempts on another endpoint, see 3
    rollout:                  # optional automated canary, see 5
      baseline: blue
      canary: canary
      steps: [1, 5, 25, 50, 100]
      interval: 60s
      min_requests: 50
      max_error_rate: 0.01
      max_p99: 500ms
"""

# Six lines of upstreams; a case's route starts on line 7 and its top-level keys follow it.
HEAD = """\
upstreams:
  blue: {endpoints: [127.0.0.1:9001]}
  green: {endpoints: [127.0.0.1:9101]}
  canary: {endpoints: [127.0.0.1:9201]}
  shadow: {endpoints: [127.0.0.1:9301]}
routes:
"""
ROUTE = "  - name: api\n    split: {blue: 1}\n"
# A route with a rollout block whose keys follow from line 12.
ROLLOUT = ROUTE + "    rollout:\n      baseline: blue\n      canary: canary\n"
URL_HINT = "expected e.g. http://127.0.0.1:8000/hooks/rollout"
KNOWN = "(known: blue, canary, green, shadow)"


def errors_of(text: str, path: str = "f.yaml") -> list[str]:
    """The issues parse_config reports for `text`, as strings; fails if it accepts the text."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    assert str(caught.value) == "\n".join(str(issue) for issue in caught.value.issues)
    return [str(issue) for issue in caught.value.issues]


def minimal(route: str = ROUTE, top: str = "") -> str:
    """HEAD, one route's YAML (lines 7..), then top-level keys."""
    return HEAD + route + top


# --- the contract's example and defaults ------------------------------------------------------


def test_contract_example_parses_to_the_documented_values() -> None:
    spec = parse_config(CONTRACT_EXAMPLE, "/etc/turnout/routes.yaml")
    assert spec.listen == ("0.0.0.0", 8080)
    assert spec.admin == ("127.0.0.1", 9901)
    assert spec.workers == 1
    assert spec.state_file == "/etc/turnout/turnout.state.json"
    assert spec.timeouts == Timeouts(connect=2.0, response=30.0, idle=60.0, client_keepalive=75.0)
    assert spec.limits == Limits(
        max_request_body=64 * 2**20, max_connections=10000, max_header_size=64 * 2**10
    )
    assert spec.drain == Drain(reload=30.0, shutdown=25.0, delay=0.0)
    assert [u.name for u in spec.upstreams] == ["blue", "green", "canary", "shadow"]
    assert spec.upstream("blue").endpoints == (
        Endpoint("127.0.0.1", 9001),
        Endpoint("127.0.0.1", 9002),
    )
    assert spec.upstream("blue").health == HealthCheck("/ready", 2.0, 1.0, 3, 2)
    assert spec.upstream("green").health is None
    (route,) = spec.routes
    assert route == RouteSpec(
        name="api",
        split=(("blue", 90.0), ("canary", 10.0)),
        match=Match(host="api.example.com", path_prefix="/api"),
        overrides=(
            Override(to="canary", header="x-canary", value="true"),
            Override(to="canary", cookie="release", value="canary"),
        ),
        sticky=Sticky(cookie="session_id", set=True),
        mirror=Mirror(
            to="shadow",
            percent=10.0,
            max_body=2**20,
            methods=frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")),
        ),
        retries=2,
        rollout=Rollout(
            baseline="blue",
            canary="canary",
            steps=(1.0, 5.0, 25.0, 50.0, 100.0),
            interval=60.0,
            min_requests=50,
            max_error_rate=0.01,
            max_p99=0.5,
        ),
    )


def test_defaults_fill_every_optional_key() -> None:
    text = minimal(
        "  - name: api\n"
        "    split: {blue: 1}\n"
        "    mirror: {to: shadow}\n"
        "    rollout: {baseline: blue, canary: canary}\n"
        "    sticky: {header: X-User}\n"
    ).replace("blue: {endpoints: [127.0.0.1:9001]}", "blue: {endpoints: [h:1], health: {}}")
    spec = parse_config(text, "f.yaml")
    assert spec.listen == ("0.0.0.0", 8080)
    assert spec.admin == ("127.0.0.1", 9901)
    assert spec.workers == 1
    assert spec.state_file is None
    assert spec.timeouts == Timeouts(2.0, 30.0, 60.0, 75.0)
    assert spec.limits == Limits(64 * 2**20, 10000, 64 * 2**10, 100)
    assert spec.drain == Drain(30.0, 25.0, 0.0)
    assert spec.annotations is None
    assert spec.upstream("blue").health == HealthCheck("/", 2.0, 1.0, 3, 2)
    (route,) = spec.routes
    assert route.match == Match(host=None, path_prefix="/")
    assert route.overrides == ()
    assert route.retries == 2
    assert route.sticky == Sticky(header="x-user", cookie=None, set=False)
    assert route.mirror == Mirror(
        to="shadow",
        percent=100.0,
        max_body=2**20,
        methods=None,
        max_in_flight=64,
        timeout=10.0,
        compare_json=False,
        compare_json_ignore=(),
    )
    assert route.rollout == Rollout(
        baseline="blue",
        canary="canary",
        steps=(1.0, 5.0, 25.0, 50.0, 100.0),
        interval=60.0,
        min_requests=50,
        max_error_rate=0.01,
        max_p99=0.5,
    )


def test_rollout_check_confidence_and_webhooks() -> None:
    text = minimal(
        ROLLOUT
        + "      confidence: 0.995\n"
        + "      check: 250ms\n"
        + "      interval: 1s\n"
        + "      webhooks:\n"
        + "        - {on: before_step, url: 'http://127.0.0.1:8000/gate?x=1', timeout: 30s}\n"
        + "        - {on: rollback, url: 'https://hooks.internal/turnout'}\n"
    )
    (route,) = parse_config(text, "f.yaml").routes
    assert route.rollout is not None
    assert (route.rollout.confidence, route.rollout.check) == (0.995, 0.25)
    assert route.rollout.webhooks == (
        Webhook(on="before_step", url="http://127.0.0.1:8000/gate?x=1", timeout=30.0),
        Webhook(on="rollback", url="https://hooks.internal/turnout", timeout=5.0),
    )
    dumped = spec_to_dict(parse_config(text, "f.yaml"))["routes"]
    assert isinstance(dumped, list)
    assert dumped[0]["rollout"]["check"] == "250ms"
    assert dumped[0]["rollout"]["webhooks"][1] == {
        "on": "rollback",
        "url": "https://hooks.internal/turnout",
        "timeout": "5s",
    }


@pytest.mark.parametrize(
    ("interval", "check"), [("60s", 5.0), ("5s", 5.0), ("2s", 2.0), ("300ms", 0.3)]
)
def test_rollout_check_defaults_to_5s_or_the_interval(interval: str, check: float) -> None:
    (route,) = parse_config(minimal(ROLLOUT + f"      interval: {interval}\n"), "f.yaml").routes
    assert route.rollout is not None
    assert route.rollout.check == check


def test_split_keeps_file_order_and_names_are_lowercased_where_promised() -> None:
    text = minimal(
        "  - name: api\n"
        "    match: {host: '*.Example.COM'}\n"
        "    overrides: [{header: X-Canary, to: canary}, {cookie: Release, to: canary}]\n"
        "    split: {shadow: 0, canary: 2.5, blue: 97.5}\n"
    )
    (route,) = parse_config(text, "f.yaml").routes
    assert route.split == (("shadow", 0.0), ("canary", 2.5), ("blue", 97.5))
    assert route.match.host == "*.example.com"
    assert route.overrides[0].header == "x-canary"
    assert route.overrides[0].value is None
    assert route.overrides[1].cookie == "Release"  # cookie names are case-sensitive


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("API.Example.com", "api.example.com"),
        ("'*.Example.com'", "*.example.com"),
        ("example.com.", "example.com."),
        ("'[::1]'", "::1"),
        ("'FE80::1'", "fe80::1"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_match_host_forms(written: str, stored: str) -> None:
    text = minimal(ROUTE + f"    match: {{host: {written}}}\n")
    assert parse_config(text, "f.yaml").routes[0].match.host == stored


def test_mirror_extensions_are_read() -> None:
    text = minimal(
        "  - name: api\n"
        "    split: {blue: 1}\n"
        "    mirror: {to: shadow, percent: 0.5, max_body: 0, max_in_flight: 8, timeout: 1.5s,\n"
        "             compare_json: TRUE, ignore_fields: [meta.id, ts], methods: [POST]}\n"
    )
    (route,) = parse_config(text, "f.yaml").routes
    assert route.mirror == Mirror(
        to="shadow",
        percent=0.5,
        max_body=0,
        methods=frozenset({"POST"}),
        max_in_flight=8,
        timeout=1.5,
        compare_json=True,
        compare_json_ignore=("meta.id", "ts"),
    )


# --- top-level scalars ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "listen", "admin"),
    [
        ("listen: '[::1]:8080'\nadmin: '[::1]:9901'\n", ("::1", 8080), ("::1", 9901)),
        ("listen: '[::]:80'\n", ("::", 80), ("127.0.0.1", 9901)),
        ("listen: localhost:65535\nadmin: localhost:1\n", ("localhost", 65535), ("localhost", 1)),
    ],
)
def test_addresses(top: str, listen: tuple[str, int], admin: tuple[str, int]) -> None:
    spec = parse_config(minimal(top=top), "f.yaml")
    assert spec.listen == listen
    assert spec.admin == admin


@pytest.mark.parametrize(("value", "workers"), [("auto", 0), ("'auto'", 0), ("1", 1), ("16", 16)])
def test_workers(value: str, workers: int) -> None:
    assert parse_config(minimal(top=f"workers: {value}\n"), "f.yaml").workers == workers


@pytest.mark.parametrize(
    ("config_path", "state_file", "resolved"),
    [
        ("/etc/turnout/routes.yaml", "turnout.state.json", "/etc/turnout/turnout.state.json"),
        ("/etc/turnout/routes.yaml", "../var/s.json", "/etc/var/s.json"),
        ("/etc/turnout/routes.yaml", "/var/lib/t/s.json", "/var/lib/t/s.json"),
        ("config/demo.yaml", "state/s.json", "config/state/s.json"),
        ("demo.yaml", "s.json", "s.json"),
    ],
)
def test_state_file_is_relative_to_the_config_folder(
    config_path: str, state_file: str, resolved: str
) -> None:
    spec = parse_config(minimal(top=f"state_file: {state_file}\n"), config_path)
    assert spec.state_file == resolved


# --- YAML surprises ---------------------------------------------------------------------------


def test_strings_are_taken_verbatim_not_as_yaml_1_1_types() -> None:
    text = minimal(
        "  - name: api\n"
        "    split: {blue: 1}\n"
        "    overrides:\n"
        "      - {header: x-a, value: NO, to: canary}\n"
        "      - {header: x-b, value: 010, to: canary}\n"
        "      - {cookie: on, value: 1.50, to: canary}\n"
        "      - {header: x-d, value: 2001-12-14, to: canary}\n"
        "      - {header: x-e, value: '', to: canary}\n"
    )
    (route,) = parse_config(text, "f.yaml").routes
    assert [(o.header or o.cookie, o.value) for o in route.overrides] == [
        ("x-a", "NO"),
        ("x-b", "010"),
        ("on", "1.50"),
        ("x-d", "2001-12-14"),
        ("x-e", ""),
    ]


def test_names_that_yaml_1_1_would_retype_stay_names() -> None:
    text = (
        "upstreams:\n"
        "  'no': {endpoints: [h:1]}\n"
        "  0: {endpoints: [h:2]}\n"
        "routes: [{name: null1, split: {'no': 1, 0: 1}}]\n"
    )
    spec = parse_config(text, "f.yaml")
    assert [u.name for u in spec.upstreams] == ["no", "0"]
    assert spec.routes[0].split == (("no", 1.0), ("0", 1.0))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["f.yaml:1:1: the file is empty; expected a mapping with upstreams and routes"]),
        (
            "# only\n# comments\n",
            ["f.yaml:1:1: the file is empty; expected a mapping with upstreams and routes"],
        ),
        ("---\n", ["f.yaml:1:1: the file is empty; expected a mapping with upstreams and routes"]),
        (
            "- upstreams\n- routes\n",
            ["f.yaml:1:1: the top level must be a mapping with upstreams and routes, got a list"],
        ),
        (
            "hello\n",
            [
                "f.yaml:1:1: the top level must be a mapping with upstreams and routes, "
                "got a string 'hello'"
            ],
        ),
        (
            "upstreams:\n  blue: &b {endpoints: ['h:1']}\n  green: *b\n"
            "routes: [{name: r, split: {blue: 1}}]\n",
            ["f.yaml:3:10: YAML aliases (*name) are not supported; write the value out"],
        ),
        (
            "upstreams: {blue: {endpoints: ['h:1']}}\nroutes: [{name: r, split: {blue: 1}}]\n"
            "listen: !!python/object:os.system x\n",
            ["f.yaml:3:9: YAML tag '!!python/object:os.system' is not supported"],
        ),
        (
            "upstreams: !custom {blue: {endpoints: ['h:1']}}\n"
            "routes: [{name: r, split: {blue: 1}}]\n",
            ["f.yaml:1:12: YAML tag '!custom' is not supported"],
        ),
        (
            "upstreams: {blue: {endpoints: ['h:1']}}\nroutes: [{name: r, split: {blue: 1}}]\n"
            "---\nlisten: h:1\n",
            ["f.yaml:3:1: only one YAML document is allowed per file"],
        ),
        (
            "upstreams: {blue: {endpoints: ['h:1']}}\nroutes: [{name: r, split: {blue: 1}}]\n"
            "upstreams: {}\n",
            ["f.yaml:3:1: upstreams: duplicate key 'upstreams' (first at line 1)"],
        ),
        (
            "upstreams: {blue: [\nroutes: x\n",
            [
                "f.yaml:3:1: YAML syntax error: expected ',' or ']', but got '<stream end>' "
                "(while parsing a flow sequence)"
            ],
        ),
        (
            "upstreams: \x00\n",
            ["f.yaml:1:12: not readable as YAML: special characters are not allowed"],
        ),
    ],
    ids=[
        "empty",
        "comments-only",
        "empty-document",
        "list-root",
        "scalar-root",
        "alias",
        "python-tag",
        "custom-tag",
        "two-documents",
        "duplicate-top-key",
        "syntax-error",
        "nul-byte",
    ],
)
def test_yaml_surprises_are_errors(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_standard_str_tag_is_accepted_and_means_string() -> None:
    text = minimal(
        "  - name: api\n"
        "    split: {blue: 1}\n"
        "    overrides: [{header: x, value: !!str 5, to: blue}]\n"
    )
    assert parse_config(text, "f.yaml").routes[0].overrides[0].value == "5"
    assert errors_of(minimal(top="workers: !!str 5\n")) == [
        "f.yaml:9:10: workers: expected an integer from 1 to 1024 or 'auto', got a string '5'"
    ]


# --- every error kind, exact text -------------------------------------------------------------

# (id, route YAML from line 7, top-level YAML after it, expected issues)
ERROR_CASES: list[tuple[str, str, str, list[str]]] = [
    (
        "unknown-top-key",
        ROUTE,
        "listn: 1.2.3.4:80\n",
        [
            "f.yaml:9:1: listn: unknown key 'listn' (allowed: listen, admin, workers, "
            "state_file, via, timeouts, limits, drain, annotations, fleet, upstreams, routes)"
        ],
    ),
    (
        "listen-no-port",
        ROUTE,
        "listen: 8080\n",
        ["f.yaml:9:9: listen: bad address '8080': expected host:port, e.g. 127.0.0.1:8080"],
    ),
    (
        "listen-port-range",
        ROUTE,
        "listen: '[::1]:99999'\n",
        [
            "f.yaml:9:9: listen: bad address '[::1]:99999': "
            "the port must be a number from 1 to 65535"
        ],
    ),
    (
        "listen-port-zero",
        ROUTE,
        "listen: 127.0.0.1:0\n",
        [
            "f.yaml:9:9: listen: bad address '127.0.0.1:0': "
            "the port must be a number from 1 to 65535"
        ],
    ),
    (
        "listen-bare-ipv6",
        ROUTE,
        "listen: ::1:8080\n",
        [
            "f.yaml:9:9: listen: bad address '::1:8080': "
            "put an IPv6 address in brackets, e.g. [::1]:9901"
        ],
    ),
    (
        "listen-no-host",
        ROUTE,
        "listen: ':8080'\n",
        ["f.yaml:9:9: listen: bad address ':8080': the host is missing"],
    ),
    (
        "admin-same-as-listen",
        ROUTE,
        "admin: 0.0.0.0:8080\n",
        ["f.yaml:9:8: admin: must not be the same address as listen"],
    ),
    ("workers-zero", ROUTE, "workers: 0\n", ["f.yaml:9:10: workers: must be from 1 to 1024"]),
    (
        "workers-word",
        ROUTE,
        "workers: many\n",
        ["f.yaml:9:10: workers: expected an integer from 1 to 1024 or 'auto', got a string 'many'"],
    ),
    (
        "workers-float",
        ROUTE,
        "workers: 2.5\n",
        ["f.yaml:9:10: workers: expected an integer from 1 to 1024 or 'auto', got a number '2.5'"],
    ),
    (
        "workers-leading-zero",
        ROUTE,
        "workers: 010\n",
        ["f.yaml:9:10: workers: leading zeros are ambiguous in '010' (YAML 1.1 octal)"],
    ),
    (
        "state-file-empty",
        ROUTE,
        "state_file: ''\n",
        ["f.yaml:9:13: state_file: expected a file path"],
    ),
    (
        "state-file-list",
        ROUTE,
        "state_file: [a]\n",
        ["f.yaml:9:13: state_file: expected a string, got a list"],
    ),
    (
        "timeout-zero",
        ROUTE,
        "timeouts: {connect: 0}\n",
        ["f.yaml:9:21: timeouts.connect: must be > 0"],
    ),
    (
        "timeout-no-unit",
        ROUTE,
        "timeouts: {connect: 5}\n",
        ["f.yaml:9:21: timeouts.connect: bad duration '5' (use e.g. 250ms, 2s, 1m, 1h)"],
    ),
    (
        "timeout-space",
        ROUTE,
        "timeouts: {response: 2 s}\n",
        ["f.yaml:9:22: timeouts.response: bad duration '2 s' (use e.g. 250ms, 2s, 1m, 1h)"],
    ),
    (
        "timeout-negative",
        ROUTE,
        "timeouts: {idle: -1s}\n",
        ["f.yaml:9:18: timeouts.idle: bad duration '-1s' (use e.g. 250ms, 2s, 1m, 1h)"],
    ),
    (
        "timeout-days",
        ROUTE,
        "timeouts: {client_keepalive: 1d}\n",
        ["f.yaml:9:30: timeouts.client_keepalive: bad duration '1d' (use e.g. 250ms, 2s, 1m, 1h)"],
    ),
    (
        "timeout-too-long",
        ROUTE,
        "timeouts: {connect: 25h}\n",
        ["f.yaml:9:21: timeouts.connect: must be at most 24h"],
    ),
    (
        "timeouts-not-mapping",
        ROUTE,
        "timeouts: [1]\n",
        ["f.yaml:9:11: timeouts: expected a mapping, got a list"],
    ),
    (
        "timeouts-unknown-key",
        ROUTE,
        "timeouts:\n  conect: 1s\n",
        [
            "f.yaml:10:3: timeouts.conect: unknown key 'conect' "
            "(allowed: connect, response, idle, client_keepalive)"
        ],
    ),
    (
        "limits",
        ROUTE,
        "limits: {max_request_body: 1MB, max_headers: 0, max_header_size: 0x10, "
        "max_connections: 1_000}\n",
        [
            "f.yaml:9:28: limits.max_request_body: bad size '1MB' "
            "(use bytes or e.g. 512KiB, 1MiB, 1GiB)",
            "f.yaml:9:46: limits.max_headers: must be from 1 to 10000",
            "f.yaml:9:66: limits.max_header_size: bad size '0x10' "
            "(use bytes or e.g. 512KiB, 1MiB, 1GiB)",
            "f.yaml:9:89: limits.max_connections: expected an integer, got '1_000'",
        ],
    ),
    (
        "limit-leading-zero",
        ROUTE,
        "limits: {max_request_body: 010}\n",
        [
            "f.yaml:9:28: limits.max_request_body: leading zeros are ambiguous in '010' "
            "(YAML 1.1 octal)"
        ],
    ),
    (
        "limit-size-zero",
        ROUTE,
        "limits: {max_header_size: 0KiB}\n",
        ["f.yaml:9:27: limits.max_header_size: must be from 1 to 1MiB"],
    ),
    (
        "drain",
        ROUTE,
        "drain: {delay: 0, reload: 1.5s, shutdown: yes}\n",
        ["f.yaml:9:43: drain.shutdown: bad duration 'yes' (use e.g. 250ms, 2s, 1m, 1h)"],
    ),
    (
        "route-name",
        "  - name: Api\n    split: {blue: 1}\n",
        "",
        [
            "f.yaml:7:11: routes[0].name: bad route name 'Api' (use lower-case letters, "
            "digits, '_' and '-', starting with a letter or digit)"
        ],
    ),
    (
        "duplicate-route",
        "  - name: api\n    match: {path_prefix: /a}\n    split: {blue: 1}\n" + ROUTE,
        "",
        ["f.yaml:10:11: routes[1].name: duplicate route name 'api' (first at line 7)"],
    ),
    (
        "missing-name",
        "  - split: {blue: 1}\n",
        "",
        ["f.yaml:7:5: routes[0]: missing required key 'name'"],
    ),
    (
        "missing-split",
        "  - name: api\n",
        "",
        ["f.yaml:7:5: routes[0]: missing required key 'split'"],
    ),
    (
        "route-unknown-key",
        ROUTE + "    retry: 1\n",
        "",
        [
            "f.yaml:9:5: routes[0].retry: unknown key 'retry' (allowed: name, match, "
            "overrides, split, sticky, mirror, retries, rollout)"
        ],
    ),
    (
        "route-duplicate-key",
        ROUTE + "    split: {green: 1}\n",
        "",
        ["f.yaml:9:5: routes[0].split: duplicate key 'split' (first at line 8)"],
    ),
    (
        "split-unknown-upstream",
        "  - name: api\n    split: {blue: 90, canray: 10}\n",
        "",
        [f"f.yaml:8:23: routes[0].split.canray: unknown upstream 'canray' {KNOWN}"],
    ),
    (
        "split-all-zero",
        "  - name: api\n    split: {blue: 0, green: 0}\n",
        "",
        ["f.yaml:8:12: routes[0].split: weights are all 0; at least one must be > 0"],
    ),
    (
        "split-bad-weights",
        "  - name: api\n    split: {blue: -1, green: true, canary: '5', shadow: 010}\n",
        "",
        [
            "f.yaml:8:19: routes[0].split.blue: must be from 0 to 1000000",
            "f.yaml:8:30: routes[0].split.green: expected a number, got a boolean 'true'",
            "f.yaml:8:44: routes[0].split.canary: expected a number, got a string '5'",
            "f.yaml:8:57: routes[0].split.shadow: leading zeros are ambiguous in '010' "
            "(YAML 1.1 octal)",
        ],
    ),
    (
        "split-empty",
        "  - name: api\n    split: {}\n",
        "",
        ["f.yaml:8:12: routes[0].split: at least one upstream with a weight is required"],
    ),
    (
        "split-list",
        "  - name: api\n    split: [blue]\n",
        "",
        ["f.yaml:8:12: routes[0].split: expected a mapping, got a list"],
    ),
    (
        "split-duplicate-upstream",
        "  - name: api\n    split: {blue: 1, blue: 2}\n",
        "",
        ["f.yaml:8:22: routes[0].split.blue: duplicate key 'blue' (first at line 8)"],
    ),
    (
        "match-host-port-and-prefix",
        ROUTE + "    match: {host: 'API.Example.com:80', path_prefix: api}\n",
        "",
        [
            "f.yaml:9:19: routes[0].match.host: bad host 'API.Example.com:80': a port is not "
            "allowed (the Host header's port is ignored)",
            "f.yaml:9:54: routes[0].match.path_prefix: must start with '/', got 'api'",
        ],
    ),
    (
        "match-host-inner-wildcard",
        ROUTE + "    match: {host: 'a.*.com'}\n",
        "",
        [
            "f.yaml:9:19: routes[0].match.host: bad host 'a.*.com': the only wildcard is a "
            "leading '*.', e.g. *.example.com"
        ],
    ),
    (
        "match-host-star",
        ROUTE + "    match: {host: '*'}\n",
        "",
        [
            "f.yaml:9:19: routes[0].match.host: bad host '*': the only wildcard is a "
            "leading '*.', e.g. *.example.com"
        ],
    ),
    (
        "match-prefix-query",
        ROUTE + "    match: {path_prefix: '/a?b'}\n",
        "",
        [
            "f.yaml:9:26: routes[0].match.path_prefix: bad path '/a?b' "
            "(no query, fragment, spaces or control characters)"
        ],
    ),
    (
        "overrides",
        ROUTE
        + "    overrides:\n"
        + "      - {header: x-a, cookie: b, to: canary}\n"
        + "      - {value: x, to: canray}\n"
        + "      - {header: 'bad name', to: blue}\n"
        + "      - {header: x-b}\n",
        "",
        [
            "f.yaml:10:9: routes[0].overrides[0]: give exactly one of 'header' or 'cookie', "
            "not both",
            "f.yaml:11:9: routes[0].overrides[1]: missing 'header' or 'cookie' (give exactly one)",
            f"f.yaml:11:24: routes[0].overrides[1].to: unknown upstream 'canray' {KNOWN}",
            "f.yaml:12:18: routes[0].overrides[2].header: bad name 'bad name' "
            "(letters, digits and !#$%&'*+-.^_`|~ only)",
            "f.yaml:13:9: routes[0].overrides[3]: missing required key 'to'",
        ],
    ),
    (
        "overrides-not-list",
        ROUTE + "    overrides: {header: x, to: blue}\n",
        "",
        ["f.yaml:9:16: routes[0].overrides: expected a list, got a mapping"],
    ),
    (
        "override-value-null",
        ROUTE + "    overrides: [{header: x, value: ~, to: blue}]\n",
        "",
        ["f.yaml:9:36: routes[0].overrides[0].value: expected a string, got null"],
    ),
    (
        "sticky-set-with-header",
        ROUTE + "    sticky: {header: x-user, set: true}\n",
        "",
        ["f.yaml:9:30: routes[0].sticky.set: 'set' is only allowed with 'cookie'"],
    ),
    (
        "sticky-empty",
        ROUTE + "    sticky: {}\n",
        "",
        ["f.yaml:9:13: routes[0].sticky: missing 'header' or 'cookie' (give exactly one)"],
    ),
    (
        "sticky-both",
        ROUTE + "    sticky: {header: a, cookie: b}\n",
        "",
        ["f.yaml:9:13: routes[0].sticky: give exactly one of 'header' or 'cookie', not both"],
    ),
    (
        "sticky-set-yes",
        ROUTE + "    sticky: {cookie: s, set: yes}\n",
        "",
        ["f.yaml:9:30: routes[0].sticky.set: 'yes' is ambiguous in YAML; write true or false"],
    ),
    (
        "sticky-set-quoted",
        ROUTE + "    sticky: {cookie: s, set: 'true'}\n",
        "",
        ["f.yaml:9:30: routes[0].sticky.set: expected true or false, got a string 'true'"],
    ),
    (
        "mirror",
        ROUTE
        + "    mirror: {percent: 101, methods: [get, POST, POST], max_in_flight: 0, "
        + "compare_json: on, ignore_fields: ['a..b']}\n",
        "",
        [
            "f.yaml:9:13: routes[0].mirror: missing required key 'to'",
            "f.yaml:9:23: routes[0].mirror.percent: must be from 0 to 100",
            "f.yaml:9:38: routes[0].mirror.methods[0]: unknown method 'get' (use upper case: "
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE, CONNECT)",
            "f.yaml:9:49: routes[0].mirror.methods[2]: duplicate method 'POST'",
            "f.yaml:9:71: routes[0].mirror.max_in_flight: must be from 1 to 10000",
            "f.yaml:9:88: routes[0].mirror.compare_json: 'on' is ambiguous in YAML; "
            "write true or false",
            "f.yaml:9:108: routes[0].mirror.ignore_fields[0]: bad JSON path 'a..b' "
            "(dotted keys, e.g. meta.request_id)",
        ],
    ),
    (
        "mirror-unknown-to-and-sizes",
        ROUTE + "    mirror: {to: shadw, max_body: 1.5MiB, timeout: 0s, percent: -0.5}\n",
        "",
        [
            f"f.yaml:9:18: routes[0].mirror.to: unknown upstream 'shadw' {KNOWN}",
            "f.yaml:9:35: routes[0].mirror.max_body: bad size '1.5MiB' "
            "(use bytes or e.g. 512KiB, 1MiB, 1GiB)",
            "f.yaml:9:52: routes[0].mirror.timeout: must be > 0",
            "f.yaml:9:65: routes[0].mirror.percent: must be from 0 to 100",
        ],
    ),
    (
        "mirror-empty-methods",
        ROUTE + "    mirror: {to: shadow, methods: []}\n",
        "",
        [
            "f.yaml:9:35: routes[0].mirror.methods: must not be empty "
            "(leave 'methods' out to mirror every method)"
        ],
    ),
    (
        "retries-range",
        ROUTE + "    retries: 11\n",
        "",
        ["f.yaml:9:14: routes[0].retries: must be from 0 to 10"],
    ),
    (
        "retries-hex",
        ROUTE + "    retries: 0x2\n",
        "",
        ["f.yaml:9:14: routes[0].retries: expected an integer, got '0x2'"],
    ),
    (
        "retries-float",
        ROUTE + "    retries: 2.0\n",
        "",
        ["f.yaml:9:14: routes[0].retries: expected an integer, got a number '2.0'"],
    ),
    (
        "retries-bool",
        ROUTE + "    retries: false\n",
        "",
        ["f.yaml:9:14: routes[0].retries: expected an integer, got a boolean 'false'"],
    ),
    (
        "rollout",
        ROUTE
        + "    rollout: {baseline: blue, canary: blue, steps: [5, 1, 0, 101], interval: 0s, "
        + "min_requests: 0, max_error_rate: 2, max_p99: 0}\n",
        "",
        [
            "f.yaml:9:39: routes[0].rollout.canary: must differ from baseline",
            "f.yaml:9:56: routes[0].rollout.steps[1]: steps must increase: 1 is not above 5",
            "f.yaml:9:59: routes[0].rollout.steps[2]: must be > 0 and <= 100",
            "f.yaml:9:62: routes[0].rollout.steps[3]: must be > 0 and <= 100",
            "f.yaml:9:78: routes[0].rollout.interval: must be > 0",
            "f.yaml:9:96: routes[0].rollout.min_requests: must be from 1 to 1000000000",
            "f.yaml:9:115: routes[0].rollout.max_error_rate: must be from 0 to 1",
            "f.yaml:9:127: routes[0].rollout.max_p99: must be > 0",
        ],
    ),
    (
        "rollout-missing",
        ROUTE + "    rollout: {steps: [], baseline: bleu}\n",
        "",
        [
            "f.yaml:9:14: routes[0].rollout: missing required key 'canary'",
            "f.yaml:9:22: routes[0].rollout.steps: at least one step is required",
            f"f.yaml:9:36: routes[0].rollout.baseline: unknown upstream 'bleu' {KNOWN}",
        ],
    ),
    (
        "rollout-check-confidence",
        ROLLOUT + "      interval: 2s\n      check: 3s\n      confidence: 1\n",
        "",
        [
            "f.yaml:13:14: routes[0].rollout.check: must be at most interval (2s): the "
            "evidence is looked at least once per interval",
            "f.yaml:14:19: routes[0].rollout.confidence: must be > 0.5 and < 1 (e.g. 0.99)",
        ],
    ),
    (
        "rollout-confidence-low",
        ROLLOUT + "      confidence: 0.5\n",
        "",
        ["f.yaml:12:19: routes[0].rollout.confidence: must be > 0.5 and < 1 (e.g. 0.99)"],
    ),
    (
        "rollout-confidence-string",
        ROLLOUT + "      confidence: '0.9'\n",
        "",
        ["f.yaml:12:19: routes[0].rollout.confidence: expected a number, got a string '0.9'"],
    ),
    (
        "rollout-webhooks-mapping",
        ROLLOUT + "      webhooks: {on: rollback}\n",
        "",
        ["f.yaml:12:17: routes[0].rollout.webhooks: expected a list, got a mapping"],
    ),
    (
        "rollout-webhooks",
        ROLLOUT
        + "      webhooks:\n"
        + "        - rollback\n"
        + "        - {on: rollbak, url: 'ftp://x/y', timeout: 0s, retries: 3}\n"
        + "        - {url: 'http:///nohost'}\n"
        + "        - {on: succeeded, url: 'http://u:p@h/x'}\n"
        + "        - {on: after_step, url: 'http://h:99999/x'}\n"
        + "        - {on: after_step, url: 'http://h/x#frag'}\n"
        + "        - {on: after_step, url: 'h/x'}\n"
        + "        - {on: after_step, url: 'http://[::1/x'}\n"
        + "        - {on: before_step, url: 'http://[::1]:8080/ok', timeout: 25h}\n",
        "",
        [
            "f.yaml:13:11: routes[0].rollout.webhooks[0]: expected a mapping, got a string "
            "'rollback'",
            "f.yaml:14:16: routes[0].rollout.webhooks[1].on: unknown event 'rollbak' (use "
            "before_step, after_step, rollback, succeeded)",
            f"f.yaml:14:30: routes[0].rollout.webhooks[1].url: bad URL 'ftp://x/y': the scheme "
            f"must be http or https ({URL_HINT})",
            "f.yaml:14:52: routes[0].rollout.webhooks[1].timeout: must be > 0",
            "f.yaml:14:56: routes[0].rollout.webhooks[1].retries: unknown key 'retries' "
            "(allowed: on, url, timeout)",
            "f.yaml:15:11: routes[0].rollout.webhooks[2]: missing required key 'on'",
            f"f.yaml:15:17: routes[0].rollout.webhooks[2].url: bad URL 'http:///nohost': no "
            f"host ({URL_HINT})",
            "f.yaml:16:32: routes[0].rollout.webhooks[3].url: bad URL 'http://u:p@h/x': "
            "user:password@ is not supported",
            "f.yaml:17:33: routes[0].rollout.webhooks[4].url: bad URL 'http://h:99999/x': the "
            "port must be from 1 to 65535",
            f"f.yaml:18:33: routes[0].rollout.webhooks[5].url: bad URL 'http://h/x#frag': no "
            f"fragment ({URL_HINT})",
            f"f.yaml:19:33: routes[0].rollout.webhooks[6].url: bad URL 'h/x': the scheme must "
            f"be http or https ({URL_HINT})",
            f"f.yaml:20:33: routes[0].rollout.webhooks[7].url: bad URL 'http://[::1/x' "
            f"({URL_HINT})",
            "f.yaml:21:67: routes[0].rollout.webhooks[8].timeout: must be at most 24h",
        ],
    ),
    (
        "annotations-not-a-mapping",
        ROUTE,
        "annotations: https://grafana.example/\n",
        ["f.yaml:9:14: annotations: expected a mapping, got a string 'https://grafana.example/'"],
    ),
    (
        "annotations-keys",
        ROUTE,
        "annotations: {timeout: 0s, token: x}\n",
        [
            "f.yaml:9:14: annotations: missing required key 'grafana'",
            "f.yaml:9:24: annotations.timeout: must be > 0",
            "f.yaml:9:28: annotations.token: unknown key 'token' (allowed: grafana, timeout)",
        ],
    ),
    (
        "annotations-grafana-scheme",
        ROUTE,
        "annotations: {grafana: 'grafana.example:3000', timeout: 25h}\n",
        [
            "f.yaml:9:24: annotations.grafana: bad URL 'grafana.example:3000': the scheme must "
            "be http or https (expected Grafana's base URL, e.g. https://grafana.example.com/)",
            "f.yaml:9:57: annotations.timeout: must be at most 24h",
        ],
    ),
    (
        "annotations-grafana-query",
        ROUTE,
        "annotations: {grafana: 'https://g.example/?orgId=1'}\n",
        [
            "f.yaml:9:24: annotations.grafana: bad URL 'https://g.example/?orgId=1': no query "
            "(expected Grafana's base URL, e.g. https://grafana.example.com/)"
        ],
    ),
    (
        "annotations-grafana-full-api-path",
        ROUTE,
        "annotations: {grafana: 'https://g.example/api/annotations/'}\n",
        [
            "f.yaml:9:24: annotations.grafana: bad URL 'https://g.example/api/annotations/': "
            "give Grafana's base URL, without /api/annotations (Turnout adds it)"
        ],
    ),
    (
        "annotations-grafana-credentials",
        ROUTE,
        "annotations: {grafana: 'https://admin:admin@g.example/'}\n",
        [
            "f.yaml:9:24: annotations.grafana: bad URL 'https://admin:admin@g.example/': "
            "user:password@ is not supported"
        ],
    ),
    (
        "rollout-webhooks-too-many",
        ROLLOUT
        + "      webhooks: ["
        + ", ".join(["{on: rollback, url: 'http://h/'}"] * 21)
        + "]\n",
        "",
        ["f.yaml:12:17: routes[0].rollout.webhooks: at most 20 webhooks (this list has 21)"],
    ),
]


@pytest.mark.parametrize(
    ("route", "top", "expected"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_cases(route: str, top: str, expected: list[str]) -> None:
    assert errors_of(minimal(route, top)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "routes: [{name: r, split: {blue: 1}}]\n",
            ["f.yaml:1:1: missing required key 'upstreams'"],
        ),
        (
            "upstreams: {}\nroutes: {}\n",
            [
                "f.yaml:1:12: upstreams: at least one upstream is required",
                "f.yaml:2:9: routes: expected a list, got a mapping",
            ],
        ),
        (
            "upstreams: {blue: {endpoints: ['h:1']}}\nroutes: []\n",
            ["f.yaml:2:9: routes: at least one route is required"],
        ),
        (
            "upstreams:\n"
            "  Blue: {endpoints: []}\n"
            "  red: {endpoints: [a:1, a:1, 'x'], health: {path: ready, interval: 0s,\n"
            "        unhealthy_after: 0, bogus: 1}}\n"
            "  pink: {}\n"
            "  grey: [1]\n"
            "  teal: {endpoints: []}\n"
            "routes: [{name: r, split: {blue: 1}}]\n",
            [
                "f.yaml:2:3: upstreams.Blue: bad upstream name 'Blue' (use lower-case letters, "
                "digits, '_' and '-', starting with a letter or digit)",
                "f.yaml:3:26: upstreams.red.endpoints[1]: duplicate endpoint 'a:1'",
                "f.yaml:3:31: upstreams.red.endpoints[2]: bad address 'x': "
                "expected host:port, e.g. 127.0.0.1:8080",
                "f.yaml:3:52: upstreams.red.health.path: must start with '/', got 'ready'",
                "f.yaml:3:69: upstreams.red.health.interval: must be > 0",
                "f.yaml:4:26: upstreams.red.health.unhealthy_after: must be from 1 to 1000",
                "f.yaml:4:29: upstreams.red.health.bogus: unknown key 'bogus' "
                "(allowed: path, interval, timeout, unhealthy_after, healthy_after)",
                "f.yaml:5:9: upstreams.pink: missing required key 'endpoints'",
                "f.yaml:6:9: upstreams.grey: expected a mapping, got a list",
                "f.yaml:7:21: upstreams.teal.endpoints: at least one endpoint is required",
                "f.yaml:8:28: routes[0].split.blue: unknown upstream 'blue' "
                "(known: grey, pink, red, teal)",
            ],
        ),
    ],
    ids=["missing-upstreams", "empty-sections", "no-routes", "upstream-errors"],
)
def test_section_errors(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_every_error_in_a_file_is_reported_in_file_order() -> None:
    text = (
        "listen: nowhere\n"  # 1
        "workers: -2\n"  # 2
        "upstreams:\n"  # 3
        "  blue: {endpoints: [127.0.0.1:9001]}\n"  # 4
        "  canary: {endpoints: [127.0.0.1:99999]}\n"  # 5
        "routes:\n"  # 6
        "  - name: api\n"  # 7
        "    split: {blue: 90, canray: 10}\n"  # 8
        "    sticky: {cookie: s, set: no}\n"  # 9
        "  - name: api\n"  # 10
        "    split: {blue: 0}\n"  # 11
        "timeouts: {connect: 2x}\n"  # 12
    )
    issues = errors_of(text, "routes.yaml")
    assert issues == [
        "routes.yaml:1:9: listen: bad address 'nowhere': expected host:port, e.g. 127.0.0.1:8080",
        "routes.yaml:2:10: workers: must be from 1 to 1024",
        "routes.yaml:5:24: upstreams.canary.endpoints[0]: bad address '127.0.0.1:99999': "
        "the port must be a number from 1 to 65535",
        "routes.yaml:8:23: routes[0].split.canray: unknown upstream 'canray' (known: blue, canary)",
        "routes.yaml:9:30: routes[0].sticky.set: 'no' is ambiguous in YAML; write true or false",
        "routes.yaml:10:5: routes[1]: unreachable: route 'api' (line 7) comes first and matches "
        "every request this route matches; put this route before it, or narrow that one",
        "routes.yaml:10:11: routes[1].name: duplicate route name 'api' (first at line 7)",
        "routes.yaml:11:12: routes[1].split: weights are all 0; at least one must be > 0",
        "routes.yaml:12:21: timeouts.connect: bad duration '2x' (use e.g. 250ms, 2s, 1m, 1h)",
    ]


def test_issue_fields_and_formatting() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal("  - name: api\n    split: {blue: 90, canray: 10}\n"), "routes.yaml")
    (issue,) = caught.value.issues
    assert issue == ConfigIssue(
        file="routes.yaml",
        line=8,
        col=23,
        path="routes[0].split.canray",
        message=f"unknown upstream 'canray' {KNOWN}",
    )
    assert (
        str(ConfigIssue("a.yaml", 1, 1, "", "the file is empty")) == "a.yaml:1:1: the file is empty"
    )


# --- durations, sizes, sha, summary, dump -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "1d", "s", "1.s", ".5s", "1e3s", "-1s", "1 s", "1S"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\(use e\.g\. 250ms, 2s, 1m, 1h\)"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.25, "250ms"), (2.0, "2s"), (60.0, "1m"), (90.0, "90s"), (7200.0, "2h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("100", 100),
        ("512B", 512),
        ("512KiB", 512 * 1024),
        ("1MiB", 2**20),
        ("1GiB", 2**30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1MB", "1kib", "1.5MiB", "-1", "KiB", "1 MiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


@given(st.floats(min_value=0.0, max_value=1e9, allow_nan=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_duration_text_round_trip(count: int, unit: str) -> None:
    seconds = parse_duration(f"{count}{unit}")
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_prefers_whole_units() -> None:
    assert [format_size(n) for n in (0, 1, 1024, 1536, 2**20, 3 * 2**30)] == [
        "0",
        "1",
        "1KiB",
        "1536",
        "1MiB",
        "3GiB",
    ]


def test_config_sha256_is_of_the_utf8_text() -> None:
    assert config_sha256("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert config_sha256("a: é\n") != config_sha256("a: e\n")


def test_summary() -> None:
    spec = parse_config(CONTRACT_EXAMPLE, "routes.yaml")
    assert summary(spec, "routes.yaml") == (
        "routes.yaml: OK — 4 upstreams, 1 route, listen 0.0.0.0:8080, "
        "admin 127.0.0.1:9901, workers 1"
    )
    ipv6 = parse_config(
        minimal(top="listen: '[::1]:80'\nworkers: auto\n").replace(
            "  green: {endpoints: [127.0.0.1:9101]}\n"
            "  canary: {endpoints: [127.0.0.1:9201]}\n"
            "  shadow: {endpoints: [127.0.0.1:9301]}\n",
            "",
        ),
        "x.yaml",
    )
    assert summary(ipv6, "x.yaml") == (
        "x.yaml: OK — 1 upstream, 1 route, listen [::1]:80, admin 127.0.0.1:9901, workers auto"
    )


@pytest.mark.parametrize(
    ("written", "annotations"),
    [
        ("{grafana: 'https://grafana.example/'}", Annotations("https://grafana.example/", 5.0)),
        (
            "{grafana: 'http://[::1]:3000/grafana', timeout: 250ms}",
            Annotations("http://[::1]:3000/grafana", 0.25),
        ),
    ],
)
def test_annotations_are_read_and_dumped(written: str, annotations: Annotations) -> None:
    spec = parse_config(minimal(top=f"annotations: {written}\n"), "/etc/turnout/t.yaml")
    assert spec.annotations == annotations
    dumped = spec_to_dict(spec)
    assert dumped["annotations"] == {
        "grafana": annotations.grafana,
        "timeout": format_duration(annotations.timeout),
    }
    assert parse_config(yaml.safe_dump(dumped, sort_keys=False), "/etc/turnout/t.yaml") == spec
    assert "annotations" not in spec_to_dict(parse_config(minimal(), "/etc/turnout/t.yaml"))


def test_spec_to_dict_of_the_contract_example() -> None:
    spec = parse_config(CONTRACT_EXAMPLE, "/etc/turnout/routes.yaml")
    out = spec_to_dict(spec)
    assert orjson.loads(orjson.dumps(out)) == out
    assert out["listen"] == "0.0.0.0:8080"
    assert out["workers"] == 1
    assert out["timeouts"] == {
        "connect": "2s",
        "response": "30s",
        "idle": "1m",
        "client_keepalive": "75s",
    }
    assert out["limits"] == {
        "max_request_body": 67108864,
        "max_connections": 10000,
        "max_header_size": 65536,
        "max_headers": 100,
        "max_concurrent_streams": 100,
    }
    routes = out["routes"]
    assert isinstance(routes, list)
    assert routes[0]["split"] == {"blue": 90, "canary": 10}
    assert routes[0]["rollout"]["max_p99"] == "500ms"
    assert routes[0]["mirror"]["methods"] == [
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "OPTIONS",
    ]
    upstreams = out["upstreams"]
    assert isinstance(upstreams, dict)
    assert upstreams["green"] == {"endpoints": ["127.0.0.1:9101"], "protocol": "http1"}
    dumped = yaml.safe_dump(out, sort_keys=False)
    assert parse_config(dumped, "/etc/turnout/routes.yaml") == spec


# --- property: generated valid configs round-trip ---------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True)
tokens = st.text(alphabet=string.ascii_letters + string.digits + "-_.!#$%&'*+^`|~", min_size=1)
values = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")) | st.just("\t"), max_size=12
)
positive_durations = st.floats(min_value=0.0, max_value=86400.0, exclude_min=True)
durations = st.floats(min_value=0.0, max_value=86400.0)
weights = st.integers(min_value=0, max_value=4000).map(lambda n: n / 4)
percents = st.integers(min_value=0, max_value=400).map(lambda n: n / 4)
hosts = st.sampled_from(["127.0.0.1", "10.0.0.7", "localhost", "::1", "fe80::1", "svc.internal"])
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)


@st.composite
def addresses(draw: st.DrawFn) -> tuple[str, int]:
    return draw(hosts), draw(st.integers(min_value=1, max_value=65535))


@st.composite
def health_checks(draw: st.DrawFn) -> HealthCheck:
    segments = draw(st.lists(labels, max_size=3))
    return HealthCheck(
        path="/" + "/".join(segments),
        interval=draw(positive_durations),
        timeout=draw(positive_durations),
        unhealthy_after=draw(st.integers(min_value=1, max_value=100)),
        healthy_after=draw(st.integers(min_value=1, max_value=100)),
    )


@st.composite
def upstream_specs(draw: st.DrawFn, name: str) -> UpstreamSpec:
    endpoints = draw(st.lists(addresses(), min_size=1, max_size=3, unique=True))
    return UpstreamSpec(
        name=name,
        endpoints=tuple(Endpoint(host, port) for host, port in endpoints),
        health=draw(st.none() | health_checks()),
    )


@st.composite
def overrides(draw: st.DrawFn, known: list[str]) -> Override:
    by_header = draw(st.booleans())
    name = draw(tokens)
    return Override(
        to=draw(st.sampled_from(known)),
        header=name.lower() if by_header else None,
        cookie=None if by_header else name,
        value=draw(st.none() | values),
    )


@st.composite
def stickies(draw: st.DrawFn) -> Sticky:
    name = draw(tokens)
    if draw(st.booleans()):
        return Sticky(header=name.lower())
    return Sticky(cookie=name, set=draw(st.booleans()))


@st.composite
def mirrors(draw: st.DrawFn, known: list[str]) -> Mirror:
    methods = draw(st.none() | st.frozensets(st.sampled_from(ALL_METHODS), min_size=1))
    fields = st.lists(labels, min_size=1, max_size=3).map(".".join)
    return Mirror(
        to=draw(st.sampled_from(known)),
        percent=draw(percents),
        max_body=draw(st.integers(min_value=0, max_value=2**30)),
        methods=methods,
        max_in_flight=draw(st.integers(min_value=1, max_value=10_000)),
        timeout=draw(positive_durations),
        compare_json=draw(st.booleans()),
        compare_json_ignore=tuple(draw(st.lists(fields, max_size=3))),
    )


@st.composite
def webhooks(draw: st.DrawFn) -> Webhook:
    host = draw(st.sampled_from(["127.0.0.1", "[::1]", "hooks.internal"]))
    port = draw(st.none() | st.integers(min_value=1, max_value=65535))
    path = "/".join(draw(st.lists(labels, max_size=3)))
    return Webhook(
        on=draw(st.sampled_from(WEBHOOK_EVENTS)),
        url=f"{draw(st.sampled_from(['http', 'https']))}://{host}"
        + ("" if port is None else f":{port}")
        + f"/{path}",
        timeout=draw(positive_durations),
    )


@st.composite
def annotation_settings(draw: st.DrawFn) -> Annotations:
    host = draw(st.sampled_from(["127.0.0.1", "[::1]", "grafana.monitoring"]))
    port = draw(st.none() | st.integers(min_value=1, max_value=65535))
    path = "/".join(draw(st.lists(labels, max_size=2)))
    return Annotations(
        grafana=f"{draw(st.sampled_from(['http', 'https']))}://{host}"
        + ("" if port is None else f":{port}")
        + f"/{path}",
        timeout=draw(positive_durations),
    )


@st.composite
def rollouts(draw: st.DrawFn, known: list[str]) -> Rollout:
    baseline, canary = draw(st.permutations(known))[:2]
    steps = sorted(draw(st.sets(st.integers(min_value=1, max_value=400), min_size=1)))
    interval = draw(positive_durations)
    return Rollout(
        baseline=baseline,
        canary=canary,
        steps=tuple(step / 4 for step in steps),
        interval=interval,
        min_requests=draw(st.integers(min_value=1, max_value=10**6)),
        max_error_rate=draw(st.integers(min_value=0, max_value=1000)) / 1000,
        max_p99=draw(positive_durations),
        confidence=draw(st.integers(min_value=501, max_value=999)) / 1000,
        check=draw(st.floats(min_value=0.0, max_value=interval, exclude_min=True)),
        webhooks=tuple(draw(st.lists(webhooks(), max_size=3))),
    )


@st.composite
def route_specs(draw: st.DrawFn, name: str, known: list[str], last: bool = True) -> RouteSpec:
    """A route; one that is not `last` gets a first path segment of its own (`/_name`, which
    `labels` never makes), so that no earlier route makes a later one unreachable."""
    split_names = draw(st.lists(st.sampled_from(known), min_size=1, unique=True))
    split = [(upstream, draw(weights)) for upstream in split_names]
    if all(weight == 0 for _, weight in split):
        split[0] = (split[0][0], 1.0)
    host = draw(st.none() | st.just("::1") | st.lists(labels, min_size=1, max_size=3).map(".".join))
    if host is not None and ":" not in host and draw(st.booleans()):
        host = "*." + host
    segments = draw(st.lists(labels, max_size=3))
    prefix = "/" + "/".join(segments if last else [f"_{name}", *segments])
    return RouteSpec(
        name=name,
        split=tuple(split),
        match=Match(host=host, path_prefix=prefix),
        overrides=tuple(draw(st.lists(overrides(known), max_size=3))),
        sticky=draw(st.none() | stickies()),
        mirror=draw(st.none() | mirrors(known)),
        retries=draw(st.integers(min_value=0, max_value=10)),
        rollout=draw(st.none() | rollouts(known)) if len(known) > 1 else None,
    )


@st.composite
def config_specs(draw: st.DrawFn) -> ConfigSpec:
    upstream_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    route_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    listen = draw(addresses())
    admin = draw(addresses().filter(lambda a: a[1] != listen[1]))
    state_file = draw(st.none() | labels.map(lambda name: f"/var/lib/turnout/{name}.json"))
    return ConfigSpec(
        upstreams=tuple(draw(upstream_specs(name)) for name in upstream_names),
        routes=tuple(
            draw(route_specs(name, upstream_names, last=index == len(route_names) - 1))
            for index, name in enumerate(route_names)
        ),
        listen=listen,
        admin=admin,
        workers=draw(st.integers(min_value=0, max_value=64)),
        state_file=state_file,
        timeouts=Timeouts(*(draw(positive_durations) for _ in range(4))),
        limits=Limits(
            max_request_body=draw(st.integers(min_value=1, max_value=2**40)),
            max_connections=draw(st.integers(min_value=1, max_value=10**6)),
            max_header_size=draw(st.integers(min_value=1, max_value=2**20)),
            max_headers=draw(st.integers(min_value=1, max_value=10**4)),
        ),
        drain=Drain(*(draw(durations) for _ in range(3))),
        annotations=draw(st.none() | annotation_settings()),
    )


@settings(max_examples=100, suppress_health_check=[HypothesisHealthCheck.too_slow])
@given(config_specs())
def test_generated_configs_round_trip_through_yaml(spec: ConfigSpec) -> None:
    text = yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
    assert parse_config(text, "/etc/turnout/routes.yaml") == spec


@settings(max_examples=40, suppress_health_check=[HypothesisHealthCheck.too_slow])
@given(config_specs())
def test_dump_of_a_parsed_file_parses_to_the_same_spec(spec: ConfigSpec) -> None:
    first = parse_config(yaml.safe_dump(spec_to_dict(spec)), "/etc/turnout/routes.yaml")
    again = parse_config(
        yaml.safe_dump(spec_to_dict(first), sort_keys=False, default_flow_style=True),
        "/etc/turnout/routes.yaml",
    )
    assert again == first


def outcome(text: str) -> ConfigSpec | list[ConfigIssue]:
    """The spec parse_config returns, or the issues it raises."""
    try:
        return parse_config(text, "/f.yaml")
    except ConfigError as exc:
        return exc.issues


@given(st.text(alphabet="ab:-[]{}&*!,'\"\n #0129.%|>"))
def test_arbitrary_text_gives_a_spec_or_located_issues(text: str) -> None:
    result = outcome(text)
    if isinstance(result, ConfigSpec):
        assert outcome(yaml.safe_dump(spec_to_dict(result), sort_keys=False)) == result
    else:
        assert result
        lines = text.count("\n") + 1
        assert all(1 <= issue.line <= lines and issue.col >= 1 for issue in result)
