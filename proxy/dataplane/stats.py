"""A worker's counters: made for each table (carried over for what stays) and read out as the
snapshot the supervisor asks for (`proxy.core.counters.read_worker_snapshot` reads it back).

The data plane counts into the generation's own objects (`Generation.stats`, `.no_route`,
`.mirror_stats`), so a request never looks a counter up by name; a new table gets new objects
only for the pairs it adds, so cumulative counts survive reloads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from proxy.core.counters import GOAWAY_REASONS, MirrorStats, RouteUpstreamStats, WorkerSnapshot
from proxy.core.table import Table
from proxy.dataplane.http1 import Generation
from proxy.dataplane.upstream import EndpointPool

RouteCounters = tuple[dict[str, RouteUpstreamStats], ...]
MirrorCounters = tuple[MirrorStats | None, ...]


class WorkerStats:
    """What a worker counts apart from a generation (fail-open picks, HTTP/2 GOAWAYs), and the
    two jobs above."""

    def __init__(self) -> None:
        # Upstream -> how often none of its endpoints was healthy and all were tried anyway.
        self.fail_open: dict[str, int] = {}
        # Reason -> downstream HTTP/2 connections closed with GOAWAY for it.
        self.h2_goaways = dict.fromkeys(GOAWAY_REASONS, 0)

    def count_fail_open(self, upstream: str) -> None:
        """No endpoint of `upstream` was healthy: all were tried anyway."""
        self.fail_open[upstream] = self.fail_open.get(upstream, 0) + 1

    def count_h2_goaway(self, reason: str) -> None:
        """A downstream HTTP/2 connection was closed with GOAWAY for `reason` (one of
        `GOAWAY_REASONS`; anything else counts as "other")."""
        goaways = self.h2_goaways
        if reason not in goaways:
            reason = "other"
        goaways[reason] += 1

    @staticmethod
    def carry(
        old: Generation | None, table: Table
    ) -> tuple[RouteCounters, RouteUpstreamStats, MirrorCounters]:
        """The counters of `table`: per route and upstream, no route, and per mirror; those of
        pairs `old` already had are the same objects."""
        carried: dict[tuple[str, str], RouteUpstreamStats] = {}
        if old is not None:
            for per_route in old.stats:
                for counters in per_route.values():
                    carried[(counters.route, counters.upstream)] = counters
        stats = tuple(
            {
                upstream: carried.get((route.name, upstream))
                or RouteUpstreamStats(route.name, upstream)
                for upstream in route.upstreams
            }
            for route in table.routes
        )
        no_route = old.no_route if old is not None else RouteUpstreamStats("", "")
        carried_mirror: dict[tuple[str, str], MirrorStats] = {}
        if old is not None:
            for shadow in old.mirror_stats:
                if shadow is not None:
                    carried_mirror[(shadow.route, shadow.upstream)] = shadow
        mirror_stats = tuple(
            (
                carried_mirror.get((route.name, route.mirror.to))
                or MirrorStats(route.name, route.mirror.to)
            )
            if route.mirror is not None
            else None
            for route in table.routes
        )
        return stats, no_route, mirror_stats

    def snapshot(
        self, gen: Generation, endpoints: Iterable[EndpointPool], connections: int
    ) -> WorkerSnapshot:
        """This worker's counters for the supervisor (only series of the current table)."""
        # Pairs that never saw a request are left out (the supervisor counts them as zero):
        # a 5,000-route table mostly idle costs little to poll every second.
        routes = [
            s.snapshot()
            for per_route in gen.stats
            for s in per_route.values()
            if s.count or s.in_flight or s.retries or any(s.errors.values())
        ]
        return {
            "generation": gen.table.generation,
            "pid": os.getpid(),
            "routes": routes,
            "no_route": gen.no_route.snapshot(),
            "mirror": [m.snapshot() for m in gen.mirror_stats if m is not None],
            "fail_open": dict(self.fail_open),
            "h2_goaways": dict(self.h2_goaways),
            "endpoints": [
                {
                    "upstream": pool.upstream,
                    "endpoint": pool.address,
                    "healthy": pool.healthy,
                    "active_up": pool.active_up,
                    "ejected": bool(pool.ejection.until),
                    "in_flight": pool.in_flight,
                }
                for pool in endpoints
            ],
            "connections": connections,
        }
