"""Fleet mode when parts fail (contract section 9), with a real `redis-server` and real Turnout
processes: the leader killed mid-rollout, Redis stopped and started again, Redis restarted with
its data lost, Redis paused (SIGSTOP) past the lease as a partition looks to its clients, and an
instance started while Redis is down. Helpers and fixtures come from test_fleet.py.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from proxy.control.fleet import BACKOFF_LAST
from proxy.control.state import decode_state, load_state
from tests.support import wait_until
from tests.support.redis import RedisServer
from tests.support.turnout import TurnoutProcess, http_status
from tests.support.upstreams import EchoUpstream
from tests.system.test_fleet import (
    CHECK_S,
    CONVERGE_S,
    FILE_SPLIT,
    INTERVAL_S,
    LEASE_S,
    Fleet,
    Traffic,
    call,
    fleet_view,
    make_fleet,
    metric,
    rollout_block,
    rollout_of,
    send,
    shared_part,
    split_of,
    stored_document,
    wait_alike,
)
from tests.system.test_fleet import fleet_parts as fleet_parts  # a fixture

Parts = tuple[Path, RedisServer, EchoUpstream, EchoUpstream]
# The reconnect back-off's longest wait on top of the usual deadline.
RECONNECT_S = BACKOFF_LAST + CONVERGE_S
LEADS_RE = re.compile(r"this instance leads \(epoch (\d+)\)")


def assert_holds(check: Callable[[], None], seconds: float) -> None:
    """`check` (which asserts) passes at every look for `seconds` (a window the test needs to
    see go by: nothing may change in it)."""
    until = time.monotonic() + seconds
    while True:
        check()
        if time.monotonic() >= until:
            return
        time.sleep(0.1)


def all_disconnected(fleet: Fleet) -> bool:
    return all(
        metric(node, "turnout_fleet_connected") == 0.0
        and metric(node, "turnout_fleet_leader") == 0.0
        and fleet_view(node)["connected"] is False
        for node in fleet.nodes.values()
    )


def all_connected(fleet: Fleet) -> bool:
    return all(
        metric(node, "turnout_fleet_connected") == 1.0 and fleet_view(node)["connected"] is True
        for node in fleet.nodes.values()
    )


def passes(node: TurnoutProcess) -> list[tuple[int, str]]:
    """The rollout's verdicts, without inconclusive intervals (a loaded machine may end one
    before min_requests are counted; the step just goes on)."""
    history = rollout_of(node).get("history", [])
    return [(e["step"], e["verdict"]) for e in history if e["verdict"] != "inconclusive"]


def epochs_led(node: TurnoutProcess) -> list[int]:
    """The epochs this instance said it led, from its log."""
    return [int(epoch) for epoch in LEADS_RE.findall(node.stderr_text())]


# --- 3. the leader killed mid-rollout ------------------------------------------------------------


def test_the_leader_killed_mid_rollout_is_replaced_and_the_rollout_goes_on_from_its_step(
    fleet_parts: Parts,
) -> None:
    fleet = make_fleet(fleet_parts, rollout=rollout_block(steps=[20, 40, 60, 100]))
    try:
        fleet.start("a", "b", "c")
        fleet.wait_joined()
        old = fleet.leader()
        survivors = fleet.followers()
        watched = fleet.nodes[survivors[0]]
        steps_seen: list[int] = []

        def step_reached(step: int) -> Callable[[], bool]:
            def reached() -> bool:
                rollout = rollout_of(watched)
                steps_seen.append(int(rollout.get("step", 0)))
                return bool(rollout.get("state") == "succeeded" or steps_seen[-1] >= step)

            return reached

        with Traffic([fleet.nodes[name] for name in survivors], rate=40.0) as traffic:
            status, body = call(watched, "POST", "/admin/routes/api/rollout/start")
            assert status == 200, body
            wait_until(step_reached(1), timeout=3 * INTERVAL_S + CONVERGE_S, what="step 1")
            stored = rollout_of(watched)
            assert stored["state"] == "running", stored
            killed_at = time.monotonic()
            fleet.kill(old)

            def taken_over() -> bool:
                leaders = {fleet_view(node)["leader"] for node in fleet.nodes.values()}
                return len(leaders) == 1 and leaders <= set(survivors)

            wait_until(taken_over, timeout=LEASE_S + CHECK_S + CONVERGE_S, what="a new leader")
            took = time.monotonic() - killed_at
            print(f"a new leader {took:.2f} s after the SIGKILL (lease {LEASE_S:g} s)")
            new = fleet.leader()
            # It goes on from the stored step, not from the first.
            assert rollout_of(fleet.nodes[new])["step"] >= stored["step"]
            wait_until(step_reached(99), timeout=4 * INTERVAL_S + CONVERGE_S, what="the end")
        assert traffic.failures == []

        # The steps never went back, and the rollout ended as it would have: one pass a step.
        assert steps_seen == sorted(steps_seen)
        state, _, _, split, _ = wait_alike(fleet, "the end")
        assert (state, split) == ("succeeded", {"blue": 0.0, "green": 100.0})
        for node in fleet.nodes.values():
            assert passes(node) == [(0, "pass"), (1, "pass"), (2, "pass")]
        # The dead instance leaves the list after a few leases.
        wait_until(
            lambda: all(metric(n, "turnout_fleet_instances") == 2.0 for n in fleet.nodes.values()),
            timeout=3 * LEASE_S + CONVERGE_S,
            what="the killed instance to leave the list",
        )
    finally:
        fleet.close()


# --- 4. Redis stopped, and started again ---------------------------------------------------------


def test_with_redis_down_traffic_flows_changes_are_refused_rollouts_hold_and_all_converge_after(
    fleet_parts: Parts,
) -> None:
    fleet = make_fleet(fleet_parts, rollout=rollout_block())
    server = fleet.redis
    try:
        fleet.start("a", "b", "c")
        fleet.wait_joined()
        nodes = list(fleet.nodes.values())
        a, b, c = fleet.nodes["a"], fleet.nodes["b"], fleet.nodes["c"]
        status, body = call(b, "POST", "/admin/routes/api/rollout/start")
        assert status == 200, body
        running = wait_alike(fleet, "the start")
        assert running[:3] == ("running", 0, 20.0)

        with Traffic(nodes, rate=20.0) as traffic:
            server.stop(keep=True)
            wait_until(lambda: all_disconnected(fleet), timeout=CONVERGE_S, what="disconnected")
            held = {name: shared_part(node) for name, node in fleet.nodes.items()}
            assert all(part[0] == "running" for part in held.values()), held

            # Serving goes on with the last known split, and the instance is ready.
            for node in nodes:
                seen = send(node, 30)
                assert sum(seen.values()) == 30
                assert set(seen) <= {(200, "blue"), (200, "green")}, seen
                assert http_status(f"{node.admin_url}/readyz") == 200
            # Changes are refused, saying why; nothing changes.
            refused = {"blue": 70, "green": 30}
            for method, path, payload in (
                ("PUT", "/admin/routes/api/split", refused),
                ("DELETE", "/admin/routes/api/split", None),
                ("POST", "/admin/routes/api/rollout/pause", None),
            ):
                status, body = call(a, method, path, payload)
                assert status == 503, (method, path, body)
                assert body["error"] == "fleet store unavailable", body
                assert "Redis" in body["detail"], body

            # The rollout holds: no look, no step, no verdict, for longer than a step lasts.
            def unchanged() -> None:
                for name, node in fleet.nodes.items():
                    assert shared_part(node) == held[name]

            assert_holds(unchanged, INTERVAL_S + 2 * CHECK_S)

            server.start(dbfile=True)
            back = time.monotonic()
            wait_until(lambda: all_connected(fleet), timeout=RECONNECT_S, what="reconnected")
            fleet.leader()
            print(f"all connected, a leader {time.monotonic() - back:.2f} s after Redis came back")
            # The rollout goes on by itself, and ends everywhere.
            wait_until(
                lambda: all(rollout_of(node).get("state") == "succeeded" for node in nodes),
                timeout=3 * INTERVAL_S + CONVERGE_S,
                what="the rollout to succeed after Redis came back",
            )
        assert traffic.failures == []
        assert traffic.total() > 0
        print(f"{traffic.total()} requests through the outage, {len(traffic.failures)} failed")

        state, _, _, split, _ = wait_alike(fleet, "the end")
        assert (state, split) == ("succeeded", {"blue": 0.0, "green": 100.0})
        # The refused change never took effect: no runtime split, the rollout never paused.
        for node in nodes:
            assert passes(node) == [(0, "pass"), (1, "pass")]
            assert split_of(node)[1] == "rollout"
        # A change goes through again, everywhere.
        status, body = call(c, "PUT", "/admin/routes/api/split", {"blue": 100})
        assert status == 200, body
        fleet.wait_split({"blue": 100.0, "green": 0.0}, "fleet")
    finally:
        fleet.close()


# --- 5. Redis restarted with its data lost --------------------------------------------------------


def test_redis_restarted_empty_gets_the_split_back_from_the_instances(
    fleet_parts: Parts,
) -> None:
    fleet = make_fleet(fleet_parts)
    server = fleet.redis
    try:
        fleet.start("a", "b", "c")
        fleet.wait_joined()
        status, body = call(fleet.nodes["a"], "PUT", "/admin/routes/api/split", {"green": 100})
        assert status == 200, body
        green = {"blue": 0.0, "green": 100.0}
        fleet.wait_split(green, "fleet")
        before = {name: node.stderr_text() for name, node in fleet.nodes.items()}

        server.restart(keep=False)

        # Until every instance is back and the store has the split again, the split stays
        # in force on every instance: nobody takes the empty store for "no split".
        def back() -> bool:
            for node in fleet.nodes.values():
                assert split_of(node) == (green, "fleet")
            body = stored_document(server)
            if body is None or decode_state(body).splits != {"api": {"green": 100.0}}:
                return False
            return all_connected(fleet)

        wait_until(back, timeout=RECONNECT_S, what="the split published again")
        fleet.wait_joined()
        fleet.leader()
        for name, node in fleet.nodes.items():
            assert split_of(node) == (green, "fleet")
            # Never went back to the file's split, not even for a moment.
            assert "(the file's)" not in node.stderr_text()[len(before[name]) :]
        assert send(fleet.nodes["c"], 10) == Counter({(200, "green"): 10})

        # And the fleet works on: a change from another instance reaches all.
        status, body = call(fleet.nodes["c"], "PUT", "/admin/routes/api/split", {"blue": 1})
        assert status == 200, body
        fleet.wait_split({"blue": 100.0, "green": 0.0}, "fleet")
    finally:
        fleet.close()


# --- 6. a partition: Redis paused past the lease ------------------------------------------------


def test_redis_paused_past_the_lease_never_gives_a_rollout_two_leaders(
    fleet_parts: Parts,
) -> None:
    fleet = make_fleet(fleet_parts, rollout=rollout_block(steps=[20, 40, 60, 100]))
    server = fleet.redis
    try:
        fleet.start("a", "b", "c")
        fleet.wait_joined()
        nodes = list(fleet.nodes.values())
        before = fleet_view(fleet.nodes[fleet.leader()])["epoch"]
        a = fleet.nodes["a"]

        with Traffic(nodes, rate=20.0) as traffic:
            status, body = call(a, "POST", "/admin/routes/api/rollout/start")
            assert status == 200, body
            wait_alike(fleet, "the start")

            server.pause()
            try:
                wait_until(lambda: all_disconnected(fleet), timeout=CONVERGE_S, what="disconnected")
                held = {name: shared_part(node) for name, node in fleet.nodes.items()}

                # Past the lease: nobody leads, the rollout holds, traffic flows.
                def nobody_moves() -> None:
                    for name, node in fleet.nodes.items():
                        assert metric(node, "turnout_fleet_leader") == 0.0
                        assert shared_part(node) == held[name]

                assert_holds(nobody_moves, LEASE_S + CHECK_S)
            finally:
                server.resume()

            wait_until(lambda: all_connected(fleet), timeout=RECONNECT_S, what="reconnected")
            after = fleet_view(fleet.nodes[fleet.leader()])["epoch"]
            assert after > before
            wait_until(
                lambda: all(rollout_of(node).get("state") == "succeeded" for node in nodes),
                timeout=4 * INTERVAL_S + CONVERGE_S,
                what="the rollout to succeed",
            )
        assert traffic.failures == []

        # One pass a step: no step was judged twice, by two leaders or by one.
        state, _, _, split, _ = wait_alike(fleet, "the end")
        assert (state, split) == ("succeeded", {"blue": 0.0, "green": 100.0})
        for node in nodes:
            assert passes(node) == [(0, "pass"), (1, "pass"), (2, "pass")]
        # Each epoch had one leader.
        led = [epoch for node in nodes for epoch in epochs_led(node)]
        assert len(led) == len(set(led)), led
        assert max(led) >= after
    finally:
        fleet.close()


# --- 9. an instance started while Redis is down ---------------------------------------------------


def test_an_instance_started_while_redis_is_down_serves_its_cached_state_and_joins_later(
    fleet_parts: Parts,
) -> None:
    fleet = make_fleet(fleet_parts)
    server = fleet.redis
    try:
        fleet.start("a", "b")
        fleet.wait_joined()
        status, body = call(fleet.nodes["a"], "PUT", "/admin/routes/api/split", {"green": 100})
        assert status == 200, body
        green = {"blue": 0.0, "green": 100.0}
        fleet.wait_split(green, "fleet")
        # b keeps the shared state in its state file, as a cache.
        wait_until(
            lambda: load_state(str(fleet.state_file("b"))).splits == {"api": {"green": 100.0}},
            what="b's cache",
        )
        fleet.stop("b")
        server.stop(keep=True)

        fleet.start("b")  # new ports, the same instance name and state file
        b = fleet.nodes["b"]
        assert split_of(b) == (green, "fleet")
        assert send(b, 20) == Counter({(200, "green"): 20})
        view = fleet_view(b)
        assert view["connected"] is False
        assert metric(b, "turnout_fleet_connected") == 0.0
        status, body = call(b, "PUT", "/admin/routes/api/split", {"blue": 100})
        assert status == 503, body

        server.start(dbfile=True)
        wait_until(lambda: all_connected(fleet), timeout=RECONNECT_S, what="b joined")
        fleet.wait_joined(2)
        fleet.leader()
        assert split_of(b) == (green, "fleet")
        # The refused change did not come back; a change from b now reaches a.
        assert split_of(fleet.nodes["a"]) == (green, "fleet")
        status, body = call(b, "PUT", "/admin/routes/api/split", {"blue": 100})
        assert status == 200, body
        fleet.wait_split(FILE_SPLIT, "fleet")
    finally:
        fleet.close()
