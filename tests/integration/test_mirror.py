"""Shadow traffic through a real Turnout (contract section 3): copies are faithful, bounded, and
never touch the primary.

One Turnout serves every test here, with one route per scenario (`/full`, `/cmp`, `/capped`,
...), all sending primary traffic to `blue` and mirroring to shadows defined in this file: a
recording service, one that sleeps 2 s, one that holds requests until told, one that resets
mid-response, and a port nobody listens on. Requests carry their own `X-Request-Id`, which
Turnout passes to the primary and to the copy, so each test finds its own requests in what the
shadows saw and in the access log.

Turnout here is one worker's data plane in-process (tests.support.inprocess). Tests assert on
what the shadows received, on the access log's `mirrored` field, on the `turnout.mirror` log
lines, and on the mirror series of `/metrics` as the supervisor renders them from the worker's
counters (`turnout_mirror_requests_total`, `..._status_mismatch_total`,
`..._body_mismatch_total`). The last tests drive a `Mirrorer` directly, as the data plane does,
and assert every counter exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

import proxy.dataplane.mirror
from proxy.core.counters import MirrorStats
from proxy.core.spec import ConfigSpec, Endpoint, Mirror, RouteSpec, UpstreamSpec
from proxy.core.table import CompiledRoute, compile_table
from proxy.dataplane.mirror import REST_AFTER, Mirrorer
from tests.support import async_wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.turnout import free_port
from tests.support.upstreams import UpstreamHost, pattern_bytes, pattern_chunks, read_request

KIB = 1024
HOLD_BOUND = 4
LATENCY_REQUESTS = 400
LATENCY_CONCURRENCY = 10
SAMPLE_REQUESTS = 2000
SAMPLE_CONCURRENCY = 20

pytestmark = pytest.mark.timeout(180)


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request a `Service` read to the end."""

    method: str
    target: str  # raw path and query, as on the request line
    headers: list[tuple[str, str]]
    body_len: int
    body_sha256: str

    def header_values(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    @property
    def request_id(self) -> str:
        values = self.header_values("x-request-id")
        return values[0] if values else ""


ServiceMode = Literal["answer", "sleep", "hold"]


class Service:
    """An aiohttp service used as the primary and as shadows.

    It reads each body to the end, records the request, then answers JSON: a fixed part
    (`service`, `target`, `body_sha256`, `value`) and volatile fields (`id`, `at`,
    `items[].id`) that differ on every answer. Query parameters `status_<name>=<code>` and
    `value_<name>=<text>` change this service's status or `value`, so one request can make the
    shadow differ from the primary. Mode `sleep` answers after `sleep_s`; mode `hold` answers
    once `release()` is called. `active` / `max_active` count requests being handled.
    """

    def __init__(self, name: str, mode: ServiceMode = "answer", sleep_s: float = 2.0) -> None:
        self.name = name
        self.mode: ServiceMode = mode
        self.sleep_s = sleep_s
        self.port = 0
        self.seen: list[Seen] = []
        self.active = 0
        self.max_active = 0
        self._released: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._released = asyncio.Event()
        app = web.Application(client_max_size=16 * 1024 * KIB)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._released is not None:
            self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def release(self) -> None:
        """Let held requests answer (and answer the next ones at once)."""
        assert self._released is not None
        self._released.set()

    async def hold_again(self) -> None:
        assert self._released is not None
        self._released.clear()

    def by_id(self, prefix: str) -> list[Seen]:
        """Requests whose X-Request-Id starts with `prefix`."""
        return [seen for seen in list(self.seen) if seen.request_id.startswith(prefix)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            digest = hashlib.sha256()
            length = 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                length += len(chunk)
            self.seen.append(
                Seen(
                    request.method,
                    request.raw_path,
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                    length,
                    digest.hexdigest(),
                )
            )
            if self.mode == "sleep":
                await asyncio.sleep(self.sleep_s)
            elif self.mode == "hold":
                assert self._released is not None
                await self._released.wait()
            query = request.query
            body = {
                "service": self.name,
                "target": request.raw_path,
                "body_sha256": digest.hexdigest(),
                "value": query.get(f"value_{self.name}", "same"),
                "id": uuid.uuid4().hex,
                "at": time.time(),
                "items": [{"id": uuid.uuid4().hex, "n": 1}, {"id": uuid.uuid4().hex, "n": 2}],
            }
            return web.Response(
                status=int(query.get(f"status_{self.name}", "200")),
                body=orjson.dumps(body),
                content_type="application/json",
            )
        finally:
            self.active -= 1


class ResetShadow:
    """Reads a request, starts a response, then resets the connection (SO_LINGER 0)."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await read_request(reader) is None:
                writer.close()
                return
            self.requests += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"partial": '
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


@dataclass
class Shadows:
    """The primary (`blue`) and the shadows; the shadows run on their own thread (`host`) so
    that their work never queues the primary's requests behind it on one event loop."""

    host: UpstreamHost
    blue: Service
    rec: Service
    sleeper: Service
    holder: Service
    resetter: ResetShadow
    closed_port: int


@pytest.fixture(scope="module")
def shadows(upstream_host: UpstreamHost) -> Iterator[Shadows]:
    servers = Shadows(
        host=UpstreamHost(),
        blue=Service("blue"),
        rec=Service("rec"),
        sleeper=Service("sleeper", "sleep", sleep_s=2.0),
        holder=Service("holder", "hold"),
        resetter=ResetShadow(),
        closed_port=free_port(),
    )
    started: list[tuple[UpstreamHost, Service | ResetShadow]] = []
    try:
        upstream_host.call(servers.blue.start())
        started.append((upstream_host, servers.blue))
        for server in (servers.rec, servers.sleeper, servers.holder, servers.resetter):
            servers.host.call(server.start())
            started.append((servers.host, server))
        yield servers
    finally:
        for host, running in started:
            host.call(running.stop())
        servers.host.close()


def route(name: str, mirror: dict[str, Any] | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "split": {"blue": 100},
    }
    if mirror is not None:
        found["mirror"] = mirror
    return found


@pytest.fixture(scope="module")
def turnout(shadows: Shadows) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        "workers": 1,
        "upstreams": {
            "blue": {"endpoints": [shadows.blue.address]},
            "rec": {"endpoints": [shadows.rec.address]},
            "sleeper": {"endpoints": [shadows.sleeper.address]},
            "holder": {"endpoints": [shadows.holder.address]},
            "resetter": {"endpoints": [shadows.resetter.address]},
            "closed": {"endpoints": [f"127.0.0.1:{shadows.closed_port}"]},
        },
        "routes": [
            route("off"),
            # Bound above the latency run's 400 requests: under CI load copies can pile up, and a
            # drop here would be right (the bound has its own test) but not what this run checks.
            route("full", {"to": "rec", "max_in_flight": 1000}),
            route(
                "cmp",
                {
                    "to": "rec",
                    "compare_json": True,
                    # `service` names who answered: it always differs, by design of the test.
                    "ignore_fields": ["service", "id", "at", "items[].id"],
                },
            ),
            route("capped", {"to": "rec", "max_body": "64KiB"}),
            route("getonly", {"to": "rec", "methods": ["GET"]}),
            route("sample", {"to": "rec", "percent": 20}),
            route("slow", {"to": "sleeper"}),
            route("closed", {"to": "closed", "timeout": "2s"}),
            route("reset", {"to": "resetter"}),
            route("held", {"to": "holder", "max_in_flight": HOLD_BOUND, "timeout": "60s"}),
        ],
    }
    with start_inprocess(config, access_log=True) as process:
        yield process


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=SAMPLE_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


# -- helpers ---------------------------------------------------------------------------------


def new_tag() -> str:
    return uuid.uuid4().hex[:12]


def mirrored_flags(turnout: InProcessTurnout, prefix: str) -> dict[str, bool]:
    """The access log's `mirrored` field of every request whose id starts with `prefix`."""
    return {
        str(entry["request_id"]): bool(entry["mirrored"])
        for entry in turnout.access_log()
        if str(entry.get("request_id", "")).startswith(prefix)
    }


async def wait_logged(turnout: InProcessTurnout, prefix: str, count: int) -> dict[str, bool]:
    found: dict[str, bool] = {}

    def done() -> bool:
        found.update(mirrored_flags(turnout, prefix))
        return len(found) >= count

    await async_wait_until(done, seconds=15, what=f"{count} access-log lines for {prefix}")
    return found


_SAMPLE = re.compile(r"^([a-z_]+)\{([^}]*)\} ([0-9.eE+-]+)$")


Metrics = dict[tuple[str, str, str], float]


def mirror_metrics(turnout: InProcessTurnout) -> Metrics:
    """Mirror series from /metrics as {(name, route, outcome or ""): value}."""
    text = turnout.metrics_text()
    found: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or not match.group(1).startswith("turnout_mirror_"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        key = (match.group(1), labels.get("route", ""), labels.get("outcome", ""))
        found[key] = float(match.group(3))
    return found


def outcome(metrics: Metrics, route_name: str, kind: str) -> float:
    return metrics.get(("turnout_mirror_requests_total", route_name, kind), 0.0)


def series(metrics: Metrics, name: str, route_name: str, kind: str = "") -> float:
    """One counter (0 when absent)."""
    return metrics.get((f"turnout_mirror_{name}", route_name, kind), 0.0)


async def expect_metrics(
    turnout: InProcessTurnout, what: str, check: Callable[[Metrics], bool]
) -> None:
    """Wait until `check` holds on /metrics (copies settle after the primary answered, so
    counters may lag a little)."""
    await async_wait_until(lambda: check(mirror_metrics(turnout)), what=what)


async def fetch(
    client: aiohttp.ClientSession,
    turnout: InProcessTurnout,
    method: str,
    target: str,
    request_id: str,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], float]:
    """One request through Turnout: status, JSON body and seconds taken."""
    sent = {"X-Request-Id": request_id, **(headers or {})}
    url = f"{turnout.url}{target}"
    began = time.perf_counter()
    async with client.request(method, URL(url, encoded=True), headers=sent, data=data) as response:
        body = await response.read()
        took = time.perf_counter() - began
        return response.status, orjson.loads(body) if body else {}, took


def expect_primary(status: int, body: dict[str, Any], target: str) -> None:
    """The client got blue's own answer to this very request."""
    assert status == 200, body
    assert body["service"] == "blue"
    assert body["target"] == target


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# -- faithful copies -------------------------------------------------------------------------


def comparable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header lines minus framing and the mirror marker, for comparing primary and copy."""
    skip = {"content-length", "transfer-encoding", "x-turnout-mirror"}
    return sorted((name.lower(), value) for name, value in headers if name.lower() not in skip)


async def chunked_body(parts: int, size: int) -> AsyncIterator[bytes]:
    for chunk in pattern_chunks(parts * size, seed="chunked"):
        yield chunk


BODIES = {
    "get": ("GET", None),
    "small-post": ("POST", b'{"hello": "shadow"}'),
    "put-512KiB": ("PUT", pattern_bytes(512 * KIB, seed="512")),
    "chunked-post": ("POST", "chunked"),
    "delete": ("DELETE", None),
}


@pytest.mark.parametrize("kind", list(BODIES))
async def test_copy_is_identical(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession, kind: str
) -> None:
    method, payload = BODIES[kind]
    request_id = f"same-{kind}-{new_tag()}"
    target = "/full/p%41th/%2Fx?b=2&a=1&c=x%20y&empty="
    # Both copies get the path in normal form (unreserved escapes decoded, %2F kept) and the
    # query byte for byte.
    forwarded = "/full/pAth/%2Fx?b=2&a=1&c=x%20y&empty="
    data: Any = chunked_body(8, 64 * KIB) if payload == "chunked" else payload
    status, body, _ = await fetch(
        client,
        turnout,
        method,
        target,
        request_id,
        data=data,
        headers={"X-Custom": "one", "Cookie": "a=1; b=2", "traceparent": "00-abc-def-01"},
    )
    expect_primary(status, body, forwarded)
    await async_wait_until(
        lambda: len(shadows.rec.by_id(request_id)) == 1, what=f"the copy of {request_id}"
    )
    (primary,) = shadows.blue.by_id(request_id)
    (copy,) = shadows.rec.by_id(request_id)
    print(f"\n{kind}: {copy.body_len} bytes, sha256 {copy.body_sha256[:16]}")
    assert copy.method == primary.method == method
    assert copy.target == primary.target == forwarded
    assert copy.body_sha256 == primary.body_sha256
    assert copy.body_len == primary.body_len
    assert copy.header_values("X-Turnout-Mirror") == ["1"]
    assert primary.header_values("X-Turnout-Mirror") == []
    assert comparable(copy.headers) == comparable(primary.headers)
    if kind == "put-512KiB":
        assert copy.header_values("Content-Length") == [str(512 * KIB)]
    flags = await wait_logged(turnout, request_id, 1)
    assert flags == {request_id: True}


async def test_client_mirror_marker_is_not_passed_twice(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    request_id = f"marker-{new_tag()}"
    status, body, _ = await fetch(
        client, turnout, "GET", "/full/m", request_id, headers={"X-Turnout-Mirror": "spoofed"}
    )
    expect_primary(status, body, "/full/m")
    await async_wait_until(lambda: len(shadows.rec.by_id(request_id)) == 1, what="the copy")
    (copy,) = shadows.rec.by_id(request_id)
    assert copy.header_values("X-Turnout-Mirror") == ["1"]


# -- the primary never notices the shadow ------------------------------------------------------


async def run_load(
    client: aiohttp.ClientSession,
    turnout: InProcessTurnout,
    route_name: str,
    prefix: str,
    count: int,
    concurrency: int,
) -> list[float]:
    """`count` GETs (and some POSTs) on `route_name`, `concurrency` at a time; every answer
    checked; the latencies."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            target = f"/{route_name}/item/{index}?q={index}"
            data = f"body-{index}".encode() if index % 4 == 0 else None
            method = "POST" if data is not None else "GET"
            status, body, took = await fetch(
                client, turnout, method, target, f"{prefix}{index}", data=data
            )
            expect_primary(status, body, target)
            if data is not None:
                assert body["body_sha256"] == hashlib.sha256(data).hexdigest()
            latencies.append(took)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert len(latencies) == count
    return latencies


async def test_faulty_shadows_never_touch_the_primary(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    tag = new_tag()
    # Warm both paths first (connections, and the worker's first copy), so the figures are of
    # the steady state.
    await run_load(client, turnout, "off", f"warm-off-{tag}-", 100, LATENCY_CONCURRENCY)
    await run_load(client, turnout, "full", f"warm-full-{tag}-", 20, LATENCY_CONCURRENCY)
    scenarios = [
        ("off", "mirror off"),
        ("full", "healthy shadow"),
        ("slow", "hung shadow (2 s)"),
        ("closed", "closed port"),
        ("reset", "reset mid-response"),
    ]
    figures: dict[str, tuple[float, float, float]] = {}
    for route_name, label in scenarios:
        # Each run starts with the shadows idle: copies of the previous run must not land in it.
        await async_wait_until(
            lambda: shadows.sleeper.active == 0 and shadows.rec.active == 0,
            what="idle shadows",
        )
        prefix = f"lat-{route_name}-{tag}-"
        latencies = await run_load(
            client, turnout, route_name, prefix, LATENCY_REQUESTS, LATENCY_CONCURRENCY
        )
        flags = await wait_logged(turnout, prefix, LATENCY_REQUESTS)
        # Turnout's own view (access log `duration_ms`) beside the client's: the difference is
        # time spent in this test process and the fake upstreams, which share its CPUs.
        inside = [
            float(entry["duration_ms"]) / 1000.0
            for entry in turnout.access_log()
            if str(entry.get("request_id", "")).startswith(prefix)
        ]
        figures[label] = (sorted(latencies)[len(latencies) // 2], p99(latencies), p99(inside))
        if route_name == "off":
            assert not any(flags.values())
        else:
            assert any(flags.values())
        if route_name == "full":
            assert all(flags.values())
    print(f"\nprimary latency, {LATENCY_REQUESTS} requests at concurrency {LATENCY_CONCURRENCY}:")
    print(f"  {'':<20} {'client p50':>10} {'client p99':>10} {'proxy p99':>10}  (ms)")
    for label, (median, tail, proxy_tail) in figures.items():
        print(f"  {label:<20} {median * 1000:10.2f} {tail * 1000:10.2f} {proxy_tail * 1000:10.2f}")

    await async_wait_until(
        lambda: len(shadows.rec.by_id(f"lat-full-{tag}-")) == LATENCY_REQUESTS,
        what="every copy of the healthy-shadow run",
    )
    assert len(shadows.sleeper.by_id(f"lat-slow-{tag}-")) > 0
    assert shadows.resetter.requests > 0
    # The closed port and the resetting shadow rest after a few failed copies instead of
    # costing the worker a connection per copy.
    stderr = turnout.stderr_text()
    assert f"shadow endpoint 127.0.0.1:{shadows.closed_port} failed" in stderr
    assert f"shadow endpoint {shadows.resetter.address} failed" in stderr
    await expect_metrics(
        turnout,
        "every closed-port copy counted as error (or dropped)",
        lambda m: (
            outcome(m, "closed", "error") + outcome(m, "closed", "dropped") == LATENCY_REQUESTS
        ),
    )
    await expect_metrics(
        turnout,
        "reset copies counted as error, none as sent",
        lambda m: outcome(m, "reset", "error") > 0 and outcome(m, "reset", "sent") == 0,
    )


# -- sampling, caps, bounds ------------------------------------------------------------------


async def test_percent_samples_a_share(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    prefix = f"pct-{new_tag()}-"
    await run_load(client, turnout, "sample", prefix, SAMPLE_REQUESTS, SAMPLE_CONCURRENCY)
    flags = await wait_logged(turnout, prefix, SAMPLE_REQUESTS)
    mirrored = sum(flags.values())
    await async_wait_until(
        lambda: len(shadows.rec.by_id(prefix)) == mirrored, what="every sampled copy"
    )
    share = 100.0 * len(shadows.rec.by_id(prefix)) / SAMPLE_REQUESTS
    print(f"\nmirrored {share:.1f}% of {SAMPLE_REQUESTS} requests (percent: 20)")
    assert 17.0 <= share <= 23.0
    assert {seen.request_id for seen in shadows.rec.by_id(prefix)} == {
        request_id for request_id, flag in flags.items() if flag
    }


async def test_method_not_listed_is_not_sent(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    prefix = f"methods-{new_tag()}-"
    status, body, _ = await fetch(client, turnout, "POST", "/getonly/x", f"{prefix}post", b"x")
    expect_primary(status, body, "/getonly/x")
    status, body, _ = await fetch(client, turnout, "GET", "/getonly/y", f"{prefix}get")
    expect_primary(status, body, "/getonly/y")
    await async_wait_until(lambda: len(shadows.rec.by_id(prefix)) == 1, what="the GET copy")
    assert [seen.method for seen in shadows.rec.by_id(prefix)] == ["GET"]


async def test_over_cap_bodies_are_skipped(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    prefix = f"cap-{new_tag()}-"
    before = mirror_metrics(turnout)
    under = pattern_bytes(60 * KIB, seed="under")
    over = pattern_bytes(100 * KIB, seed="over")
    cases: list[tuple[str, Any]] = [
        ("under", under),
        ("over-length", over),
        ("over-chunked", chunked_body(4, 32 * KIB)),
    ]
    for name, data in cases:
        status, body, _ = await fetch(client, turnout, "POST", "/capped/u", prefix + name, data)
        expect_primary(status, body, "/capped/u")
        if name == "over-length":
            assert body["body_sha256"] == hashlib.sha256(over).hexdigest()
    await async_wait_until(lambda: len(shadows.rec.by_id(prefix)) >= 1, what="the small copy")
    flags = await wait_logged(turnout, prefix, len(cases))
    # Known too large up front: no copy starts. Chunked: the copy starts, and is given up
    # when the body crosses the cap, before the shadow has a whole request.
    assert flags[prefix + "under"] is True
    assert flags[prefix + "over-length"] is False
    (copy,) = shadows.rec.by_id(prefix)
    assert copy.request_id == prefix + "under"
    assert copy.body_sha256 == hashlib.sha256(under).hexdigest()
    skipped = series(before, "requests_total", "capped", "skipped")
    await expect_metrics(
        turnout,
        "two over-cap copies skipped",
        lambda m: outcome(m, "capped", "skipped") - skipped == 2,
    )


async def test_in_flight_bound_holds_under_a_burst(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    holder = shadows.holder
    host = shadows.host
    host.call(holder.hold_again())
    burst = 40
    try:
        for round_number in range(2):
            prefix = f"burst{round_number}-{new_tag()}-"
            latencies = await run_load(client, turnout, "held", prefix, burst, burst)
            # Every primary answered while the shadow holds every copy it got.
            await async_wait_until(
                lambda: holder.active == HOLD_BOUND, what=f"{HOLD_BOUND} held copies"
            )
            flags = await wait_logged(turnout, prefix, burst)
            print(
                f"\nburst {round_number}: {burst} requests, {sum(flags.values())} mirrored, "
                f"primary p99 {p99(latencies) * 1000:.2f} ms with every copy held"
            )
            assert sum(flags.values()) == HOLD_BOUND
            assert holder.max_active == HOLD_BOUND
            # Free the slots; the next round must get its copies through again.
            host.call(holder.release())
            await async_wait_until(lambda: holder.active == 0, what="held copies to finish")
            host.call(holder.hold_again())
    finally:
        host.call(holder.release())
    assert holder.max_active == HOLD_BOUND
    await expect_metrics(
        turnout,
        "held copies counted: sent up to the bound, the rest dropped",
        lambda m: (
            outcome(m, "held", "dropped") == 2 * (burst - HOLD_BOUND)
            and outcome(m, "held", "sent") == 2 * HOLD_BOUND
        ),
    )


# -- comparison ------------------------------------------------------------------------------


def mismatch_lines(turnout: InProcessTurnout, request_id: str) -> list[str]:
    return [
        line
        for line in turnout.stderr_text().splitlines()
        if "turnout.mirror" in line and f"request_id {request_id})" in line
    ]


async def test_status_mismatch_is_counted(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    before = mirror_metrics(turnout)
    request_id = f"status-{new_tag()}"
    target = "/full/s?status_rec=503"
    status, body, _ = await fetch(client, turnout, "GET", target, request_id)
    expect_primary(status, body, target)
    await async_wait_until(
        lambda: bool(mismatch_lines(turnout, request_id)), what="the status mismatch line"
    )
    (line,) = mismatch_lines(turnout, request_id)
    print(f"\n{line}")
    assert "route full: status mismatch" in line
    assert "shadow 503, primary 200" in line
    mismatches = series(before, "status_mismatch_total", "full")
    await expect_metrics(
        turnout,
        "one status mismatch counted",
        lambda m: series(m, "status_mismatch_total", "full") - mismatches == 1,
    )


async def test_json_bodies_compared_ignoring_volatile_fields(
    turnout: InProcessTurnout, shadows: Shadows, client: aiohttp.ClientSession
) -> None:
    tag = new_tag()
    before = mirror_metrics(turnout)
    # `id`, `at` and `items[].id` differ on every answer; they are ignored.
    same = [f"cmp-same-{tag}-{index}" for index in range(5)]
    for request_id in same:
        status, body, _ = await fetch(client, turnout, "GET", "/cmp/a", request_id)
        expect_primary(status, body, "/cmp/a")
    differs = f"cmp-diff-{tag}"
    target = "/cmp/b?value_rec=changed"
    status, body, _ = await fetch(client, turnout, "GET", target, differs)
    expect_primary(status, body, target)
    assert body["value"] == "same"

    await async_wait_until(
        lambda: bool(mismatch_lines(turnout, differs)), what="the body mismatch line"
    )
    (line,) = mismatch_lines(turnout, differs)
    print(f"\n{line}")
    assert "route cmp: body mismatch" in line
    assert line.endswith("JSON differs at value")
    await async_wait_until(lambda: len(shadows.rec.by_id(f"cmp-same-{tag}")) == 5, what="copies")
    # Once all six copies are counted `sent`, their comparisons have run: exactly one differs.
    sent = series(before, "requests_total", "cmp", "sent")
    await expect_metrics(
        turnout, "six copies sent", lambda m: outcome(m, "cmp", "sent") - sent == len(same) + 1
    )
    if before is not None:
        after = mirror_metrics(turnout)
        assert (
            series(after, "body_mismatch_total", "cmp")
            - series(before, "body_mismatch_total", "cmp")
            == 1
        )
        assert series(after, "status_mismatch_total", "cmp") == series(
            before, "status_mismatch_total", "cmp"
        )
    for request_id in same:
        assert mismatch_lines(turnout, request_id) == []


# -- counters, in process ---------------------------------------------------------------------
#
# The same `Mirrorer` the worker uses, driven the way the data plane drives it, against real
# servers on this test's event loop: the outcome and mismatch counters are asserted exactly
# here, whatever the admin API exposes.


def mirror_route(mirror: Mirror, *addresses: str) -> tuple[CompiledRoute, UpstreamSpec]:
    """A compiled route mirroring to an upstream `shadow` with `addresses` as endpoints."""
    endpoints = tuple(
        Endpoint(host, int(port)) for host, _, port in (a.rpartition(":") for a in addresses)
    )
    spec = ConfigSpec(
        upstreams=(
            UpstreamSpec("blue", (Endpoint("127.0.0.1", 9),)),
            UpstreamSpec("shadow", endpoints),
        ),
        routes=(RouteSpec("r", (("blue", 1.0),), mirror=mirror),),
    )
    table = compile_table(spec, generation=1, sha256="-")
    return table.routes[0], table.upstreams["shadow"]


def request_headers(request_id: str, length: int | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"Host", b"svc.test"), (b"X-Request-Id", request_id.encode())]
    if length is not None:
        headers.append((b"Content-Length", str(length).encode()))
    return headers


@pytest.fixture
async def local_shadow() -> AsyncIterator[Service]:
    service = Service("shadow")
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def mirrorer() -> AsyncIterator[Mirrorer]:
    mirrorer = Mirrorer(asyncio.get_running_loop())
    yield mirrorer
    await mirrorer.close()


def settled(stats: MirrorStats) -> int:
    return sum(stats.outcomes.values())


async def test_each_copy_has_exactly_one_outcome(local_shadow: Service, mirrorer: Mirrorer) -> None:
    route, shadow = mirror_route(Mirror(to="shadow", max_body=1000), local_shadow.address)
    stats = MirrorStats("r", "shadow")

    # sent: no body, and a body fed in pieces
    assert mirrorer.start(route, shadow, stats, "GET", b"/a", request_headers("o-1"), False)
    copy = mirrorer.start(route, shadow, stats, "POST", b"/b", request_headers("o-2"), True)
    assert copy is not None
    for piece in (b"abc", b"def"):
        copy.feed(piece)
    copy.end()
    # skipped: Content-Length over the cap (not started), chunked over the cap, client gone
    assert (
        mirrorer.start(route, shadow, stats, "PUT", b"/c", request_headers("o-3", 5000), True)
        is None
    )
    over = mirrorer.start(route, shadow, stats, "POST", b"/d", request_headers("o-4"), True)
    assert over is not None
    over.feed(b"x" * 600)
    over.feed(b"x" * 600)
    gone = mirrorer.start(route, shadow, stats, "POST", b"/e", request_headers("o-5"), True)
    assert gone is not None
    gone.feed(b"partial")
    gone.cancel()
    assert stats.outcomes["skipped"] == 3

    await async_wait_until(lambda: settled(stats) == 5, what="every copy settled")
    await async_wait_until(lambda: mirrorer.in_flight("r") == 0, what="slots given back")
    assert stats.outcomes == {"sent": 2, "error": 0, "dropped": 0, "skipped": 3}
    assert sorted(seen.request_id for seen in local_shadow.seen) == ["o-1", "o-2"]
    (posted,) = local_shadow.by_id("o-2")
    assert posted.body_sha256 == hashlib.sha256(b"abcdef").hexdigest()


async def test_in_flight_bound_and_shutdown(mirrorer: Mirrorer) -> None:
    holder = Service("holder", "hold")
    await holder.start()
    try:
        route, shadow = mirror_route(Mirror(to="shadow", max_in_flight=3), holder.address)
        stats = MirrorStats("r", "shadow")
        started = [
            mirrorer.start(route, shadow, stats, "GET", b"/h", request_headers(f"h-{i}"), False)
            for i in range(10)
        ]
        assert sum(copy is not None for copy in started) == 3
        assert stats.outcomes["dropped"] == 7
        await async_wait_until(lambda: holder.active == 3, what="three held copies")
        # Worker shutdown: copies in flight are cancelled and counted, the session closed.
        await mirrorer.close()
        assert stats.outcomes == {"sent": 0, "error": 3, "dropped": 7, "skipped": 0}
        assert mirrorer.in_flight("r") == 0
        later = mirrorer.start(route, shadow, stats, "GET", b"/h", request_headers("h-x"), False)
        assert later is None
        assert stats.outcomes["dropped"] == 8
    finally:
        await holder.stop()


async def test_refused_endpoint_rests(
    local_shadow: Service, mirrorer: Mirrorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rest far longer than the test, so that the assertions below cannot race its end.
    monkeypatch.setattr(
        proxy.dataplane.mirror, "REST", dataclasses.replace(proxy.dataplane.mirror.REST, base=600.0)
    )
    closed = f"127.0.0.1:{free_port()}"
    route, shadow = mirror_route(Mirror(to="shadow"), closed, local_shadow.address)
    stats = MirrorStats("r", "shadow")
    # Round-robin: half of the copies go to the closed port until REST_AFTER of them failed;
    # from then on every copy goes to the live endpoint.
    for index in range(4 * REST_AFTER):
        mirrorer.start(route, shadow, stats, "GET", b"/r", request_headers(f"r-{index}"), False)
        await async_wait_until(lambda: mirrorer.in_flight("r") == 0, what="the copy to end")
    assert stats.outcomes["error"] == REST_AFTER
    assert stats.outcomes["sent"] == 3 * REST_AFTER
    assert len(local_shadow.by_id("r-")) == 3 * REST_AFTER

    # Only the closed endpoint: while it rests, copies are errors without a connection.
    route, shadow = mirror_route(Mirror(to="shadow"), closed)
    assert mirrorer.start(route, shadow, stats, "GET", b"/r", request_headers("r-x"), False) is None
    assert stats.outcomes["error"] == REST_AFTER + 1


async def test_mismatches_counted(local_shadow: Service, mirrorer: Mirrorer) -> None:
    ignore = ("service", "id", "at", "items[].id")
    route, shadow = mirror_route(
        Mirror(to="shadow", compare_json=True, compare_json_ignore=ignore), local_shadow.address
    )
    stats = MirrorStats("r", "shadow")

    def primary_answer(value: str = "same") -> bytes:
        # What `blue` would answer: same shape, its own volatile fields.
        return orjson.dumps(
            {
                "service": "blue",
                "target": "/m",
                "body_sha256": hashlib.sha256(b"").hexdigest(),
                "value": value,
                "id": "primary",
                "at": 0,
                "items": [{"id": "p1", "n": 1}, {"id": "p2", "n": 2}],
            }
        )

    cases = [
        # (query the shadow sees, primary status, primary body, status mismatch, body mismatch)
        ("", 200, primary_answer(), 0, 0),
        ("", 200, primary_answer("other"), 0, 1),
        ("?status_shadow=500", 200, primary_answer(), 1, 0),
        ("", 200, b"not json", 0, 0),
    ]
    for index, (query, status, body, status_diff, body_diff) in enumerate(cases):
        before = (stats.mismatch, stats.body_mismatch)
        target = f"/m{query}".encode()
        copy = mirrorer.start(
            route, shadow, stats, "GET", target, request_headers(f"m-{index}"), False
        )
        assert copy is not None
        assert copy.wants_primary_body
        copy.primary_head(status, "application/json; charset=utf-8")
        # The primary's body arrives in pieces, as the data plane tees it.
        copy.primary_body(body[:10])
        copy.primary_body(body[10:])
        copy.primary_end()
        # The comparison's callback is queued before the one that gives the slot back.
        await async_wait_until(lambda: mirrorer.in_flight("r") == 0, what="the copy to end")
        assert (stats.mismatch - before[0], stats.body_mismatch - before[1]) == (
            status_diff,
            body_diff,
        ), cases[index]
    assert stats.outcomes["sent"] == len(cases)

    # A primary answer that is not JSON is not kept at all.
    copy = mirrorer.start(route, shadow, stats, "GET", b"/m", request_headers("m-html"), False)
    assert copy is not None
    copy.primary_head(200, "text/html")
    assert not copy.wants_primary_body
