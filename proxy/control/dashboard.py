"""The dashboard: a page on the admin port that shows and drives every route (docs/dashboard.md).

`GET /` serves a static page (`proxy/control/static/`: HTML, CSS, JS; nothing from the
internet). The
page and its assets carry no data, so they are served without the admin token; everything
they show comes from calls that need it like every other admin call: `GET /admin/routes` (splits
and rollouts), `GET /admin/stats` (below) and the admin API's own `PUT`/`DELETE .../split` and
`POST .../rollout/...` for the buttons. The page keeps the token in the tab's sessionStorage.

`GET /admin/stats` answers the cumulative counters of every (route, upstream) of the table in
force: requests, 5xx answers, errors as a rollout counts them (5xx and gRPC error statuses)
and the latency histogram, the same counters `/metrics` renders.
They are the supervisor's latest background poll of the workers (about once a second), read
as they are: a page that refreshes costs the data plane nothing. The page computes rates,
error shares and p99 from the differences between two answers, as Prometheus's `rate` and
`histogram_quantile` would.

Not imported by the pure core; imports nothing from `proxy.control.admin` (which wires it in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from importlib import resources
from typing import Any, Protocol

import orjson
from aiohttp import web

from proxy.control.metrics import PairTotals, Totals
from proxy.core.counters import DURATION_BUCKETS
from proxy.core.table import Table

# Served path -> (file in proxy/control/static/, content type); all UTF-8.
ASSETS: Mapping[str, tuple[str, str]] = {
    "/": ("dashboard.html", "text/html"),
    "/dashboard.css": ("dashboard.css", "text/css"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
# The admin token middleware lets these through: static files, no data (see the docstring).
PAGE_PATHS = frozenset(ASSETS)

# The page may run only its own files, talk only to this origin, and never sit in a frame (its
# buttons change where traffic goes: no clickjacking).
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # An upgraded Turnout must serve its own page, not the browser's copy of the old one.
    "Cache-Control": "no-cache",
}


class DashboardBackend(Protocol):
    """What the dashboard needs from the supervisor."""

    @property
    def table(self) -> Table:
        """The routing table in force."""
        ...

    def polled_totals(self) -> tuple[Totals, float]:
        """The counters as of the latest poll, without asking the workers anything new.

        Every live worker's newest snapshot summed with the retired totals (what `/metrics`
        renders), and the loop time (`asyncio` clock) at which the newest snapshot arrived; 0.0
        when no worker has answered yet.
        """
        ...


def _load_asset(name: str) -> bytes:
    return resources.files("proxy.control").joinpath("static", name).read_bytes()


def _pair_json(pair: PairTotals | None) -> dict[str, Any]:
    if pair is None or not pair.count:
        # Most pairs of a large table never see a request: no buckets full of zeros for them.
        return {"requests": 0, "errors_5xx": 0, "errors": 0, "buckets": []}
    return {
        "requests": pair.count,
        "errors_5xx": sum(n for code, n in pair.codes.items() if code >= 500),
        "errors": pair.error_responses,
        "buckets": list(pair.buckets),
    }


def stats_answer(table: Table, totals: Totals, polled: float, now: float) -> dict[str, Any]:
    """The body of `GET /admin/stats` (docs/dashboard.md describes every key).

    `polled` is the loop time of the newest snapshot in `totals` (0.0: none yet), `now` the
    loop time of the answer.
    """
    pairs = totals.pairs
    return {
        "generation": table.generation,
        # Monotonic, so two answers give the exact time between their polls (an unchanged
        # poll gives the same value twice): the page's rates divide by it.
        "poll_time": polled if polled > 0.0 else None,
        "poll_age": round(now - polled, 3) if polled > 0.0 else None,
        "le": list(DURATION_BUCKETS),
        "routes": [
            {
                "name": route.name,
                "upstreams": [
                    {"name": upstream, **_pair_json(pairs.get((route.name, upstream)))}
                    for upstream in route.upstreams
                ],
            }
            for route in table.routes
        ],
    }


def add_dashboard_routes(app: web.Application, backend: DashboardBackend) -> None:
    """`GET /` (the page), its assets, and `GET /admin/stats` (the page's counters).

    The assets are read once, here: a missing file is an error at start, not at the first view.
    """
    bodies = {path: (_load_asset(name), kind) for path, (name, kind) in ASSETS.items()}

    async def asset(request: web.Request) -> web.Response:
        body, kind = bodies[request.path]
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=SECURITY_HEADERS)

    async def stats(request: web.Request) -> web.Response:
        totals, polled = backend.polled_totals()
        now = asyncio.get_running_loop().time()
        body = orjson.dumps(stats_answer(backend.table, totals, polled, now))
        return web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    for path in ASSETS:
        app.router.add_get(path, asset)
    app.router.add_get("/admin/stats", stats)
