"""Prometheus metrics: the workers' counters summed, rendered in the text format at scrape time.

Workers count per (route, upstream) in plain attributes bound when a table is compiled
(`proxy.core.counters`); nothing is shared between processes. At each scrape the supervisor
asks every worker for a snapshot (`WorkerContext.stats_snapshot`), reads each once as it arrives
(`read_worker_snapshot`: a malformed one is dropped there, the worker's previous one stays), sums
them in a `Totals`, adds the `retired` totals of workers that died, and `render` writes the
exposition text (the format of prometheus_client's `generate_latest`, written directly: it is
10x faster).

Rules that keep the series honest:
- Only series of the table in force: (route, upstream) pairs the table can route to, mirror pairs
  of its routes, its upstreams and endpoints. A series that a reload (or a runtime split) removed
  disappears, from the retired totals as well (`Totals.prune`).
- Counters never go down while the table keeps their series: a worker that does not answer in
  time counts with its last snapshot, and a worker that died has its last snapshot folded into
  the retired totals. What a killed worker counted after its last snapshot is lost; the
  supervisor polls every worker about once a second (`WorkerSet.poll_stats`) to bound that.
- A (route, upstream) pair has series from its first request on (`PairTotals.seen`); before,
  only its split weight. Zeros for every pair of a large table cost more than they tell.
- Histogram buckets come per slot (not cumulative) from the workers and are cumulated here.

Besides the workers' counters, a scrape carries the supervisor's own: `turnout_build_info`, the
time the config in force was loaded, and the standard `process_*` families of the supervisor
process (prometheus_client's process collector, read at scrape time: workers are not included).

The metric names, types and labels are contract section 7; docs/metrics.md describes each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from gzip import compress as gzip_compress
from importlib import metadata
from typing import cast

from prometheus_client import utils as prometheus_utils
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector

from proxy.core.counters import (
    BUCKET_SLOTS,
    DURATION_BUCKETS,
    ERROR_KINDS,
    GOAWAY_REASONS,
    MIRROR_OUTCOMES,
    MirrorSnapshot,
    PairSnapshot,
    WorkerSnapshot,
)
from proxy.core.grpc import NAMES as GRPC_NAMES
from proxy.core.health import EndpointKey
from proxy.core.table import Table
from proxy.runtime.build import data_plane_build

# The text format every Prometheus version reads (prometheus_client's default moved to 1.0.0).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# prometheus_client's float formatting (Go's: an exponent from 1e6 up), typed for mypy.
_go_float = cast(Callable[[float], str], prometheus_utils.floatToGoString)

# `le` label values, computed once: the finite bounds as prometheus_client's own histograms
# print them (repr: "0.0001", "1.0", "60.0"), then +Inf.
LE_LABELS: tuple[str, ...] = (*(repr(bound) for bound in DURATION_BUCKETS), "+Inf")

Pair = tuple[str, str]
NO_ROUTE: Pair = ("", "")


def _build_version() -> str:
    try:
        return metadata.version("turnout")
    except metadata.PackageNotFoundError:
        # Run from a source tree that was never installed (PYTHONPATH=.): pyproject's version.
        return "0.1.0"


BUILD_VERSION = _build_version()
# The data plane's build: what `turnout --version` prints and turnout_build_info's `build` label.
DATA_PLANE_BUILD = data_plane_build()

# The supervisor's process_* families, read from /proc at each scrape (none where there is no
# /proc). Not registered anywhere: render() asks it directly.
_PROCESS = ProcessCollector(registry=None)


def _active(snapshot: PairSnapshot) -> bool:
    """Whether a pair's snapshot holds anything but zeros (most pairs of a big table don't)."""
    return bool(
        snapshot["count"]
        or snapshot["in_flight"]
        or snapshot["retries"]
        or any(snapshot["errors"].values())
    )


@dataclass(slots=True)
class PairTotals:
    """Summed counters of one (route, upstream): the layout of `RouteUpstreamStats`."""

    codes: dict[int, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * BUCKET_SLOTS)
    sum: float = 0.0
    count: int = 0
    in_flight: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    retries: int = 0
    grpc: dict[int, int] = field(default_factory=dict)
    grpc_errors: int = 0

    def add_snapshot(self, snapshot: PairSnapshot, *, gauges: bool) -> None:
        """Add one worker's `RouteUpstreamStats.snapshot()`; `gauges` False skips in_flight."""
        codes = self.codes
        for key, value in snapshot["codes"].items():
            code = int(key)
            codes[code] = codes.get(code, 0) + value
        buckets = self.buckets
        for index, value in enumerate(snapshot["buckets"]):
            buckets[index] += value
        self.sum += snapshot["sum"]
        self.count += snapshot["count"]
        if gauges:
            self.in_flight += snapshot["in_flight"]
        errors = snapshot["errors"]
        for kind in ERROR_KINDS:
            self.errors[kind] += errors[kind]
        self.retries += snapshot["retries"]
        grpc = self.grpc
        for key, value in snapshot["grpc"].items():
            status = int(key)
            grpc[status] = grpc.get(status, 0) + value
        self.grpc_errors += snapshot["grpc_errors"]

    def add(self, other: PairTotals) -> None:
        """Add another total of the same pair (counters and gauges alike)."""
        for code, value in other.codes.items():
            self.codes[code] = self.codes.get(code, 0) + value
        for index, value in enumerate(other.buckets):
            self.buckets[index] += value
        self.sum += other.sum
        self.count += other.count
        self.in_flight += other.in_flight
        for kind, value in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + value
        self.retries += other.retries
        for status, value in other.grpc.items():
            self.grpc[status] = self.grpc.get(status, 0) + value
        self.grpc_errors += other.grpc_errors

    @property
    def error_responses(self) -> int:
        """Answers that are errors for a rollout's tests: 5xx, and gRPC error statuses under
        a lower HTTP status (`proxy.core.counters.Counts`)."""
        return sum(n for code, n in self.codes.items() if code >= 500) + self.grpc_errors

    @property
    def seen(self) -> bool:
        """True once the pair saw a request (answered, in flight, or an attempt that failed)."""
        return bool(
            self.count or self.in_flight or self.retries or self.codes or any(self.errors.values())
        )


@dataclass(slots=True)
class MirrorTotals:
    """Summed shadow-traffic counters of one (route, shadow upstream)."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIRROR_OUTCOMES, 0))
    mismatch: int = 0
    body_mismatch: int = 0

    def add_snapshot(self, snapshot: MirrorSnapshot) -> None:
        """Add one worker's `MirrorStats.snapshot()`."""
        outcomes = snapshot["outcomes"]
        for outcome in MIRROR_OUTCOMES:
            self.outcomes[outcome] += outcomes[outcome]
        self.mismatch += snapshot["mismatch"]
        self.body_mismatch += snapshot["body_mismatch"]

    def add(self, other: MirrorTotals) -> None:
        """Add another total of the same pair."""
        for outcome, value in other.outcomes.items():
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + value
        self.mismatch += other.mismatch
        self.body_mismatch += other.body_mismatch


@dataclass(slots=True)
class Totals:
    """Counters summed over worker snapshots; also the supervisor's retired accumulator.

    `ejected` holds the endpoints passively ejected in at least one worker (a gauge: the
    retired totals never have any).
    """

    pairs: dict[Pair, PairTotals] = field(default_factory=dict)
    no_route: PairTotals = field(default_factory=PairTotals)
    mirror: dict[Pair, MirrorTotals] = field(default_factory=dict)
    fail_open: dict[str, int] = field(default_factory=dict)
    h2_goaways: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GOAWAY_REASONS, 0))
    ejected: set[EndpointKey] = field(default_factory=set)

    def add_snapshot(self, snapshot: WorkerSnapshot, *, gauges: bool = True) -> None:
        """Add one worker's `stats_snapshot()`, as `read_worker_snapshot` read it (checked once,
        when it arrived: nothing here checks it again).

        `gauges` False (folding a dead worker into the retired totals) keeps only counters:
        a dead worker has nothing in flight and ejects nothing.
        """
        for pair_snapshot in snapshot["routes"]:
            if not _active(pair_snapshot):
                continue  # nothing to add, and no series to create for it
            key = (pair_snapshot["route"], pair_snapshot["upstream"])
            self.pairs.setdefault(key, PairTotals()).add_snapshot(pair_snapshot, gauges=gauges)
        self.no_route.add_snapshot(snapshot["no_route"], gauges=gauges)
        for mirror_snapshot in snapshot["mirror"]:
            key = (mirror_snapshot["route"], mirror_snapshot["upstream"])
            self.mirror.setdefault(key, MirrorTotals()).add_snapshot(mirror_snapshot)
        for upstream, value in snapshot["fail_open"].items():
            self.fail_open[upstream] = self.fail_open.get(upstream, 0) + value
        goaways = snapshot["h2_goaways"]
        for reason in GOAWAY_REASONS:
            self.h2_goaways[reason] += goaways[reason]
        if gauges:
            for endpoint in snapshot["endpoints"]:
                if endpoint["ejected"]:
                    self.ejected.add((endpoint["upstream"], endpoint["endpoint"]))

    def add(self, other: Totals) -> None:
        """Add another `Totals` (the retired accumulator to the live workers' sum)."""
        for key, pair in other.pairs.items():
            self.pairs.setdefault(key, PairTotals()).add(pair)
        self.no_route.add(other.no_route)
        for key, mirror in other.mirror.items():
            self.mirror.setdefault(key, MirrorTotals()).add(mirror)
        for upstream, value in other.fail_open.items():
            self.fail_open[upstream] = self.fail_open.get(upstream, 0) + value
        for reason, value in other.h2_goaways.items():
            self.h2_goaways[reason] = self.h2_goaways.get(reason, 0) + value
        self.ejected |= other.ejected

    def prune(self, table: Table) -> None:
        """Forget every series `table` does not have (a reload or runtime split removed it)."""
        wanted = {(route.name, upstream) for route in table.routes for upstream in route.upstreams}
        mirrored = {(r.name, r.mirror.to) for r in table.routes if r.mirror is not None}
        self.pairs = {key: value for key, value in self.pairs.items() if key in wanted}
        self.mirror = {key: value for key, value in self.mirror.items() if key in mirrored}
        self.fail_open = {k: v for k, v in self.fail_open.items() if k in table.upstreams}
        self.ejected = {key for key in self.ejected if key[0] in table.upstreams}


@dataclass(frozen=True, slots=True)
class MetricsInput:
    """Everything one scrape renders.

    `totals`: the live workers' snapshots and the retired totals, summed. `down`: endpoints
    that fail their active health checks. `reloads`: the supervisor's success/failure counts.
    `generation`: the generation every worker has applied (see docs/metrics.md).
    `config_loaded_at`: Unix time the config in force was loaded (at start or by the last
    successful reload); None renders no sample.
    """

    table: Table
    totals: Totals
    down: frozenset[EndpointKey]
    reloads: Mapping[str, int]
    generation: int
    rollout_steps: Mapping[str, int] = field(default_factory=dict)
    rollout_verdicts: Mapping[tuple[str, str], int] = field(default_factory=dict)
    config_loaded_at: float | None = None
    # Deployment annotations by result (`sent`, `failed`, `dropped`; see proxy.control.annotations).
    annotations: Mapping[str, int] = field(default_factory=dict)
    # Expiry (Unix time) of each TLS listener's certificates, by (listener, name).
    certificate_expiry: Mapping[tuple[str, str], float] = field(default_factory=dict)
    # Fleet mode (contract section 9): (connected, leader, live instances); None when off.
    fleet: tuple[bool, bool, int] | None = None


def _escape(value: str) -> str:
    """A label value escaped for the text format (backslash, newline, double quote)."""
    if "\\" in value or "\n" in value or '"' in value:
        value = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _num(value: float) -> str:
    """A sample value as prometheus_client prints it: "3.0", "1.234567e+06", "0.0125"."""
    # Fast path for the common case, small counts; the result is the same.
    if type(value) is int and 0 <= value < 1_000_000:
        return f"{value}.0"
    return _go_float(value)


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")


def _pair_labels(route: str, upstream: str) -> str:
    return f'route="{_escape(route)}",upstream="{_escape(upstream)}"'


# Bucket line prefixes, computed once: label names come sorted (le first), as prometheus_client
# printed them, so the text stays the same as before the renderer was written by hand.
_BUCKET_PREFIXES: tuple[str, ...] = tuple(
    f'turnout_request_duration_seconds_bucket{{le="{le}",' for le in LE_LABELS
)


def _seen_pairs(view: MetricsInput) -> list[tuple[str, PairTotals]]:
    """(label text, totals) of the pairs to render: the table's pairs that saw a request.

    A pair that never saw one (most of a large table, usually) has no series but its split
    weight: 27 series of zeros per pair were 22 MB per scrape for 5,000 routes, and as many
    series for Prometheus to keep. The no-route pair comes first, like before.
    """
    totals = view.totals
    seen: list[tuple[str, PairTotals]] = []
    if totals.no_route.seen:
        seen.append((_pair_labels(*NO_ROUTE), totals.no_route))
    pairs = totals.pairs
    for route in view.table.routes:
        for upstream in route.upstreams:
            pair = pairs.get((route.name, upstream))
            if pair is not None and pair.seen:
                seen.append((_pair_labels(route.name, upstream), pair))
    return seen


def _requests(out: list[str], seen: list[tuple[str, PairTotals]]) -> None:
    _family(
        out,
        "turnout_requests_total",
        "counter",
        "Requests answered, by route, upstream and status code "
        '(route="" upstream="" for requests that matched no route).',
    )
    for labels, pair in seen:
        for code in sorted(pair.codes):
            out.append(
                f'turnout_requests_total{{code="{code}",{labels}}} {_num(pair.codes[code])}\n'
            )
    _family(
        out,
        "turnout_request_duration_seconds",
        "histogram",
        "Time from the request head to the end of the response, by route and upstream.",
    )
    for labels, pair in seen:
        cumulative = 0
        for prefix, value in zip(_BUCKET_PREFIXES, pair.buckets, strict=True):
            cumulative += value
            out.append(f"{prefix}{labels}}} {_num(cumulative)}\n")
        out.append(f"turnout_request_duration_seconds_count{{{labels}}} {_num(cumulative)}\n")
        out.append(f"turnout_request_duration_seconds_sum{{{labels}}} {_num(pair.sum)}\n")


def _per_pair(out: list[str], seen: list[tuple[str, PairTotals]]) -> None:
    _family(
        out,
        "turnout_requests_in_flight",
        "gauge",
        "Requests being forwarded now, by route and upstream.",
    )
    for labels, pair in seen:
        out.append(f"turnout_requests_in_flight{{{labels}}} {_num(pair.in_flight)}\n")
    _family(
        out,
        "turnout_upstream_errors_total",
        "counter",
        "Failed attempts to an upstream, by kind: " + ", ".join(ERROR_KINDS) + ".",
    )
    for labels, pair in seen:
        for kind in ERROR_KINDS:
            value = pair.errors.get(kind, 0)
            out.append(f'turnout_upstream_errors_total{{kind="{kind}",{labels}}} {_num(value)}\n')
    _family(
        out,
        "turnout_retries_total",
        "counter",
        "Extra attempts made on another endpoint of the upstream.",
    )
    for labels, pair in seen:
        out.append(f"turnout_retries_total{{{labels}}} {_num(pair.retries)}\n")


def _grpc(out: list[str], seen: list[tuple[str, PairTotals]]) -> None:
    _family(
        out,
        "turnout_grpc_responses_total",
        "counter",
        "gRPC calls answered, by route, upstream and grpc-status (its name: OK, UNAVAILABLE...).",
    )
    for labels, pair in seen:
        for status in sorted(pair.grpc):
            out.append(
                f'turnout_grpc_responses_total{{grpc_status="{GRPC_NAMES[status]}",{labels}}} '
                f"{_num(pair.grpc[status])}\n"
            )


def _http2(out: list[str], view: MetricsInput) -> None:
    _family(
        out,
        "turnout_http2_goaways_total",
        "counter",
        "Downstream HTTP/2 connections the proxy closed with GOAWAY, by reason.",
    )
    for reason in GOAWAY_REASONS:
        value = view.totals.h2_goaways.get(reason, 0)
        out.append(f'turnout_http2_goaways_total{{reason="{reason}"}} {_num(value)}\n')


def _split_weight(out: list[str], table: Table) -> None:
    _family(
        out,
        "turnout_split_weight",
        "gauge",
        "Effective share of the route's split in percent (sums to 100 per route).",
    )
    for route in table.routes:
        for upstream, share in route.split.shares.items():
            labels = _pair_labels(route.name, upstream)
            out.append(f"turnout_split_weight{{{labels}}} {_num(share)}\n")


def _mirror(out: list[str], view: MetricsInput) -> None:
    mirrored = [
        (_pair_labels(route.name, route.mirror.to), (route.name, route.mirror.to))
        for route in view.table.routes
        if route.mirror is not None
    ]
    totals = view.totals.mirror
    _family(
        out,
        "turnout_mirror_requests_total",
        "counter",
        "Sampled mirror copies by outcome: sent, error, dropped, skipped.",
    )
    for labels, key in mirrored:
        mirror = totals.get(key) or MirrorTotals()
        for outcome in MIRROR_OUTCOMES:
            value = mirror.outcomes.get(outcome, 0)
            out.append(
                f'turnout_mirror_requests_total{{outcome="{outcome}",{labels}}} {_num(value)}\n'
            )
    _family(
        out,
        "turnout_mirror_status_mismatch_total",
        "counter",
        "Mirror copies whose status code differed from the primary's.",
    )
    for labels, key in mirrored:
        value = (totals.get(key) or MirrorTotals()).mismatch
        out.append(f"turnout_mirror_status_mismatch_total{{{labels}}} {_num(value)}\n")
    _family(
        out,
        "turnout_mirror_body_mismatch_total",
        "counter",
        "Mirror copies whose JSON body differed from the primary's (compare_json).",
    )
    for labels, key in mirrored:
        value = (totals.get(key) or MirrorTotals()).body_mismatch
        out.append(f"turnout_mirror_body_mismatch_total{{{labels}}} {_num(value)}\n")


def _endpoints(out: list[str], view: MetricsInput) -> None:
    endpoints = [
        (f'endpoint="{_escape(endpoint.address)}",upstream="{_escape(name)}"', (name, endpoint))
        for name, upstream in view.table.upstreams.items()
        for endpoint in upstream.endpoints
    ]
    _family(
        out,
        "turnout_endpoint_healthy",
        "gauge",
        "1 when the endpoint passes its active health check (or has none), else 0.",
    )
    for labels, (name, endpoint) in endpoints:
        down = (name, endpoint.address) in view.down
        out.append(f"turnout_endpoint_healthy{{{labels}}} {'0.0' if down else '1.0'}\n")
    _family(
        out,
        "turnout_endpoint_ejected",
        "gauge",
        "1 while at least one worker has passively ejected the endpoint, else 0.",
    )
    for labels, (name, endpoint) in endpoints:
        ejected = (name, endpoint.address) in view.totals.ejected
        out.append(f"turnout_endpoint_ejected{{{labels}}} {'1.0' if ejected else '0.0'}\n")
    _family(
        out,
        "turnout_endpoint_fail_open_total",
        "counter",
        "Requests sent to an upstream none of whose endpoints was healthy (fail open).",
    )
    for name in view.table.upstreams:
        value = view.totals.fail_open.get(name, 0)
        out.append(
            f'turnout_endpoint_fail_open_total{{upstream="{_escape(name)}"}} {_num(value)}\n'
        )


def _config(out: list[str], view: MetricsInput) -> None:
    _family(
        out,
        "turnout_config_reloads_total",
        "counter",
        "Config reloads: success (a new generation) or failure (the old one stays).",
    )
    for result in ("success", "failure"):
        value = view.reloads.get(result, 0)
        out.append(f'turnout_config_reloads_total{{result="{result}"}} {_num(value)}\n')
    _family(
        out,
        "turnout_config_generation",
        "gauge",
        "Generation of the routing table that every worker has applied.",
    )
    out.append(f"turnout_config_generation {_num(view.generation)}\n")
    _family(
        out,
        "turnout_config_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time the config in force was loaded (at start or by the last successful reload).",
    )
    if view.config_loaded_at is not None:
        out.append(
            f"turnout_config_last_reload_success_timestamp_seconds {_num(view.config_loaded_at)}\n"
        )


def _rollouts(out: list[str], view: MetricsInput) -> None:
    _family(
        out,
        "turnout_rollout_step",
        "gauge",
        "Index in `steps` of the rollout's current step, per route with a rollout state.",
    )
    for route, index in sorted(view.rollout_steps.items()):
        out.append(f'turnout_rollout_step{{route="{_escape(route)}"}} {_num(index)}\n')
    _family(
        out,
        "turnout_rollout_verdicts_total",
        "counter",
        "Rollout windows judged, by route and verdict (pass, fail; inconclusive too).",
    )
    routes = {route.name for route in view.table.routes if route.rollout is not None}
    for route in sorted(routes):
        for verdict in ("pass", "fail", "inconclusive"):
            value = view.rollout_verdicts.get((route, verdict), 0)
            out.append(
                f'turnout_rollout_verdicts_total{{route="{_escape(route)}",verdict="{verdict}"}}'
                f" {_num(value)}\n"
            )


def _annotations(out: list[str], view: MetricsInput) -> None:
    _family(
        out,
        "turnout_annotations_total",
        "counter",
        "Deployment annotations posted to Grafana, by result: sent, failed (refused, or no "
        "answer after every retry), dropped (too many under way).",
    )
    for result in ("sent", "failed", "dropped"):
        value = view.annotations.get(result, 0)
        out.append(f'turnout_annotations_total{{result="{result}"}} {_num(value)}\n')


def _build_info(out: list[str]) -> None:
    _family(
        out,
        "turnout_build_info",
        "gauge",
        "Always 1; version: Turnout's version; build: compiled (mypyc) or pure data plane.",
    )
    out.append(
        f'turnout_build_info{{version="{_escape(BUILD_VERSION)}",build="{DATA_PLANE_BUILD}"}} 1.0\n'
    )


def _process(out: list[str]) -> None:
    """The supervisor's process_* families, as prometheus_client's exposition prints them."""
    for family in _PROCESS.collect():
        # A counter family is named without its _total suffix; the text format names it with.
        name = f"{family.name}_total" if family.type == "counter" else family.name
        _family(out, name, family.type, family.documentation)
        for sample in family.samples:
            out.append(f"{sample.name} {_num(sample.value)}\n")


def _certificates(out: list[str], view: MetricsInput) -> None:
    if not view.certificate_expiry:
        return
    _family(
        out,
        "turnout_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "Unix time at which each TLS listener certificate in force expires.",
    )
    for (listener, name), value in sorted(view.certificate_expiry.items()):
        out.append(
            "turnout_tls_certificate_expiry_timestamp_seconds"
            f'{{listener="{_escape(listener)}",name="{_escape(name)}"}} {_num(value)}\n'
        )


def _fleet(out: list[str], view: MetricsInput) -> None:
    if view.fleet is None:
        return
    connected, leader, instances = view.fleet
    _family(
        out, "turnout_fleet_connected", "gauge", "1 while this instance reaches the fleet's Redis."
    )
    out.append(f"turnout_fleet_connected {_num(int(connected))}\n")
    _family(
        out, "turnout_fleet_leader", "gauge", "1 while this instance leads (runs the rollouts)."
    )
    out.append(f"turnout_fleet_leader {_num(int(leader))}\n")
    _family(
        out,
        "turnout_fleet_instances",
        "gauge",
        "Instances of the fleet seen in Redis within three leases (as of the last look).",
    )
    out.append(f"turnout_fleet_instances {_num(instances)}\n")


def render(view: MetricsInput) -> bytes:
    """The Prometheus text exposition of one scrape (serve it with CONTENT_TYPE).

    Written directly rather than through prometheus_client's metric objects, which cost about
    6 us per series (2 s for 5,000 routes); the text is the same, line for line.
    """
    out: list[str] = []
    seen = _seen_pairs(view)
    _requests(out, seen)
    _per_pair(out, [(labels, pair) for labels, pair in seen if pair is not view.totals.no_route])
    _grpc(out, seen)
    _http2(out, view)
    _split_weight(out, view.table)
    _mirror(out, view)
    _endpoints(out, view)
    _config(out, view)
    _rollouts(out, view)
    _annotations(out, view)
    _certificates(out, view)
    _fleet(out, view)
    _build_info(out)
    _process(out)
    return "".join(out).encode()


# gzip level of /metrics: level 1 is 4x faster than the default 6 and a third larger, about 20
# times smaller than the text either way (benchmarks/metrics_cost.py).
METRICS_GZIP_LEVEL = 1


def metrics_body(view: MetricsInput, gzip: bool) -> bytes:
    """The body of GET /metrics: `render`, gzip-compressed with `gzip`."""
    text = render(view)
    return gzip_compress(text, compresslevel=METRICS_GZIP_LEVEL, mtime=0) if gzip else text
