"""What the metrics cost: per request on the hot path, and per scrape of /metrics.

    .venv/bin/python benchmarks/metrics_cost.py           # hot path + synthetic scrapes (~20 s)
    .venv/bin/python benchmarks/metrics_cost.py --live    # also GET /metrics on real Turnouts

Hot path: a worker counts each request with plain attribute updates on a `RouteUpstreamStats`
bound at compile time (no label lookups): the lookup of that object, in-flight +1/-1 and
`observe(code, seconds)`. Measured with timeit against an empty call with the same arguments,
so the figure is what counting adds per request, in nanoseconds.

Scrape: each worker builds its snapshot and sends it as JSON; the supervisor decodes, sums and
renders the text. "synthetic" times exactly those steps in this process for N routes (two
upstreams each, three status codes seen) and W workers; "--live" starts Turnout with that table
(no traffic: every series is there, at zero) and times whole GET /metrics round trips.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib as bl
import orjson

from proxy.config import parse_config
from proxy.metrics import MetricsInput, Totals, render
from proxy.stats import RouteUpstreamStats
from proxy.table import Table, compile_table

ROUTE_COUNTS = (10, 100, 1000)
WORKER_COUNTS = (1, 2, 4, 8)
LIVE_ROUTE_COUNTS = (10, 100, 1000)
LIVE_WORKER_COUNTS = (1, 2)
SCRAPES = 20


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


def worker_snapshot(table: Table) -> dict[str, Any]:
    """A worker's `stats_snapshot()` after some traffic on every (route, upstream)."""
    pairs = []
    for route in table.routes:
        for upstream in route.upstreams:
            stats = RouteUpstreamStats(route.name, upstream)
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
        "endpoints": [],
        "connections": 0,
    }


def synthetic_scrape(routes: int, workers: int) -> tuple[float, float, int, int]:
    """(ms in one worker for its snapshot, ms in the supervisor, lines, bytes), medians."""
    table = compile_table(
        parse_config(routes_config(routes), "bench.yaml"), generation=1, sha256=""
    )
    worker_ms: list[float] = []
    supervisor_ms: list[float] = []
    text = b""
    for _ in range(SCRAPES):
        started = time.perf_counter()
        line = orjson.dumps({"op": "stats", "id": 1, "data": worker_snapshot(table)})
        worker_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        totals = Totals()
        for _ in range(workers):
            totals.add_snapshot(orjson.loads(line)["data"])
        text = render(
            MetricsInput(table=table, totals=totals, down=frozenset(), reloads={}, generation=1)
        )
        supervisor_ms.append((time.perf_counter() - started) * 1e3)
    lines = sum(1 for row in text.splitlines() if not row.startswith(b"#"))
    return statistics.median(worker_ms), statistics.median(supervisor_ms), lines, len(text)


def scrape_table() -> None:
    print()
    print("scrape, synthetic (median of", SCRAPES, "scrapes):")
    print("  routes  workers  series    bytes  worker ms  supervisor ms")
    for routes in ROUTE_COUNTS:
        for workers in WORKER_COUNTS:
            worker, supervisor, lines, size = synthetic_scrape(routes, workers)
            sizes = f"{routes:6d}  {workers:7d}  {lines:6d}  {size:7d}"
            print(f"  {sizes}  {worker:9.2f}  {supervisor:13.2f}")


# --- live -----------------------------------------------------------------------------------------


def live_scrape_ms(routes: int, workers: int, folder: Path) -> float:
    """Median ms of GET /metrics against a real Turnout with `routes` routes."""
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
        bl.wait_for_turnout(proc, port, admin_port, "/r0", 30.0)
        timings = []
        for _ in range(SCRAPES):
            conn = http.client.HTTPConnection(bl.LOOPBACK, admin_port, timeout=10)
            started = time.perf_counter()
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            response.read()
            timings.append((time.perf_counter() - started) * 1e3)
            conn.close()
            if response.status != 200:
                raise RuntimeError(f"/metrics answered {response.status}")
        return statistics.median(timings)
    finally:
        proc.stop()


def live_table() -> None:
    print()
    print("scrape, live GET /metrics (median of", SCRAPES, "scrapes):")
    print("  routes  workers  ms")
    with tempfile.TemporaryDirectory(prefix="turnout-metrics-") as folder:
        for routes in LIVE_ROUTE_COUNTS:
            for workers in LIVE_WORKER_COUNTS:
                ms = live_scrape_ms(routes, workers, Path(folder))
                print(f"  {routes:6d}  {workers:7d}  {ms:6.1f}")


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
