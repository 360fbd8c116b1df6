"""Prometheus metrics: the workers' counters summed, rendered in the text format at scrape time.

Workers count per (route, upstream) in plain attributes bound when a table is compiled
(`proxy.stats`); nothing is shared between processes. At each scrape the supervisor asks every
worker for a snapshot (`WorkerContext.stats_snapshot`), sums them in a `Totals`, adds the
`retired` totals of workers that died, and `render` turns that into the exposition text with
prometheus_client (a collector yielding metric families into a private registry).

Rules that keep the series honest:
- Only series of the table in force: (route, upstream) pairs the table can route to, mirror pairs
  of its routes, its upstreams and endpoints. A series that a reload (or a runtime split) removed
  disappears, from the retired totals as well (`Totals.prune`).
- Counters never go down while the table keeps their series: a worker that does not answer in
  time counts with its last snapshot, and a worker that died has its last snapshot folded into
  the retired totals. What a killed worker counted after its last snapshot is lost.
- Histogram buckets come per slot (not cumulative) from the workers and are cumulated here.

The metric names, types and labels are contract section 7; docs/metrics.md describes each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy.health import EndpointKey
from proxy.stats import DURATION_BUCKETS, ERROR_KINDS, MIRROR_OUTCOMES
from proxy.table import Table

# The text format every Prometheus version reads (prometheus_client's default moved to 1.0.0).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

BUCKET_SLOTS = len(DURATION_BUCKETS) + 1
# `le` label values, computed once: the finite bounds as prometheus_client's own histograms
# print them (repr: "0.0001", "1.0", "60.0"), then +Inf.
LE_LABELS: tuple[str, ...] = (*(repr(bound) for bound in DURATION_BUCKETS), "+Inf")

Pair = tuple[str, str]
NO_ROUTE: Pair = ("", "")


def _count(value: object) -> int:
    # Snapshots crossed a JSON channel from our own workers; anything odd counts as 0 rather
    # than breaking the whole scrape.
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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

    def add_snapshot(self, snapshot: Mapping[str, Any], *, gauges: bool) -> None:
        """Add one worker's `RouteUpstreamStats.snapshot()`; `gauges` False skips in_flight."""
        codes = snapshot.get("codes")
        if isinstance(codes, Mapping):
            for key, value in codes.items():
                code = int(key)
                self.codes[code] = self.codes.get(code, 0) + _count(value)
        buckets = snapshot.get("buckets")
        if isinstance(buckets, list) and len(buckets) == BUCKET_SLOTS:
            for index, value in enumerate(buckets):
                self.buckets[index] += _count(value)
        total = snapshot.get("sum")
        if isinstance(total, int | float):
            self.sum += float(total)
        self.count += _count(snapshot.get("count"))
        if gauges:
            self.in_flight += _count(snapshot.get("in_flight"))
        errors = snapshot.get("errors")
        if isinstance(errors, Mapping):
            for kind in ERROR_KINDS:
                self.errors[kind] += _count(errors.get(kind))
        self.retries += _count(snapshot.get("retries"))

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


@dataclass(slots=True)
class MirrorTotals:
    """Summed shadow-traffic counters of one (route, shadow upstream)."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIRROR_OUTCOMES, 0))
    mismatch: int = 0
    body_mismatch: int = 0

    def add_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        """Add one worker's `MirrorStats.snapshot()`."""
        outcomes = snapshot.get("outcomes")
        if isinstance(outcomes, Mapping):
            for outcome in MIRROR_OUTCOMES:
                self.outcomes[outcome] += _count(outcomes.get(outcome))
        self.mismatch += _count(snapshot.get("mismatch"))
        self.body_mismatch += _count(snapshot.get("body_mismatch"))

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
    ejected: set[EndpointKey] = field(default_factory=set)

    def add_snapshot(self, snapshot: Mapping[str, Any], *, gauges: bool = True) -> None:
        """Add one worker's `stats_snapshot()`.

        `gauges` False (folding a dead worker into the retired totals) keeps only counters:
        a dead worker has nothing in flight and ejects nothing.
        """
        for pair_snapshot in snapshot.get("routes", ()):
            key = (str(pair_snapshot.get("route")), str(pair_snapshot.get("upstream")))
            self.pairs.setdefault(key, PairTotals()).add_snapshot(pair_snapshot, gauges=gauges)
        no_route = snapshot.get("no_route")
        if isinstance(no_route, Mapping):
            self.no_route.add_snapshot(no_route, gauges=gauges)
        for mirror_snapshot in snapshot.get("mirror", ()):
            key = (str(mirror_snapshot.get("route")), str(mirror_snapshot.get("upstream")))
            self.mirror.setdefault(key, MirrorTotals()).add_snapshot(mirror_snapshot)
        fail_open = snapshot.get("fail_open")
        if isinstance(fail_open, Mapping):
            for upstream, value in fail_open.items():
                self.fail_open[upstream] = self.fail_open.get(upstream, 0) + _count(value)
        if gauges:
            for endpoint in snapshot.get("endpoints", ()):
                if endpoint.get("ejected"):
                    self.ejected.add((str(endpoint.get("upstream")), str(endpoint.get("endpoint"))))

    def add(self, other: Totals) -> None:
        """Add another `Totals` (the retired accumulator to the live workers' sum)."""
        for key, pair in other.pairs.items():
            self.pairs.setdefault(key, PairTotals()).add(pair)
        self.no_route.add(other.no_route)
        for key, mirror in other.mirror.items():
            self.mirror.setdefault(key, MirrorTotals()).add(mirror)
        for upstream, value in other.fail_open.items():
            self.fail_open[upstream] = self.fail_open.get(upstream, 0) + value
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
    """

    table: Table
    totals: Totals
    down: frozenset[EndpointKey]
    reloads: Mapping[str, int]
    generation: int
    rollout_steps: Mapping[str, int] = field(default_factory=dict)
    rollout_verdicts: Mapping[tuple[str, str], int] = field(default_factory=dict)


class TurnoutCollector:
    """A prometheus_client collector over one `MetricsInput` (one scrape)."""

    def __init__(self, view: MetricsInput) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        """Every metric family of contract section 7 (rollout's come with the rollout)."""
        view = self._view
        pairs = [NO_ROUTE]
        pairs.extend(
            (route.name, upstream) for route in view.table.routes for upstream in route.upstreams
        )
        yield from self._requests(pairs)
        yield from self._per_pair(pairs[1:])
        yield self._split_weight()
        yield from self._mirror()
        yield from self._endpoints()
        yield from self._config()
        yield from self._rollouts()

    def _pair(self, key: Pair) -> PairTotals:
        totals = self._view.totals
        if key == NO_ROUTE:
            return totals.no_route
        return totals.pairs.get(key) or PairTotals()

    def _requests(self, pairs: list[Pair]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "turnout_requests_total",
            "Requests answered, by route, upstream and status code "
            '(route="" upstream="" for requests that matched no route).',
            labels=["route", "upstream", "code"],
        )
        duration = HistogramMetricFamily(
            "turnout_request_duration_seconds",
            "Time from the request head to the end of the response, by route and upstream.",
            labels=["route", "upstream"],
        )
        for key in pairs:
            pair = self._pair(key)
            for code in sorted(pair.codes):
                requests.add_metric([*key, str(code)], pair.codes[code])
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, value in zip(LE_LABELS, pair.buckets, strict=True):
                cumulative += value
                buckets.append((le, cumulative))
            duration.add_metric(list(key), buckets, sum_value=pair.sum)
        yield requests
        yield duration

    def _per_pair(self, pairs: list[Pair]) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "turnout_requests_in_flight",
            "Requests being forwarded now, by route and upstream.",
            labels=["route", "upstream"],
        )
        errors = CounterMetricFamily(
            "turnout_upstream_errors_total",
            "Failed attempts to an upstream, by kind: connect, reset, timeout.",
            labels=["route", "upstream", "kind"],
        )
        retries = CounterMetricFamily(
            "turnout_retries_total",
            "Extra attempts made on another endpoint of the upstream.",
            labels=["route", "upstream"],
        )
        for key in pairs:
            pair = self._pair(key)
            in_flight.add_metric(list(key), pair.in_flight)
            for kind in ERROR_KINDS:
                errors.add_metric([*key, kind], pair.errors.get(kind, 0))
            retries.add_metric(list(key), pair.retries)
        yield in_flight
        yield errors
        yield retries

    def _split_weight(self) -> Metric:
        weight = GaugeMetricFamily(
            "turnout_split_weight",
            "Effective share of the route's split in percent (sums to 100 per route).",
            labels=["route", "upstream"],
        )
        for route in self._view.table.routes:
            for upstream, share in route.split.shares.items():
                weight.add_metric([route.name, upstream], share)
        return weight

    def _mirror(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "turnout_mirror_requests_total",
            "Sampled mirror copies by outcome: sent, error, dropped, skipped.",
            labels=["route", "upstream", "outcome"],
        )
        status = CounterMetricFamily(
            "turnout_mirror_status_mismatch_total",
            "Mirror copies whose status code differed from the primary's.",
            labels=["route", "upstream"],
        )
        body = CounterMetricFamily(
            "turnout_mirror_body_mismatch_total",
            "Mirror copies whose JSON body differed from the primary's (compare_json).",
            labels=["route", "upstream"],
        )
        totals = self._view.totals.mirror
        for route in self._view.table.routes:
            if route.mirror is None:
                continue
            key = (route.name, route.mirror.to)
            mirror = totals.get(key) or MirrorTotals()
            for outcome in MIRROR_OUTCOMES:
                requests.add_metric([*key, outcome], mirror.outcomes.get(outcome, 0))
            status.add_metric(list(key), mirror.mismatch)
            body.add_metric(list(key), mirror.body_mismatch)
        yield requests
        yield status
        yield body

    def _endpoints(self) -> Iterator[Metric]:
        view = self._view
        healthy = GaugeMetricFamily(
            "turnout_endpoint_healthy",
            "1 when the endpoint passes its active health check (or has none), else 0.",
            labels=["upstream", "endpoint"],
        )
        ejected = GaugeMetricFamily(
            "turnout_endpoint_ejected",
            "1 while at least one worker has passively ejected the endpoint, else 0.",
            labels=["upstream", "endpoint"],
        )
        fail_open = CounterMetricFamily(
            "turnout_endpoint_fail_open_total",
            "Requests sent to an upstream none of whose endpoints was healthy (fail open).",
            labels=["upstream"],
        )
        for name, upstream in view.table.upstreams.items():
            for endpoint in upstream.endpoints:
                key = (name, endpoint.address)
                healthy.add_metric(list(key), 0 if key in view.down else 1)
                ejected.add_metric(list(key), 1 if key in view.totals.ejected else 0)
            fail_open.add_metric([name], view.totals.fail_open.get(name, 0))
        yield healthy
        yield ejected
        yield fail_open

    def _config(self) -> Iterator[Metric]:
        view = self._view
        reloads = CounterMetricFamily(
            "turnout_config_reloads_total",
            "Config reloads: success (a new generation) or failure (the old one stays).",
            labels=["result"],
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], view.reloads.get(result, 0))
        yield reloads
        yield GaugeMetricFamily(
            "turnout_config_generation",
            "Generation of the routing table that every worker has applied.",
            value=view.generation,
        )

    def _rollouts(self) -> Iterator[Metric]:
        view = self._view
        step = GaugeMetricFamily(
            "turnout_rollout_step",
            "Index in `steps` of the rollout's current step, per route with a rollout state.",
            labels=["route"],
        )
        for route, index in sorted(view.rollout_steps.items()):
            step.add_metric([route], index)
        yield step
        verdicts = CounterMetricFamily(
            "turnout_rollout_verdicts_total",
            "Rollout windows judged, by route and verdict (pass, fail; inconclusive too).",
            labels=["route", "verdict"],
        )
        routes = {route.name for route in view.table.routes if route.rollout is not None}
        for route in sorted(routes):
            for verdict in ("pass", "fail", "inconclusive"):
                verdicts.add_metric(
                    [route, verdict], view.rollout_verdicts.get((route, verdict), 0)
                )
        yield verdicts


def render(view: MetricsInput) -> bytes:
    """The Prometheus text exposition of one scrape (serve it with CONTENT_TYPE)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TurnoutCollector(view))
    return generate_latest(registry)
