"""Other fleet instances' counters, as the leader reads them (`FleetStore.fleet_counters`).

They are untrusted input: each instance's entry is read (and checked) once, there; one that
cannot be read is left out and logged once, and every other entry still counts. The entries
are written straight into a real redis-server, as a broken or hostile instance could.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis

from proxy.control.fleet import FleetStore, Heartbeat, redis_client
from proxy.control.fleetlink import FleetLink
from proxy.control.metrics import Totals
from proxy.control.rollouts import counters
from proxy.control.state import SavedState
from proxy.control.views import LoadedConfig
from proxy.core import grpc
from proxy.core.config import parse_config
from proxy.core.counters import (
    BUCKET_SLOTS,
    GOAWAY_REASONS,
    PairCounts,
    RouteUpstreamStats,
    WorkerSnapshot,
    read_worker_snapshot,
)
from proxy.core.spec import Fleet
from proxy.core.table import compile_table
from tests.support.redis import RedisServer


def pair(route: str, upstream: str, ok: int) -> PairCounts:
    return {
        "route": route,
        "upstream": upstream,
        "codes": {"200": ok},
        "buckets": [ok] + [0] * (BUCKET_SLOTS - 1),
        "grpc_errors": 0,
    }


async def ignore(state: SavedState) -> None:
    pass


def store_with(server: RedisServer, mine: list[PairCounts]) -> FleetStore:
    spec = Fleet(name="shop", redis=server.url, instance="a")
    store = FleetStore(
        spec,
        "a",
        on_document=ignore,
        seed=SavedState,
        heartbeat=lambda: Heartbeat(1, "", "", {}),
        counters=lambda: mine,
    )
    # Connected as its run loop would be, without the loop's lease and heartbeat.
    store._client = redis_client(spec, 2.0)
    store.connected = True
    return store


def publish(server: RedisServer, who: str, body: Any) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    client = redis.Redis.from_url(server.url)
    try:
        client.hset("turnout:{shop}:counters", who, raw)
    finally:
        client.close()


async def test_unreadable_entries_are_left_out_and_logged_once(
    caplog: pytest.LogCaptureFixture, redis_server: RedisServer
) -> None:
    server = redis_server
    mine = [pair("api", "canary", 3)]
    store = store_with(server, mine)
    publish(server, "b#1", {"at": 1.0, "routes": [pair("api", "canary", 5)]})
    publish(server, "c#1", {"at": 1.0, "routes": [{**pair("api", "canary", 7), "buckets": [1]}]})
    publish(server, "d#1", b"not json")
    publish(server, "e#1", {"at": 1.0, "routes": {"api": 1}})
    publish(server, "f#1", [1, 2])
    caplog.set_level(logging.WARNING, logger="turnout.fleet")

    got = await store.fleet_counters()
    assert sorted(got, key=lambda pairs: pairs[0]["codes"]["200"]) == [
        mine,
        [pair("api", "canary", 5)],
    ]
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 4
    assert (
        "counters of c#1 left out, unreadable: routes[0].buckets: must be an array" in (messages[0])
    )
    assert "counters of d#1 left out" in messages[1]
    assert "counters of e#1 left out, unreadable: routes: must be an array" in messages[2]
    assert "counters of f#1 left out, unreadable: value: must be an object" in messages[3]

    # The next look says nothing new about the same entries; a changed one is logged again.
    caplog.clear()
    publish(server, "e#1", {"at": 1.0})
    assert len(await store.fleet_counters()) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "fleet shop: counters of e#1 left out, unreadable: routes: missing"
    ]
    client = store._client
    assert client is not None
    await client.aclose()


CONFIG = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001"]}
  canary: {endpoints: ["127.0.0.1:9002"]}
routes:
  - name: api
    split: {blue: 100, canary: 0}
    rollout: {baseline: blue, canary: canary, interval: 60s}
"""


def worker_totals(calls: list[tuple[int, int]]) -> Totals:
    """This instance's counters after the canary answered `calls` (HTTP status, grpc-status),
    as the supervisor sums its workers' snapshots (read back from JSON)."""
    stats = RouteUpstreamStats("api", "canary")
    for code, status in calls:
        stats.observe_grpc(code, status, 0.01)
    sent: WorkerSnapshot = {
        "generation": 1,
        "pid": 1,
        "routes": [stats.snapshot()],
        "no_route": RouteUpstreamStats("", "").snapshot(),
        "mirror": [],
        "fail_open": {},
        "h2_goaways": dict.fromkeys(GOAWAY_REASONS, 0),
        "endpoints": [],
        "connections": 0,
    }
    totals = Totals()
    totals.add_snapshot(read_worker_snapshot(orjson.loads(orjson.dumps(sent))))
    return totals


async def test_the_leader_sums_every_instances_grpc_errors(redis_server: RedisServer) -> None:
    """gRPC errors travel worker -> supervisor -> Redis -> leader and count once each."""
    spec = Fleet(name="shop", redis=redis_server.url, instance="a")
    parsed = parse_config(CONFIG, "t.yaml")
    loaded = LoadedConfig(
        1, "x", CONFIG, parsed, compile_table(parsed, generation=1, sha256="x"), datetime.now(UTC)
    )
    # 200+INTERNAL and 503+UNAVAILABLE are errors (the latter once), 200+NOT_FOUND is not.
    totals = worker_totals([(200, grpc.INTERNAL), (503, grpc.UNAVAILABLE), (200, grpc.NOT_FOUND)])
    link = FleetLink(
        spec,
        current=lambda: loaded,
        totals=lambda: totals,
        seed=SavedState,
        on_document=ignore,
        on_leader=lambda leading: None,
    )
    link.store._client = redis_client(spec, 2.0)
    link.store.connected = True
    other = {**pair("api", "canary", 10), "grpc_errors": 4}
    # An instance of a Turnout without gRPC publishes no grpc_errors.
    older = {key: value for key, value in pair("api", "canary", 5).items() if key != "grpc_errors"}
    publish(redis_server, "b#1", {"at": 1.0, "routes": [other]})
    publish(redis_server, "c#1", {"at": 1.0, "routes": [older]})
    try:
        stats = await link.rollout_stats()
        summed = counters(stats, "api", "canary")
        assert summed.codes == {200: 2 + 10 + 5, 503: 1}
        assert summed.grpc_errors == 1 + 4
        # This instance's own entry, as Redis holds it, carries its gRPC errors.
        (own,) = [pairs for pairs in stats if pairs[0]["codes"].get("503")]
        assert [(p["codes"], p["grpc_errors"]) for p in own] == [({"200": 2, "503": 1}, 1)]
    finally:
        client = link.store._client
        assert client is not None
        await client.aclose()
