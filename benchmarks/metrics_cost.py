"""What the metrics cost: per request on the hot path, and per scrape of /metrics.

    .venv/bin/python benchmarks/metrics_cost.py           # hot path + synthetic scrapes (~2 min)
    .venv/bin/python benchmarks/metrics_cost.py --live    # also GET /metrics on real Turnouts

Hot path: a worker counts each request with plain attribute updates on a `RouteUpstreamStats`
bound at compile time (no label lookups): the lookup of that object, in-flight +1/-1 and
`observe(code, seconds)`. Measured with timeit against an empty call with the same arguments,
so the figure is what counting adds per request, in nanoseconds.

Scrape: each worker builds its snapshot and sends it as JSON; the supervisor decodes, sums and
renders the text, and gzips it when the scraper asks (Prometheus does). "synthetic" times exactly
those steps in this process for N routes (two upstreams each) and W workers, with every pair
having seen traffic (three status codes) or none (a pair without a request has no series but its
split weight); "--live" starts Turnout with that table, sends one request to each of 20 routes,
and times whole GET /metrics round trips, plain and with `Accept-Encoding: gzip`.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib as bl
import orjson

from proxy.control.metrics import METRICS_GZIP_LEVEL, MetricsInput, Totals, render
from proxy.core.config import parse_config
from proxy.core.counters import (
    GOAWAY_REASONS,
    RouteUpstreamStats,
    WorkerSnapshot,
    read_worker_snapshot,
)
from proxy.core.table import Table, compile_table

ROUTE_COUNTS = (10, 100, 1000, 5000)
WORKER_COUNTS = (1, 4)
LIVE_ROUTE_COUNTS = (10, 100, 1000, 5000)
LIVE_WORKER_COUNTS = (2,)
SCRAPES = 10


# --- hot path -----------------------------------------------------------------------------------


def count_request(
    stats: tuple[dict[str, RouteUpstreamStats], ...], index: int, upstream: str, seconds: float
) -> None:
    """What the data plane does for the counters of one request."""
    counters = stats[index][upstream]
    counters.in_flight += 1
    counters.in_flight -= 1
    counters.observe(200, seconds)


def no_count(
    stats: tuple[dict[str, RouteUpstreamStats], ...], index: int, upstream: str, seconds: float
) -> None:
    """The same call without the counting: the baseline subtracted."""


def per_call_ns(func: Callable[..., None], args: list[tuple[Any, ...]], repeat: int = 5) -> float:
    """Best of `repeat` runs: nanoseconds per call of `func` over `args`."""

    def run() -> None:
        for arg in args:
            func(*arg)

    best = min(timeit.repeat(run, number=1, repeat=repeat))
    return best / len(args) * 1e9


def hot_path() -> None:
    stats = tuple(
        {"blue": RouteUpstreamStats(f"r{i}", "blue"), "green": RouteUpstreamStats(f"r{i}", "green")}
        for i in range(10)
    )
    # Durations spread over the buckets, so `observe`'s bisect does its usual work.
    durations = [0.0003 * (1.5 ** (i % 30)) for i in range(1000)]
    args = [
        (stats, i % 10, "blue" if i % 3 else "green", durations[i % 1000]) for i in range(200_000)
    ]
    counted = per_call_ns(count_request, args)
    baseline = per_call_ns(no_count, args)
    observe_args = [(200, s) for s in durations] * 200
    observe = per_call_ns(RouteUpstreamStats("r", "u").observe, observe_args)
    print("hot path (per request, this machine, one core):")
    print(f"  counting (lookup + in_flight +1/-1 + observe): {counted - baseline:6.0f} ns")
    print(f"  observe(code, seconds) alone, incl. call:     {observe:6.0f} ns")
    print(f"  empty call with the same arguments:           {baseline:6.0f} ns")


# --- scrape ---------------------------------------------------------------------------------------


def routes_config(routes: int) -> str:
    lines = [
        "upstreams:",
        "  blue: {endpoints: [127.0.0.1:9]}",
        "  green: {endpoints: [127.0.0.1:9]}",
        "routes:",
    ]
    lines += [
        f"  - {{name: r{i}, match: {{path_prefix: /r{i}}}, split: {{blue: 90, green: 10}}}}"
        for i in range(routes)
    ]
    return "\n".join(lines) + "\n"


def worker_snapshot(table: Table, active: bool) -> WorkerSnapshot:
    """A worker's `stats_snapshot()`: with `active`, after some traffic on every (route,
    upstream); else a fresh table's, all zeros (what most pairs of a large table look like)."""
    pairs = []
    for route in table.routes:
        for upstream in route.upstreams:
            stats = RouteUpstreamStats(route.name, upstream)
            if active:
                for n, code in enumerate((200, 404, 503)):
                    for _ in range(n + 1):
                        stats.observe(code, 0.002 * (n + 1))
            pairs.append(stats.snapshot())
    return {
        "generation": 1,
        "pid": 1,
        "routes": pairs,
        "no_route": RouteUpstreamStats("", "").snapshot(),
        "mirror": [],
        "fail_open": {},
        "h2_goaways": dict.fromkeys(GOAWAY_REASONS, 0),
        "endpoints": [],
        "connections": 0,
    }


@dataclass(frozen=True, slots=True)
class Scrape:
    """Medians of one synthetic scrape configuration."""

    worker_ms: float  # one worker: build its snapshot and encode the control message
    supervisor_ms: float  # decode, check and sum every worker's snapshot, render the text
    gzip_ms: float  # gzip the text (what a Prometheus scrape adds)
    series: int
    text_bytes: int
    gzip_bytes: int


def synthetic_scrape(routes: int, workers: int, active: bool) -> Scrape:
    table = compile_table(
        parse_config(routes_config(routes), "bench.yaml"), generation=1, sha256=""
    )
    worker_ms: list[float] = []
    supervisor_ms: list[float] = []
    gzip_ms: list[float] = []
    text = packed = b""
    for _ in range(SCRAPES):
        started = time.perf_counter()
        line = orjson.dumps({"op": "stats", "id": 1, "data": worker_snapshot(table, active)})
        worker_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        totals = Totals()
        for _ in range(workers):
            # What the supervisor does with each answer: read (check) it once, then sum it.
            totals.add_snapshot(read_worker_snapshot(orjson.loads(line)["data"]))
        text = render(
            MetricsInput(table=table, totals=totals, down=frozenset(), reloads={}, generation=1)
        )
        supervisor_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        packed = gzip.compress(text, compresslevel=METRICS_GZIP_LEVEL, mtime=0)
        gzip_ms.append((time.perf_counter() - started) * 1e3)
    return Scrape(
        worker_ms=statistics.median(worker_ms),
        supervisor_ms=statistics.median(supervisor_ms),
        gzip_ms=statistics.median(gzip_ms),
        series=sum(1 for row in text.splitlines() if not row.startswith(b"#")),
        text_bytes=len(text),
        gzip_bytes=len(packed),
    )


def scrape_table() -> None:
    print()
    print("scrape, synthetic (median of", SCRAPES, "scrapes; pairs: all saw traffic, or none):")
    print(
        "  routes  workers  pairs   series      bytes  gzip bytes"
        "  worker ms  supervisor ms  gzip ms"
    )
    for routes in ROUTE_COUNTS:
        for workers in WORKER_COUNTS:
            for active in (True, False):
                r = synthetic_scrape(routes, workers, active)
                print(
                    f"  {routes:6d}  {workers:7d}  {'all' if active else 'none':5s}"
                    f"  {r.series:6d}  {r.text_bytes:9d}  {r.gzip_bytes:10d}"
                    f"  {r.worker_ms:9.1f}  {r.supervisor_ms:13.1f}  {r.gzip_ms:7.1f}"
                )


# --- live -----------------------------------------------------------------------------------------


def get_metrics(admin_port: int, accept_encoding: str) -> tuple[float, int]:
    """One GET /metrics: (ms, bytes of the body as sent)."""
    conn = http.client.HTTPConnection(bl.LOOPBACK, admin_port, timeout=30)
    try:
        started = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Accept-Encoding": accept_encoding})
        response = conn.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - started) * 1e3
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"/metrics answered {response.status}")
    return elapsed, len(body)


def live_scrapes(routes: int, workers: int, folder: Path) -> dict[str, tuple[float, int]]:
    """Median ms and size of GET /metrics, plain and gzip, on a real Turnout with `routes`
    routes; 20 of them got a request first (the rest are pairs that never saw one)."""
    port, admin_port = bl.free_port(), bl.free_port()
    text = f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin_port}\nworkers: {workers}\n"
    config = folder / f"live-{routes}-{workers}.yaml"
    config.write_text(text + routes_config(routes))
    proc = bl.Proc(
        "turnout",
        [sys.executable, "-m", "proxy", "run", str(config), "--no-access-log"],
        folder / f"live-{routes}-{workers}.log",
    )
    try:
        bl.wait_for_turnout(proc, port, admin_port, "/r0", 60.0)
        for i in range(min(routes, 20)):
            bl.http_status(port, f"/r{i}")
        results = {}
        for encoding in ("identity", "gzip"):
            runs = [get_metrics(admin_port, encoding) for _ in range(SCRAPES)]
            results[encoding] = (statistics.median(ms for ms, _ in runs), runs[-1][1])
        return results
    finally:
        proc.stop()


def live_table() -> None:
    print()
    print("scrape, live GET /metrics (median of", SCRAPES, "scrapes; 20 routes got a request):")
    print("  routes  workers  plain ms  plain bytes  gzip ms  gzip bytes")
    with tempfile.TemporaryDirectory(prefix="turnout-metrics-") as folder:
        for routes in LIVE_ROUTE_COUNTS:
            for workers in LIVE_WORKER_COUNTS:
                r = live_scrapes(routes, workers, Path(folder))
                (plain_ms, plain_bytes), (gzip_ms, gzip_bytes) = r["identity"], r["gzip"]
                print(
                    f"  {routes:6d}  {workers:7d}  {plain_ms:8.1f}  {plain_bytes:11d}"
                    f"  {gzip_ms:7.1f}  {gzip_bytes:10d}"
                )


def main(argv: list[str] | None = None) -> int:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", action="store_true", help="also scrape real Turnout processes")
    args = parser.parse_args(argv)
    hot_path()
    scrape_table()
    if args.live:
        live_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
