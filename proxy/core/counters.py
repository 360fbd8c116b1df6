"""Per-worker request counters, one object per (route, upstream) bound when a table is compiled.

The data plane increments plain attributes here (no locks, no label lookups per request); the
supervisor asks each worker for `snapshot()`s over the control channel and aggregates them for
`/metrics` and the rollout controller. Pure core: no I/O, no clock (durations come in).
"""

from __future__ import annotations

from bisect import bisect_left

# Proxy latencies: sub-millisecond to a minute (contract section 7 histogram).
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    # Envoy's and Linkerd's users compare a 0.75 s SLO against this bound.
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

ERROR_KINDS: tuple[str, ...] = ("connect", "reset", "timeout", "protocol", "tls")
MIRROR_OUTCOMES: tuple[str, ...] = ("sent", "error", "dropped", "skipped")


class RouteUpstreamStats:
    """Counters of one (route, upstream) pair in one worker."""

    __slots__ = (
        "buckets",
        "codes",
        "count",
        "errors",
        "errors_5xx",
        "in_flight",
        "retries",
        "route",
        "sum",
        "upstream",
    )

    def __init__(self, route: str, upstream: str) -> None:
        self.route = route
        self.upstream = upstream
        self.codes: dict[int, int] = {}
        # One slot per bucket plus +Inf; cumulated only when exported.
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.in_flight = 0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.errors_5xx = 0
        self.retries = 0

    def observe(self, code: int, seconds: float) -> None:
        """Count one finished request with its status code and duration."""
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1
        if code >= 500:
            self.errors_5xx += 1

    def snapshot(self) -> dict[str, object]:
        """A JSON-able copy for the supervisor."""
        return {
            "route": self.route,
            "upstream": self.upstream,
            "codes": {str(code): n for code, n in self.codes.items()},
            "buckets": list(self.buckets),
            "sum": self.sum,
            "count": self.count,
            "in_flight": self.in_flight,
            "errors": dict(self.errors),
            "retries": self.retries,
        }


class MirrorStats:
    """Counters of one route's shadow traffic in one worker."""

    __slots__ = ("body_mismatch", "mismatch", "outcomes", "route", "upstream")

    def __init__(self, route: str, upstream: str) -> None:
        self.route = route
        self.upstream = upstream
        self.outcomes = dict.fromkeys(MIRROR_OUTCOMES, 0)
        # Status codes that differ; JSON bodies that differ (beyond ignored fields).
        self.mismatch = 0
        self.body_mismatch = 0

    def snapshot(self) -> dict[str, object]:
        """A JSON-able copy for the supervisor."""
        return {
            "route": self.route,
            "upstream": self.upstream,
            "outcomes": dict(self.outcomes),
            "mismatch": self.mismatch,
            "body_mismatch": self.body_mismatch,
        }
