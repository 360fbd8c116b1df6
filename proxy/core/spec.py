"""Validated configuration, as plain immutable data.

`proxy.core.config` turns YAML into these objects (or a list of errors); `proxy.core.table`
compiles them into the routing table. Nothing here does I/O, and nothing here may import
asyncio, sockets, time, random or os: this is the pure core.

Durations are float seconds, sizes are int bytes, names are validated strings.
"""

from __future__ import annotations

import copyreg
from dataclasses import dataclass, field, fields
from typing import Any

# The largest split weight anywhere: in the file, in a runtime split, in the state file. Far
# above any useful ratio, and small enough that sums of many weights stay exact enough.
MAX_WEIGHT = 1_000_000.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Timeouts of section 1 of the contract, in seconds."""

    connect: float = 2.0
    response: float = 30.0
    idle: float = 60.0
    client_keepalive: float = 75.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request and per-worker limits."""

    max_request_body: int = 64 * 1024 * 1024
    max_connections: int = 10000
    max_header_size: int = 64 * 1024
    max_headers: int = 100
    max_concurrent_streams: int = 100  # per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS)


@dataclass(frozen=True, slots=True)
class Drain:
    """Drain bounds for reload and shutdown, in seconds."""

    reload: float = 30.0
    shutdown: float = 25.0
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health check of every endpoint of an upstream."""

    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0
    unhealthy_after: int = 3
    healthy_after: int = 2


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One `host:port` of an upstream. `host` has no brackets, even for IPv6."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """The endpoint as written in config and in metrics: `host:port`, `[v6]:port`."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """One certificate served by a TLS listener: PEM chain and key, as absolute paths."""

    cert: str
    key: str


# `min_version` values a TLS listener accepts.
TLS_VERSIONS: tuple[str, ...] = ("1.2", "1.3")


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """TLS termination on one listener; the first certificate is the default (no SNI match)."""

    certificates: tuple[CertificateFiles, ...]
    min_version: str = "1.2"
    client_ca: str | None = None  # absolute path; set: client certificates required (mTLS)


@dataclass(frozen=True, slots=True)
class Listener:
    """One data-plane address; `tls` None means plain HTTP."""

    host: str
    port: int
    tls: ListenerTls | None = None

    @property
    def address(self) -> str:
        """`host:port`, `[v6]:port`: as written in config and in the `listener` label."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS from Turnout to an upstream's endpoints (paths absolute).

    `ca` None: the system's trust store. `server_name` None: the endpoint's host (SNI and the
    name checked). `cert`/`key`: a client certificate, both or neither. `verify` False skips
    checking the endpoint's certificate (never the default).
    """

    ca: str | None = None
    server_name: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True


# How Turnout speaks to an upstream's endpoints: HTTP/1.1, HTTP/2 with prior knowledge over
# TCP (`h2c`), or HTTP/2 over TLS chosen by ALPN (`h2`).
UPSTREAM_PROTOCOLS: tuple[str, ...] = ("http1", "h2c", "h2")


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """A named version of the service.

    `protocol` is one of UPSTREAM_PROTOCOLS; `h2` without `tls` means TLS with the system's
    trust store and the endpoint's host as the checked name (`effective_tls`).
    """

    name: str
    endpoints: tuple[Endpoint, ...]
    health: HealthCheck | None = None
    tls: UpstreamTls | None = None
    protocol: str = "http1"

    @property
    def effective_tls(self) -> UpstreamTls | None:
        """The TLS settings connections use: `tls`, or the defaults for `h2` without it."""
        if self.tls is None and self.protocol == "h2":
            return UpstreamTls()
        return self.tls


@dataclass(frozen=True, slots=True)
class Override:
    """Pin requests to `to` by header or cookie; `value` None means: present at all."""

    to: str
    header: str | None = None  # lower-cased
    cookie: str | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Sticky:
    """Sticky split: exactly one of header (lower-cased) and cookie is set."""

    header: str | None = None
    cookie: str | None = None
    set: bool = False


ALL_METHODS: tuple[str, ...] = (
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "PATCH",
    "DELETE",
    "OPTIONS",
    "TRACE",
    "CONNECT",
)


@dataclass(frozen=True, slots=True)
class Mirror:
    """Shadow traffic: a sampled copy of the route's requests sent to `to`.

    `methods` None means every method. `compare_json_ignore` lists dotted JSON paths whose
    values are volatile (ids, timestamps) and are ignored by the body comparison; the
    comparison is on when `compare_json` is true.
    """

    to: str
    percent: float = 100.0
    max_body: int = 1024 * 1024
    methods: frozenset[str] | None = None
    max_in_flight: int = 64
    timeout: float = 10.0
    compare_json: bool = False
    compare_json_ignore: tuple[str, ...] = ()


# When a rollout webhook is called (contract section 5): `before_step` gates a step, the others
# are notifications.
WEBHOOK_EVENTS: tuple[str, ...] = ("before_step", "after_step", "rollback", "succeeded")


@dataclass(frozen=True, slots=True)
class Webhook:
    """One rollout webhook: on which event it is called, its http(s) URL, how long it may take."""

    on: str
    url: str
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Rollout:
    """Automated canary analysis settings of a route (contract section 5).

    `check` (seconds between two looks at the evidence) is at most `interval`: the config
    makes it `min(5s, interval)` when the file leaves it out.
    """

    baseline: str
    canary: str
    steps: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)
    interval: float = 60.0
    min_requests: int = 50
    max_error_rate: float = 0.01
    max_p99: float = 0.5
    confidence: float = 0.99
    check: float = 5.0
    webhooks: tuple[Webhook, ...] = ()


@dataclass(frozen=True, slots=True)
class Annotations:
    """Deployment annotations: where to post them (contract section 12).

    `grafana` is Grafana's base URL as written (http or https, no query); every split change,
    rollout event and reload is posted to `{grafana}/api/annotations`, each attempt bounded
    by `timeout` seconds.
    """

    grafana: str
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Fleet:
    """Fleet mode (contract section 9): instances with the same `name` share state in Redis.

    `redis` is the URL as written (redis:// or rediss://; a password in it is never shown);
    `instance` is this instance's name as written, `${VAR}` references expanded at start
    (None: host name and pid); `lease` is the leader lease in seconds.
    """

    name: str
    redis: str
    instance: str | None = None
    lease: float = 10.0


@dataclass(frozen=True, slots=True)
class Match:
    """Route match. `host` lower-cased without port; `*.example.com` is a suffix match."""

    host: str | None = None
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route: match, overrides, split and the optional features."""

    name: str
    split: tuple[tuple[str, float], ...]  # (upstream, weight) in file order
    match: Match = field(default_factory=Match)
    overrides: tuple[Override, ...] = ()
    sticky: Sticky | None = None
    mirror: Mirror | None = None
    retries: int = 2
    rollout: Rollout | None = None


@dataclass(frozen=True, slots=True)
class ConfigSpec:
    """The whole validated routing table file.

    `listen` and `admin` are (host, port); `listeners` is the list form of `listen` (empty for
    the string form; then `listen` is the one plain listener, else the first listener's
    address); `workers` is resolved to an int by the caller when
    the file says `auto` (stored here as 0). `state_file` is an absolute path or None.
    """

    upstreams: tuple[UpstreamSpec, ...]
    routes: tuple[RouteSpec, ...]
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    listeners: tuple[Listener, ...] = ()
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    workers: int = 1
    state_file: str | None = None
    # The received-by name this instance puts in Via; None: a name unique to the instance.
    via: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    drain: Drain = field(default_factory=Drain)
    annotations: Annotations | None = None
    fleet: Fleet | None = None

    def all_listeners(self) -> tuple[Listener, ...]:
        """Every data-plane listener: the list form, or the one plain `listen`."""
        return self.listeners or (Listener(self.listen[0], self.listen[1]),)

    def upstream(self, name: str) -> UpstreamSpec:
        """The upstream called `name` (the config guarantees it exists)."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


def _rebuild(cls: type[Any], values: dict[str, object]) -> object:
    return cls(**values)


def _reduce(obj: Any) -> tuple[Any, tuple[type[Any], dict[str, object]]]:
    return _rebuild, (type(obj), {f.name: getattr(obj, f.name) for f in fields(obj)})


# The supervisor pickles the spec for its workers. Compiled (mypyc), these classes are native
# and pickle by setting attributes one by one, which a frozen class refuses: rebuild them
# through their constructor instead, in both builds.
for _cls in (
    Timeouts,
    Limits,
    Drain,
    HealthCheck,
    Endpoint,
    CertificateFiles,
    ListenerTls,
    Listener,
    UpstreamTls,
    UpstreamSpec,
    Override,
    Sticky,
    Mirror,
    Webhook,
    Rollout,
    Annotations,
    Fleet,
    Match,
    RouteSpec,
    ConfigSpec,
):
    copyreg.pickle(_cls, _reduce)
