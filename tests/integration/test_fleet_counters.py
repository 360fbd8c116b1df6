"""Other fleet instances' counters, as the leader reads them (`FleetStore.fleet_counters`).

They are untrusted input: each instance's entry is read (and checked) once, there; one that
cannot be read is left out and logged once, and every other entry still counts. The entries
are written straight into a real redis-server, as a broken or hostile instance could.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import redis

from proxy.control.fleet import FleetStore, Heartbeat, redis_client
from proxy.control.state import SavedState
from proxy.core.counters import BUCKET_SLOTS, PairCounts
from proxy.core.spec import Fleet
from tests.support.redis import RedisServer


def pair(route: str, upstream: str, ok: int) -> PairCounts:
    return {
        "route": route,
        "upstream": upstream,
        "codes": {"200": ok},
        "buckets": [ok] + [0] * (BUCKET_SLOTS - 1),
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
