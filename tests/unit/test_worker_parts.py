"""The parts of a worker that need no sockets: counters carried across tables
(proxy.dataplane.stats) and upstream pools rebuilt from each table (proxy.dataplane.pools)."""

from __future__ import annotations

import asyncio

from proxy.core.config import parse_config
from proxy.core.table import Table, compile_table
from proxy.dataplane.http1 import Generation
from proxy.dataplane.pools import EJECT_BASE, PASSIVE_FAILURES, Pools
from proxy.dataplane.stats import WorkerStats
from proxy.dataplane.writes import WriteBatcher
from proxy.runtime.tasks import TaskSet

CONFIG = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
  green: {endpoints: ["127.0.0.1:9003"]}
routes:
  - name: api
    match: {path_prefix: /api}
    split: {blue: 90, green: 10}
    mirror: {to: green}
  - name: web
    split: {blue: 100}
"""
# web is gone, api keeps blue only and mirrors nothing; 9002 left blue.
NEXT = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001"]}
routes:
  - name: api
    split: {blue: 1}
"""


def table_of(text: str, generation: int) -> Table:
    return compile_table(parse_config(text, "t.yaml"), generation=generation, sha256="x")


def test_counters_of_pairs_that_stay_are_carried_and_new_ones_start_at_zero() -> None:
    first = table_of(CONFIG, 1)
    stats, no_route, mirror = WorkerStats.carry(None, first)
    assert [sorted(per_route) for per_route in stats] == [["blue", "green"], ["blue"]]
    assert mirror[0] is not None
    assert mirror[1] is None
    stats[0]["blue"].observe(200, 0.01)
    no_route.observe(404, 0.0)
    old = Generation(first, {}, stats, no_route, mirror, "turnout")

    again, no_route_again, mirror_again = WorkerStats.carry(old, table_of(NEXT, 2))
    assert again[0]["blue"] is stats[0]["blue"]
    assert again[0]["blue"].count == 1
    assert no_route_again is no_route
    assert mirror_again == (None,)


def test_fail_open_picks_are_counted_per_upstream() -> None:
    stats = WorkerStats()
    stats.count_fail_open("blue")
    stats.count_fail_open("blue")
    stats.count_fail_open("green")
    assert stats.fail_open == {"blue": 2, "green": 1}


async def test_pools_stay_warm_across_tables_and_removed_ones_drain() -> None:
    loop = asyncio.get_running_loop()
    tasks = TaskSet("test")
    pools = Pools(0, WriteBatcher(loop), tasks)
    pools.set_down({("blue", "127.0.0.1:9002")}, loop.time())
    first = pools.build(table_of(CONFIG, 1), loop.time())
    assert sorted(first) == ["blue", "green"]
    kept = pools.endpoints[("blue", "127.0.0.1:9001")]
    gone = pools.endpoints[("blue", "127.0.0.1:9002")]
    # The down set from the supervisor holds for a pool made after it arrived.
    assert not gone.active_up
    assert kept.active_up

    second = pools.build(table_of(NEXT, 2), loop.time())
    assert sorted(second) == ["blue"]
    assert pools.endpoints == {("blue", "127.0.0.1:9001"): kept}
    assert gone.draining
    assert not kept.draining
    await tasks.cancel_all(1.0)


async def test_an_endpoint_that_keeps_failing_is_ejected_and_comes_back() -> None:
    loop = asyncio.get_running_loop()
    tasks = TaskSet("test")
    pools = Pools(0, WriteBatcher(loop), tasks)
    pools.build(table_of(NEXT, 1), 0.0)
    (endpoint,) = pools.endpoints.values()
    for _ in range(PASSIVE_FAILURES - 1):
        pools.passive_result(endpoint, 502, 0.0)
    assert not endpoint.ejection.until
    pools.passive_result(endpoint, 0, 0.0)
    assert endpoint.ejection.until == EJECT_BASE
    pools.sweep(EJECT_BASE)
    assert not endpoint.ejection.until
    await tasks.cancel_all(1.0)
