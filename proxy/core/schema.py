"""The routing table's shape, written once: every section, key, value kind, bound and doc line.

From this one description follow:

- what `proxy.core.config` accepts: the allowed and required keys of each mapping, the bounds its
  messages quote, which key maps to which `proxy.core.spec` field (defaults are the dataclasses');
- `spec_to_dict`, the config in force as `/admin/config` shows it (key order, value format);
- `json_schema()`, a JSON Schema (draft 2020-12) for editors: `python -m proxy.core.schema` prints
  it; `docs/turnout.schema.json` is that output, and a test keeps the two equal.

How a value is read from YAML, with its position and a careful message, is `proxy.core.config`'s
job: it keeps one reader per `Kind` and takes keys and bounds from here. Pure core: no I/O
(the `__main__` block writes to stdout only when run as a script).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from enum import StrEnum
from functools import cached_property
from typing import Any, Generic, TypeVar

from proxy.core.spec import (
    ALL_METHODS,
    MAX_WEIGHT,
    TLS_VERSIONS,
    UPSTREAM_PROTOCOLS,
    WEBHOOK_EVENTS,
    Annotations,
    CertificateFiles,
    ConfigSpec,
    Drain,
    Fleet,
    HealthCheck,
    Limits,
    Listener,
    ListenerTls,
    Match,
    Mirror,
    Override,
    Rollout,
    RouteSpec,
    Sticky,
    Timeouts,
    UpstreamSpec,
    UpstreamTls,
    Webhook,
)

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "SECTIONS",
    "TOP",
    "Key",
    "Kind",
    "Section",
    "format_duration",
    "format_size",
    "json_schema",
    "redact_redis_url",
    "spec_to_dict",
]

_T = TypeVar("_T")

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# --- value bounds that are properties of a value type (a name, a URL), not of one key --------

# A bound on every duration: far above any sensible timeout or step, and far below the values
# that overflow event-loop timers.
MAX_DURATION = 24 * 3600.0
MAX_NAME_CHARS = 63
MAX_TOKEN_CHARS = 256
MAX_HOST_CHARS = 253
MAX_LABEL_CHARS = 63
MAX_PATH_CHARS = 1024
MAX_URL_CHARS = 2048
MAX_INSTANCE_CHARS = 128
# Regular expressions shared by the reader (`proxy.core.config` compiles them) and the JSON Schema.
NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
TOKEN_PATTERN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
DURATION_PATTERN = r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)"
SIZE_PATTERN = r"([0-9]+)(B|KiB|MiB|GiB)"
JSON_PATH_PATTERN = r"[^.\s]+(?:\.[^.\s]+)*"

DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
SIZE_UNITS = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}


class Kind(StrEnum):
    """What a key's value is. `proxy.core.config` has one reader per kind, this module one JSON
    Schema fragment and one dump rule per kind; a test checks that none is missing."""

    DURATION = "duration"  # > 0
    DURATION0 = "duration >= 0"
    SIZE = "size"
    INT = "integer"
    NUMBER = "number"
    BOOL = "boolean"
    STRING = "string"  # any text, as written
    NAME = "name"  # a route name
    UPSTREAM = "upstream name"  # a reference to one of `upstreams`
    HEADER = "header name"
    COOKIE = "cookie name"
    HTTP_PATH = "path"
    PATH_PREFIX = "path prefix"
    HOST = "host pattern"
    SERVER_NAME = "host name"
    URL = "http(s) URL"
    GRAFANA_URL = "Grafana base URL"
    REDIS_URL = "Redis URL"
    FLEET_NAME = "fleet name"
    INSTANCE = "instance name"
    VIA = "Via pseudonym"
    FILE = "file path"
    STATE_FILE = "state file path"
    TLS_VERSION = "TLS version"
    WEBHOOK_EVENT = "webhook event"
    PROTOCOL = "upstream protocol"
    ADDRESS = "address"
    WORKERS = "workers"
    LISTEN = "listen"  # an address, or a list of listeners
    UPSTREAMS = "upstreams"  # name -> upstream
    ROUTES = "routes"
    ENDPOINTS = "endpoints"
    SPLIT = "split"
    STEPS = "steps"
    METHODS = "methods"
    JSON_PATHS = "JSON paths"
    SECTION = "section"  # a mapping described by `Key.section`
    SECTIONS = "list of sections"  # a list of such mappings


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a section.

    `field` is the `proxy.core.spec` attribute it fills (the key's own name when empty). Bounds:
    `minimum`/`maximum` for numbers, sizes, durations (seconds) and counts of a mapping's
    entries; `max_items`/`min_items` for lists, whose elements `noun` names in messages.
    """

    name: str
    kind: Kind
    doc: str
    field: str = ""
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    min_items: int = 0
    max_items: int | None = None
    noun: str = ""
    # Message for an empty list when min_items is 1 (else "at least one <noun> is required").
    empty_message: str = ""
    section: Section[Any] | None = None
    # Left out of the dump when empty (else an empty list is shown).
    omit_empty: bool = False

    @property
    def attr(self) -> str:
        """The spec attribute this key fills or is dumped from."""
        return self.field or self.name


@dataclass(frozen=True, slots=True)
class Requires:
    """`key` may only be given with `needs`; `message` is the error at `key` otherwise."""

    key: str
    needs: str
    message: str = ""

    def text(self) -> str:
        return self.message or f"needs '{self.needs}' too"


@dataclass(frozen=True)
class Section(Generic[_T]):
    """A mapping of the file and the `proxy.core.spec` dataclass it becomes.

    `derived` names dataclass fields no key of the section fills by itself (an upstream's name
    is its key in `upstreams`; `listeners` comes from `listen`). `one_of`: exactly one of these
    keys; `requires`: pairs of keys that go together.
    """

    name: str
    spec: type[_T]
    doc: str
    keys: tuple[Key, ...]
    derived: tuple[str, ...] = ()
    one_of: tuple[str, ...] = ()
    requires: tuple[Requires, ...] = ()

    @cached_property
    def allowed(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)

    @cached_property
    def required(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys if key.required)

    @cached_property
    def dump_plan(self) -> tuple[tuple[str, str, _Dumper | None, bool, Key], ...]:
        """Per key: (name, spec attribute, dump function or None, omit when empty, key)."""
        return tuple(
            (key.name, key.attr, _DUMPERS.get(key.kind), key.omit_empty, key) for key in self.keys
        )

    @cached_property
    def field_names(self) -> frozenset[str]:
        """The dataclass's fields."""
        return frozenset(item.name for item in fields(self.spec))  # type: ignore[arg-type]

    def key(self, name: str) -> Key:
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(name)

    def default(self, attr: str) -> Any:
        """The dataclass's default for field `attr`; MISSING when it has none."""
        for item in fields(self.spec):  # type: ignore[arg-type]  # a dataclass by construction
            if item.name == attr:
                if item.default is not MISSING:
                    return item.default
                if item.default_factory is not MISSING:
                    return item.default_factory()
                return MISSING
        raise KeyError(attr)

    def build(self, values: Mapping[str, object], **extra: object) -> _T:
        """The dataclass from the values read (absent: the dataclass default). A required field
        left unread gets a placeholder: the spec is thrown away when any issue exists."""
        kwargs = dict(values)
        kwargs.update(extra)
        for key in self.keys:
            if key.required and key.attr not in kwargs and key.attr in self.field_names:
                kwargs[key.attr] = _placeholder(key.kind)
        make: Callable[..., _T] = self.spec
        return make(**kwargs)


def _placeholder(kind: Kind) -> object:
    if kind in (Kind.SPLIT, Kind.ENDPOINTS, Kind.SECTIONS, Kind.ROUTES, Kind.STEPS, Kind.UPSTREAMS):
        return ()
    return ""


# --- the description ---------------------------------------------------------------------------

TIMEOUTS = Section(
    "timeouts",
    Timeouts,
    "Timeouts of the data plane.",
    (
        Key("connect", Kind.DURATION, "TCP connect to an endpoint (then retried; in the end 504)."),
        Key("response", Kind.DURATION, "From the request sent until the response head (504)."),
        Key("idle", Kind.DURATION, "No byte moved either way while streaming a body or WebSocket."),
        Key("client_keepalive", Kind.DURATION, "An idle keep-alive client connection is closed."),
    ),
)

LIMITS = Section(
    "limits",
    Limits,
    "Per-request and per-worker limits.",
    (
        Key(
            "max_request_body",
            Kind.SIZE,
            "A larger request body gets 413.",
            minimum=1,
            maximum=1 << 40,
        ),
        Key(
            "max_connections",
            Kind.INT,
            "Client connections per worker.",
            minimum=1,
            maximum=1_000_000,
        ),
        Key(
            "max_header_size",
            Kind.SIZE,
            "The whole request head; larger gets 431.",
            minimum=1,
            maximum=1 << 20,
        ),
        Key("max_headers", Kind.INT, "Header lines; more gets 431.", minimum=1, maximum=10_000),
        Key(
            "max_concurrent_streams",
            Kind.INT,
            "Requests open at once on one HTTP/2 connection; more are refused (REFUSED_STREAM).",
            minimum=1,
            maximum=10_000,
        ),
    ),
)

DRAIN = Section(
    "drain",
    Drain,
    "Drain bounds for reload and shutdown.",
    (
        Key("reload", Kind.DURATION0, "How long connections to removed upstreams may finish."),
        Key("shutdown", Kind.DURATION0, "How long in-flight requests get after SIGTERM."),
        Key("delay", Kind.DURATION0, "After SIGTERM, keep serving this long with /readyz 503."),
    ),
)

ANNOTATIONS = Section(
    "annotations",
    Annotations,
    "Deployment annotations posted to Grafana.",
    (
        Key(
            "grafana",
            Kind.GRAFANA_URL,
            "Grafana's base URL (without /api/annotations).",
            required=True,
        ),
        Key("timeout", Kind.DURATION, "How long one attempt to post may take."),
    ),
)

FLEET = Section(
    "fleet",
    Fleet,
    "Fleet mode: instances with the same name share state in Redis.",
    (
        Key("name", Kind.FLEET_NAME, "The fleet.", required=True),
        Key(
            "redis",
            Kind.REDIS_URL,
            "redis://, rediss:// or redis+sentinel:// URL of the shared state.",
            required=True,
        ),
        Key("instance", Kind.INSTANCE, "This instance's name; ${VAR} is expanded at start."),
        Key("lease", Kind.DURATION, "The leader lease.", minimum=1.0, maximum=3600.0),
    ),
)

CERTIFICATE = Section(
    "certificate",
    CertificateFiles,
    "A PEM certificate chain and its key.",
    (
        Key("cert", Kind.FILE, "PEM certificate chain file.", required=True),
        Key("key", Kind.FILE, "PEM private key file.", required=True),
    ),
)

LISTENER_TLS = Section(
    "listener_tls",
    ListenerTls,
    "TLS termination on a listener.",
    (
        Key(
            "certificates",
            Kind.SECTIONS,
            "Certificates chosen by SNI; the first is the default.",
            required=True,
            section=CERTIFICATE,
            min_items=1,
            max_items=1000,
            noun="certificate",
        ),
        Key("min_version", Kind.TLS_VERSION, "Oldest TLS version accepted."),
        Key("client_ca", Kind.FILE, "Require client certificates issued by this CA (mTLS)."),
    ),
)

LISTENER = Section(
    "listener",
    Listener,
    "One data-plane listener.",
    (
        Key("address", Kind.ADDRESS, "Where to listen (host:port).", required=True),
        Key("tls", Kind.SECTION, "TLS termination; absent: plain HTTP.", section=LISTENER_TLS),
    ),
    derived=("host", "port"),
)

HEALTH = Section(
    "health",
    HealthCheck,
    "Active health check of every endpoint.",
    (
        Key("path", Kind.HTTP_PATH, "The path each check requests."),
        Key("interval", Kind.DURATION, "Time between checks of one endpoint."),
        Key("timeout", Kind.DURATION, "A check that takes longer fails."),
        Key(
            "unhealthy_after",
            Kind.INT,
            "Consecutive failures that mark an endpoint unhealthy.",
            minimum=1,
            maximum=1000,
        ),
        Key(
            "healthy_after",
            Kind.INT,
            "Consecutive successes that mark it healthy again.",
            minimum=1,
            maximum=1000,
        ),
    ),
)

UPSTREAM_TLS = Section(
    "upstream_tls",
    UpstreamTls,
    "TLS to the upstream's endpoints.",
    (
        Key("ca", Kind.FILE, "PEM CA file; absent: the system's trust store."),
        Key("server_name", Kind.SERVER_NAME, "SNI and checked name; absent: the endpoint's host."),
        Key("cert", Kind.FILE, "Client certificate (mTLS), with key."),
        Key("key", Kind.FILE, "Client certificate's key, with cert."),
        Key("verify", Kind.BOOL, "false skips checking the endpoint's certificate (tests only)."),
    ),
    requires=(Requires("cert", "key"), Requires("key", "cert")),
)

UPSTREAM = Section(
    "upstream",
    UpstreamSpec,
    "A named version of the service.",
    (
        Key(
            "endpoints",
            Kind.ENDPOINTS,
            "host:port addresses serving this upstream.",
            required=True,
            min_items=1,
            max_items=1000,
            noun="endpoint",
        ),
        Key("health", Kind.SECTION, "Active health checks; absent: none.", section=HEALTH),
        Key("tls", Kind.SECTION, "TLS to the endpoints; absent: plain TCP.", section=UPSTREAM_TLS),
        Key(
            "protocol",
            Kind.PROTOCOL,
            "http1, h2c (HTTP/2 over TCP, prior knowledge) or h2 (HTTP/2 over TLS by ALPN).",
        ),
    ),
    derived=("name",),
)

MATCH = Section(
    "match",
    Match,
    "Which requests the route takes.",
    (
        Key("host", Kind.HOST, "api.example.com or *.example.com; absent: any host."),
        Key("path_prefix", Kind.PATH_PREFIX, "Matches whole path segments."),
    ),
)

OVERRIDE = Section(
    "override",
    Override,
    "Pin matching requests to an upstream, skipping the split.",
    (
        Key("header", Kind.HEADER, "Header to look at (case-insensitive)."),
        Key("cookie", Kind.COOKIE, "Cookie to look at."),
        Key("value", Kind.STRING, "The exact value to match; absent: present at all."),
        Key("to", Kind.UPSTREAM, "Where matching requests go.", required=True),
    ),
    one_of=("header", "cookie"),
)

STICKY = Section(
    "sticky",
    Sticky,
    "Keep a client on one upstream.",
    (
        Key("header", Kind.HEADER, "The header whose value is the client's key."),
        Key("cookie", Kind.COOKIE, "The cookie whose value is the client's key."),
        Key("set", Kind.BOOL, "With cookie: mint and Set-Cookie one when missing."),
    ),
    one_of=("header", "cookie"),
    requires=(Requires("set", "cookie", "'set' is only allowed with 'cookie'"),),
)

MIRROR = Section(
    "mirror",
    Mirror,
    "Copy sampled requests to a shadow upstream.",
    (
        Key("to", Kind.UPSTREAM, "The shadow upstream.", required=True),
        Key("percent", Kind.NUMBER, "Share of requests copied.", minimum=0.0, maximum=100.0),
        Key(
            "max_body",
            Kind.SIZE,
            "Requests with a larger body are not copied.",
            minimum=0,
            maximum=1 << 30,
        ),
        Key(
            "methods",
            Kind.METHODS,
            "Only these methods are copied; absent: every method.",
            min_items=1,
            max_items=len(ALL_METHODS),
            noun="method",
            empty_message="must not be empty (leave 'methods' out to mirror every method)",
        ),
        Key(
            "max_in_flight",
            Kind.INT,
            "Copies in flight per route; beyond it a copy is dropped.",
            minimum=1,
            maximum=10_000,
        ),
        Key("timeout", Kind.DURATION, "A copy taking longer is abandoned."),
        Key("compare_json", Kind.BOOL, "Also compare JSON response bodies."),
        Key(
            "ignore_fields",
            Kind.JSON_PATHS,
            "Dotted JSON paths left out of the comparison.",
            field="compare_json_ignore",
            max_items=100,
            noun="field",
        ),
    ),
)

WEBHOOK = Section(
    "webhook",
    Webhook,
    "A rollout webhook.",
    (
        Key("on", Kind.WEBHOOK_EVENT, "When it is called.", required=True),
        Key("url", Kind.URL, "Where the JSON body is POSTed.", required=True),
        Key("timeout", Kind.DURATION, "How long one call may take."),
    ),
)

ROLLOUT = Section(
    "rollout",
    Rollout,
    "Automated canary analysis.",
    (
        Key("baseline", Kind.UPSTREAM, "The version the canary is judged against.", required=True),
        Key("canary", Kind.UPSTREAM, "The version being rolled out.", required=True),
        Key(
            "steps",
            Kind.STEPS,
            "The canary's share (%) at each step, strictly increasing.",
            minimum=0.0,
            maximum=100.0,
            exclusive_minimum=True,
            min_items=1,
            max_items=100,
            noun="step",
        ),
        Key("interval", Kind.DURATION, "The least time a step lasts before it may pass."),
        Key(
            "min_requests",
            Kind.INT,
            "The least canary requests a step needs to pass.",
            minimum=1,
            maximum=1_000_000_000,
        ),
        Key(
            "max_error_rate",
            Kind.NUMBER,
            "Absolute gate on the canary's error share.",
            minimum=0.0,
            maximum=1.0,
        ),
        Key("max_p99", Kind.DURATION, "Absolute gate on the canary's p99."),
        Key(
            "confidence",
            Kind.NUMBER,
            "1 - the chance of rolling back a canary no worse than its baseline.",
            minimum=0.5,
            maximum=1.0,
            exclusive_minimum=True,
            exclusive_maximum=True,
        ),
        Key(
            "check",
            Kind.DURATION,
            "How often the evidence is looked at; at most interval (default capped by it).",
        ),
        Key(
            "webhooks",
            Kind.SECTIONS,
            "Called before steps and on rollback or success.",
            section=WEBHOOK,
            max_items=20,
            noun="webhook",
        ),
    ),
)

ROUTE = Section(
    "route",
    RouteSpec,
    "One route: match, overrides, split and the optional features.",
    (
        Key("name", Kind.NAME, "Unique among routes.", required=True, noun="route"),
        Key("match", Kind.SECTION, "Which requests; absent: every request.", section=MATCH),
        Key(
            "overrides",
            Kind.SECTIONS,
            "Pins by header or cookie; the first that matches wins.",
            section=OVERRIDE,
            max_items=1000,
            noun="override",
            omit_empty=True,
        ),
        Key(
            "split",
            Kind.SPLIT,
            "Upstream -> weight (relative, not all 0), in order.",
            required=True,
            minimum=0.0,
            maximum=MAX_WEIGHT,
        ),
        Key("sticky", Kind.SECTION, "Keep a client on one upstream.", section=STICKY),
        Key("mirror", Kind.SECTION, "Shadow traffic.", section=MIRROR),
        Key(
            "retries",
            Kind.INT,
            "Extra attempts on another endpoint of the same upstream.",
            minimum=0,
            maximum=10,
        ),
        Key("rollout", Kind.SECTION, "Automated canary analysis.", section=ROLLOUT),
    ),
)

TOP = Section(
    "turnout",
    ConfigSpec,
    "Turnout routing table.",
    (
        Key(
            "listen",
            Kind.LISTEN,
            "The data plane's address (plain HTTP), or a list of listeners.",
            section=LISTENER,
            min_items=1,
            max_items=64,
            noun="listener",
        ),
        Key("admin", Kind.ADDRESS, "The admin plane's address; must differ from listen."),
        Key(
            "workers",
            Kind.WORKERS,
            "Processes sharing listen, or auto (one per CPU).",
            minimum=1,
            maximum=1024,
        ),
        Key("state_file", Kind.STATE_FILE, "Where runtime splits and rollouts persist."),
        Key("via", Kind.VIA, "This instance's pseudonym in Via; absent: unique per instance."),
        Key("timeouts", Kind.SECTION, TIMEOUTS.doc, section=TIMEOUTS),
        Key("limits", Kind.SECTION, LIMITS.doc, section=LIMITS),
        Key("drain", Kind.SECTION, DRAIN.doc, section=DRAIN),
        Key("annotations", Kind.SECTION, ANNOTATIONS.doc, section=ANNOTATIONS),
        Key("fleet", Kind.SECTION, FLEET.doc, section=FLEET),
        Key(
            "upstreams",
            Kind.UPSTREAMS,
            "Upstream name -> upstream: the versions.",
            required=True,
            section=UPSTREAM,
            min_items=1,
            max_items=100_000,
            noun="upstream",
        ),
        Key(
            "routes",
            Kind.ROUTES,
            "Tried in order; the first that matches wins.",
            required=True,
            section=ROUTE,
            min_items=1,
            max_items=100_000,
            noun="route",
        ),
    ),
    derived=("listeners",),
)

# Every section, outermost first.
SECTIONS: tuple[Section[Any], ...] = (
    TOP,
    TIMEOUTS,
    LIMITS,
    DRAIN,
    ANNOTATIONS,
    FLEET,
    LISTENER,
    LISTENER_TLS,
    CERTIFICATE,
    UPSTREAM,
    HEALTH,
    UPSTREAM_TLS,
    ROUTE,
    MATCH,
    OVERRIDE,
    STICKY,
    MIRROR,
    ROLLOUT,
    WEBHOOK,
)


# --- value formats -------------------------------------------------------------------------------


def duration_seconds(number: str, unit: str) -> float:
    """The seconds `<number><unit>` stands for (`unit` one of ms, s, m, h)."""
    # Division, not multiplication by 0.001, so that "250ms" is exactly 0.25.
    return float(number) / 1000.0 if unit == "ms" else float(number) * DURATION_UNITS[unit]


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest duration text in the largest whole unit; parses back exactly."""
    if seconds == 0:
        return "0s"
    candidates = [(seconds / factor, unit) for unit, factor in DURATION_UNITS.items()]
    candidates.append((seconds * 1000.0, "ms"))
    for count, unit in candidates:
        if count.is_integer() and count >= 1 and duration_seconds(str(int(count)), unit) == seconds:
            return f"{int(count)}{unit}"
    return f"{_positional(seconds)}s"


def _positional(value: float) -> str:
    """The shortest round-tripping decimal of a non-negative float, without an exponent."""
    text = repr(value)
    if "e" not in text:
        return text
    mantissa, _, exponent = text.partition("e")
    digits = mantissa.replace(".", "")
    point = (mantissa.index(".") if "." in mantissa else len(mantissa)) + int(exponent)
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return f"{digits[:point]}.{digits[point:]}"


def format_size(size: int) -> str:
    """Bytes -> `1MiB`-style text when the size is a whole number of a unit, else plain bytes."""
    for unit, factor in SIZE_UNITS.items():
        if factor > 1 and size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact_redis_url(text: str) -> str:
    """`text` with the password of its user part replaced by `***` (for dumps and logs)."""
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _number_out(value: float) -> float | int:
    """Whole numbers as ints, so that a dump reads `90` rather than `90.0`."""
    return int(value) if float(value).is_integer() else value


# --- the dump (`/admin/config`) ------------------------------------------------------------------


def spec_to_dict(spec: ConfigSpec) -> dict[str, object]:
    """The config in force as JSON-able data, in the file's own schema.

    Durations are strings (`2s`, `250ms`), sizes are ints, absent optional parts are left out,
    and `state_file` is the resolved path; dumped to YAML it parses back to an equal spec
    (given a config path in the same folder, or an absolute `state_file`). Keys come in the
    order of the description.
    """
    return _dump_section(TOP, spec)


def _dump_section(section: Section[Any], obj: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, attr, dump, omit_empty, key in section.dump_plan:
        value = getattr(obj, attr)
        if value is None or (omit_empty and not value):
            continue
        out[name] = value if dump is None else dump(key, value, obj)
    for rule in section.requires:
        # A key that needs another is shown only with it (`set` only with `cookie`).
        if rule.needs not in out:
            out.pop(rule.key, None)
    return out


def _dump_value(key: Key, value: Any, owner: object) -> object:
    dump = _DUMPERS.get(key.kind)
    # Sizes and integers as ints, booleans, and every kind of text as it is.
    return value if dump is None else dump(key, value, owner)


def _dump_listen(key: Key, value: Any, owner: object) -> object:
    listeners = getattr(owner, "listeners", ())
    if listeners:
        return [_dump_section(_sub(key), listener) for listener in listeners]
    return format_address(*value)


def _sub(key: Key) -> Section[Any]:
    assert key.section is not None
    return key.section


_Dumper = Callable[[Key, Any, object], object]


def _duration_out(key: Key, value: Any, owner: object) -> object:
    return format_duration(value)


_DUMPERS: dict[Kind, _Dumper] = {
    Kind.DURATION: _duration_out,
    Kind.DURATION0: _duration_out,
    Kind.NUMBER: lambda key, value, owner: _number_out(value),
    Kind.STEPS: lambda key, value, owner: [_number_out(step) for step in value],
    Kind.SPLIT: lambda key, value, owner: {name: _number_out(w) for name, w in value},
    Kind.METHODS: lambda key, value, owner: [m for m in ALL_METHODS if m in value],
    Kind.JSON_PATHS: lambda key, value, owner: list(value),
    Kind.ENDPOINTS: lambda key, value, owner: [endpoint.address for endpoint in value],
    Kind.ADDRESS: lambda key, value, owner: (
        value if isinstance(value, str) else format_address(*value)
    ),
    Kind.WORKERS: lambda key, value, owner: "auto" if value == 0 else value,
    Kind.REDIS_URL: lambda key, value, owner: redact_redis_url(value),
    Kind.LISTEN: _dump_listen,
    Kind.SECTION: lambda key, value, owner: _dump_section(_sub(key), value),
    Kind.SECTIONS: lambda key, value, owner: [_dump_section(_sub(key), x) for x in value],
    Kind.ROUTES: lambda key, value, owner: [_dump_section(_sub(key), x) for x in value],
    Kind.UPSTREAMS: lambda key, value, owner: {x.name: _dump_section(_sub(key), x) for x in value},
}
# Kinds dumped as they are stored.
AS_STORED: frozenset[Kind] = frozenset(Kind) - frozenset(_DUMPERS)


# --- JSON Schema ---------------------------------------------------------------------------------


def _anchored(pattern: str) -> str:
    return f"^(?:{pattern})$"


_NO_SPACE = r"^[^\s\x00-\x1f\x7f]+$"


def _text(pattern: str | None = None, max_length: int | None = None) -> dict[str, object]:
    out: dict[str, object] = {"type": "string", "minLength": 1}
    if max_length is not None:
        out["maxLength"] = max_length
    if pattern is not None:
        out["pattern"] = pattern
    return out


def _bounds(key: Key, out: dict[str, object]) -> dict[str, object]:
    if key.minimum is not None:
        out["exclusiveMinimum" if key.exclusive_minimum else "minimum"] = _number_out(key.minimum)
    if key.maximum is not None:
        out["exclusiveMaximum" if key.exclusive_maximum else "maximum"] = _number_out(key.maximum)
    return out


def _ref(section: Section[Any] | None) -> dict[str, object]:
    assert section is not None
    return {"$ref": f"#/$defs/{section.name}"}


def _array(key: Key, items: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {"type": "array", "items": items}
    if key.min_items:
        out["minItems"] = key.min_items
    if key.max_items is not None:
        out["maxItems"] = key.max_items
    return out


_DURATION_SCHEMA: dict[str, object] = {
    "anyOf": [
        {"type": "string", "pattern": _anchored(f"0|{DURATION_PATTERN}")},
        {"const": 0},
    ]
}
_ADDRESS_SCHEMA = _text(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")
_SCALAR_TYPES = ["string", "number", "integer", "boolean"]


def _value_schema(key: Key) -> dict[str, object]:
    """The JSON Schema of one key's value (without its description)."""
    kind = key.kind
    if kind in (Kind.DURATION, Kind.DURATION0):
        return dict(_DURATION_SCHEMA)
    if kind is Kind.SIZE:
        return {
            "anyOf": [
                _bounds(key, {"type": "integer"}),
                {"type": "string", "pattern": _anchored(f"[0-9]+|{SIZE_PATTERN}")},
            ]
        }
    if kind is Kind.INT:
        return _bounds(key, {"type": "integer"})
    if kind is Kind.NUMBER:
        return _bounds(key, {"type": "number"})
    if kind is Kind.BOOL:
        return {"type": "boolean"}
    if kind is Kind.STRING:
        # Read as written: `value: true` is the text "true" (quoting it says so).
        return {"type": _SCALAR_TYPES}
    if kind in (Kind.NAME, Kind.FLEET_NAME):
        return _text(_anchored(NAME_PATTERN), MAX_NAME_CHARS)
    if kind is Kind.UPSTREAM:
        return _text(_anchored(NAME_PATTERN), MAX_NAME_CHARS)
    if kind in (Kind.HEADER, Kind.COOKIE):
        return _text(_anchored(TOKEN_PATTERN), MAX_TOKEN_CHARS)
    if kind is Kind.VIA:
        return _text(_anchored(TOKEN_PATTERN), MAX_NAME_CHARS)
    if kind in (Kind.HTTP_PATH, Kind.PATH_PREFIX):
        return _text(r"^/[^?# \x00-\x1f\x7f]*$", MAX_PATH_CHARS)
    if kind is Kind.HOST:
        return _text(r"^(?:\*\.)?[A-Za-z0-9_.-]+$|^\[?[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]?$")
    if kind is Kind.SERVER_NAME:
        return _text(r"^[A-Za-z0-9_.-]+$", MAX_HOST_CHARS)
    if kind in (Kind.URL, Kind.GRAFANA_URL):
        return _text(r"^https?://[^\s#]+$", MAX_URL_CHARS)
    if kind is Kind.REDIS_URL:
        return _text(r"^rediss?(?:\+sentinel)?://[^\s#?]+$", MAX_URL_CHARS)
    if kind is Kind.INSTANCE:
        return _text(_NO_SPACE, MAX_INSTANCE_CHARS)
    if kind in (Kind.FILE, Kind.STATE_FILE):
        return _text(r"^[^\x00-\x08\x0a-\x1f\x7f]*[^/\x00-\x1f\x7f]$")
    if kind is Kind.TLS_VERSION:
        return {"enum": [*TLS_VERSIONS, *(float(version) for version in TLS_VERSIONS)]}
    if kind is Kind.WEBHOOK_EVENT:
        return {"enum": list(WEBHOOK_EVENTS)}
    if kind is Kind.PROTOCOL:
        return {"enum": list(UPSTREAM_PROTOCOLS)}
    if kind is Kind.ADDRESS:
        return dict(_ADDRESS_SCHEMA)
    if kind is Kind.WORKERS:
        return {"anyOf": [_bounds(key, {"type": "integer"}), {"const": "auto"}]}
    if kind is Kind.LISTEN:
        return {"anyOf": [dict(_ADDRESS_SCHEMA), _array(key, _ref(key.section))]}
    if kind is Kind.UPSTREAMS:
        out: dict[str, object] = {
            "type": "object",
            "propertyNames": {"pattern": _anchored(NAME_PATTERN)},
            "additionalProperties": _ref(key.section),
            "minProperties": key.min_items,
        }
        if key.max_items is not None:
            out["maxProperties"] = key.max_items
        return out
    if kind is Kind.SPLIT:
        return {
            "type": "object",
            "additionalProperties": _bounds(key, {"type": "number"}),
            "minProperties": 1,
        }
    if kind is Kind.ENDPOINTS:
        return {**_array(key, dict(_ADDRESS_SCHEMA)), "uniqueItems": True}
    if kind is Kind.STEPS:
        return _array(key, _bounds(key, {"type": "number"}))
    if kind is Kind.METHODS:
        return {**_array(key, {"enum": list(ALL_METHODS)}), "uniqueItems": True}
    if kind is Kind.JSON_PATHS:
        return _array(key, _text(_anchored(JSON_PATH_PATTERN)))
    if kind is Kind.SECTION:
        return _ref(key.section)
    if kind in (Kind.SECTIONS, Kind.ROUTES):
        return _array(key, _ref(key.section))
    raise AssertionError(f"no JSON Schema for {kind}")  # pragma: no cover - a test covers kinds


def _key_schema(section: Section[Any], key: Key) -> dict[str, object]:
    out = _value_schema(key)
    out["description"] = key.doc
    if not key.required and key.attr in section.field_names and key.kind is not Kind.SECTION:
        default = section.default(key.attr)
        if default is not None and default is not MISSING:
            out["default"] = _dump_value(key, default, None)
    return out


def _section_schema(section: Section[Any]) -> dict[str, object]:
    out: dict[str, object] = {
        "type": "object",
        "description": section.doc,
        "properties": {key.name: _key_schema(section, key) for key in section.keys},
        "additionalProperties": False,
    }
    if section.required:
        out["required"] = list(section.required)
    if section.one_of:
        out["oneOf"] = [{"required": [name]} for name in section.one_of]
    if section.requires:
        needs: dict[str, list[str]] = {}
        for rule in section.requires:
            needs.setdefault(rule.key, []).append(rule.needs)
        out["dependentRequired"] = needs
    return out


def json_schema() -> dict[str, object]:
    """The routing table as a JSON Schema (draft 2020-12), for editors and linters.

    It checks shape, kinds and bounds; what needs the whole file (unknown upstreams, duplicate
    routes, unreachable routes, files that must exist) only `turnout validate` checks.
    """
    top = _section_schema(TOP)
    defs = {section.name: _section_schema(section) for section in SECTIONS if section is not TOP}
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "Turnout routing table",
        **{name: value for name, value in top.items() if name != "description"},
        "description": (
            "Turnout's routing table (generated by `python -m proxy.core.schema`; see "
            "docs/config.md). `turnout validate` checks more than this schema can: upstream "
            "references, unreachable routes, files."
        ),
        "$defs": defs,
    }


def main() -> None:
    """Print the JSON Schema (`python -m proxy.core.schema > docs/turnout.schema.json`)."""
    import sys

    import orjson

    text = orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2) + b"\n"
    sys.stdout.buffer.write(text)


if __name__ == "__main__":
    main()
