"""The rollout controller driven by a fake clock and synthetic worker counters.

The end-to-end proof with real upstreams is in tests/system/test_rollout_e2e.py; here every
branch of the controller is walked quickly and deterministically by calling `tick()`. The
webhooks go to a real aiohttp server on 127.0.0.1 started by the test.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.control.annotations import Event
from proxy.control.rollouts import RolloutController, fingerprint
from proxy.control.webhooks import Webhooks
from proxy.core import rollout as core
from proxy.core.config import parse_config
from proxy.core.counters import DURATION_BUCKETS, PairCounts
from proxy.core.table import Table, compile_table
from tests.support import async_wait_until

CONFIG = """
listen: 127.0.0.1:18080
upstreams:
  blue: {endpoints: [127.0.0.1:9001]}
  canary: {endpoints: [127.0.0.1:9002]}
routes:
  - name: api
    split: {blue: 100, canary: 0}
    rollout:
      baseline: blue
      canary: canary
      steps: [5, 25, 100]
      interval: 60s
      min_requests: 50
      max_error_rate: 0.01
      max_p99: 500ms
"""

# What the fixed-window version (before `confidence`, `check` and `webhooks`) saved for CONFIG
# after one passed window: the state file of an upgrade.
OLD_STATE = {
    "api": {
        "state": "running",
        "step": 1,
        "canary_weight": 25.0,
        "reason": "passed step 0 (5%); canary at 25%",
        "started_at": "2026-12-05T06:39:40.648Z",
        "step_started_at": 1000061.0,
        "inconclusive_in_a_row": 0,
        "history": [
            {
                "at": "2026-12-05T06:39:40.649Z",
                "step": 0,
                "weight": 5.0,
                "verdict": "pass",
                "reason": "canary errors 0.00% (0/300), p99 5.0 ms; baseline errors 0.10% "
                "(3/3003), p99 5.0 ms",
                "canary": {"requests": 300, "errors": 0, "error_rate": 0.0, "p99_ms": 4.975},
                "baseline": {
                    "requests": 3003,
                    "errors": 3,
                    "error_rate": 0.000999000999000999,
                    "p99_ms": 4.975,
                },
                "z": -0.547697685332163,
                "p_value": 0.708050249128887,
            }
        ],
        "fingerprint": "49d4e51c3ba6aff6",
    }
}


def make_table(text: str = CONFIG, generation: int = 1) -> Table:
    return compile_table(parse_config(text, "t.yaml"), generation=generation, sha256="x")


class FakeHost:
    """Counts requests per (route, upstream, code) like the workers would, in one fake worker."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.codes: dict[tuple[str, str], dict[int, int]] = {}
        self.grpc_errors: dict[tuple[str, str], int] = {}
        self.changes = 0
        self.answering = True
        # False: a fleet's follower, which must never move a rollout.
        self.leading = True
        # False: the fleet refuses to store the controller's changes (a lost lease).
        self.storing = True

    def serve(self, upstream: str, ok: int, errors: int = 0, grpc_errors: int = 0) -> None:
        """`ok` 200s, `errors` 500s, and `grpc_errors` gRPC calls answered 200 with an error
        status (grpc-status INTERNAL, say)."""
        codes = self.codes.setdefault(("api", upstream), {})
        codes[200] = codes.get(200, 0) + ok + grpc_errors
        codes[500] = codes.get(500, 0) + errors
        key = ("api", upstream)
        self.grpc_errors[key] = self.grpc_errors.get(key, 0) + grpc_errors

    def may_judge(self) -> bool:
        return self.leading

    async def rollout_stats(self, timeout: float) -> list[list[PairCounts]]:  # noqa: ASYNC109
        if not self.answering:
            return []
        routes: list[PairCounts] = []
        for (route, upstream), codes in self.codes.items():
            total = sum(codes.values())
            buckets = [0] * (len(DURATION_BUCKETS) + 1)
            buckets[5] = total  # every request took ~5 ms
            routes.append(
                {
                    "route": route,
                    "upstream": upstream,
                    "codes": {str(c): n for c, n in codes.items()},
                    "buckets": buckets,
                    "grpc_errors": self.grpc_errors.get((route, upstream), 0),
                }
            )
        return [routes]

    async def rollout_changed(self, *, judged: bool = False) -> bool:
        self.changes += 1
        return self.storing


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Setup = tuple[FakeHost, Clock, RolloutController]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    host = FakeHost(make_table())
    clock = Clock()
    controller = RolloutController(host, clock=clock)
    yield host, clock, controller
    await controller.close()


async def test_healthy_canary_walks_every_step_to_100(setup: Setup) -> None:
    host, clock, controller = setup
    state = await controller.command(host.table, "api", "start")
    assert (state.state, state.canary_weight) == ("running", 5.0)
    assert controller.splits(host.table) == {"api": ({"blue": 95.0, "canary": 5.0}, "rollout")}
    weights = []
    for _ in range(2):
        for _ in range(12):  # a look every 5 s (the default check): 12 looks per interval
            host.serve("canary", ok=25)
            host.serve("blue", ok=250, errors=1)
            clock.now += 5
            await controller.tick()
        weights.append(controller.states["api"].canary_weight)
    assert weights == [25.0, 100.0]
    assert controller.states["api"].state == "succeeded"
    assert controller.verdicts[("api", "pass")] == 2
    history = controller.states["api"].history
    assert [h.verdict for h in history] == ["pass", "pass"]
    # Each step is judged on its own evidence: 12 x 25 canary requests.
    assert [h.canary["requests"] for h in history] == [300, 300]


async def test_a_failing_canary_is_rolled_back_at_the_first_look(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=70, errors=30)
    host.serve("blue", ok=1990, errors=10)
    clock.now += 5  # one check, far from the interval's end
    changes = host.changes
    await controller.tick()
    state = controller.states["api"]
    assert (state.state, state.canary_weight) == ("failed", 0.0)
    assert host.changes == changes + 1
    assert controller.splits(host.table) == {"api": ({"blue": 100.0, "canary": 0.0}, "rollout")}
    assert controller.verdicts[("api", "fail")] == 1
    entry = state.history[-1]
    assert entry.canary["errors"] == 30
    assert any(test.reject and test.name == "errors" for test in entry.tests)


async def test_a_canary_failing_with_grpc_errors_is_rolled_back(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=70, grpc_errors=30)
    host.serve("blue", ok=1990, grpc_errors=10)
    clock.now += 5
    await controller.tick()
    state = controller.states["api"]
    assert (state.state, state.canary_weight) == ("failed", 0.0)
    entry = state.history[-1]
    assert (entry.canary["requests"], entry.canary["errors"]) == (100, 30)
    assert entry.baseline["errors"] == 10


async def test_each_look_is_in_the_view_and_looks_wait_for_check(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=10)
    host.serve("blue", ok=100)
    clock.now += 4  # before the first check
    await controller.tick()
    view = controller.view("api")
    assert view is not None
    assert view["last_check"] is None
    clock.now += 1
    await controller.tick()
    view = controller.view("api")
    assert view is not None
    last = view["last_check"]
    assert isinstance(last, dict)
    assert last["elapsed_s"] == 5.0
    assert last["canary"]["requests"] == 10
    assert {test["name"] for test in last["tests"]} == {
        "errors",
        "latency",
        "error_gate",
        "p99_gate",
    }
    assert all(test["log_e"] < test["threshold"] for test in last["tests"])
    assert view["history"] == []
    # The view is JSON for /admin/routes; the state file leaves the look out.
    assert orjson.loads(orjson.dumps(view)) == view
    assert "last_check" not in controller.state_json()["api"]


async def test_no_worker_answering_is_no_evidence(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.answering = False
    for _ in range(40):  # 200 s: three intervals without any counters
        clock.now += 5
        await controller.tick()
    state = controller.states["api"]
    assert (state.state, state.history, state.last_check) == ("running", (), None)


async def test_restart_resumes_and_never_reexposes_a_failed_canary(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=300)
    host.serve("blue", ok=3000)
    clock.now += 60
    await controller.tick()
    saved = controller.state_json()
    restarted = RolloutController(host, clock=clock)
    assert restarted.load(saved, host.table) == []
    assert restarted.states["api"].canary_weight == 25.0
    assert restarted.states["api"].state == "running"
    # The first tick after the restart marks fresh evidence; the next look judges it.
    await restarted.tick()
    host.serve("canary", ok=100, errors=200)
    host.serve("blue", ok=1000)
    clock.now += 5
    await restarted.tick()
    assert restarted.states["api"].state == "failed"
    again = RolloutController(host, clock=clock)
    again.load(restarted.state_json(), host.table)
    assert again.splits(host.table)["api"][0]["canary"] == 0.0
    await restarted.close()
    await again.close()


async def test_a_state_file_of_the_fixed_window_version_resumes(setup: Setup) -> None:
    host, clock, controller = setup
    assert fingerprint(host.table.routes[0]) == OLD_STATE["api"]["fingerprint"]
    assert controller.load(OLD_STATE, host.table) == []
    state = controller.states["api"]
    assert (state.state, state.step, state.canary_weight) == ("running", 1, 25.0)
    assert state.history[0].canary["requests"] == 300
    await controller.tick()  # marks the step's evidence
    host.serve("canary", ok=300)
    host.serve("blue", ok=900)
    clock.now += 60
    await controller.tick()
    assert controller.states["api"].state == "succeeded"


async def test_config_changed_while_down_aborts_on_load(setup: Setup) -> None:
    host, _, controller = setup
    await controller.command(host.table, "api", "start")
    saved = controller.state_json()
    for edit in ("steps: [10, 100]", "steps: [5, 25, 100]\n      confidence: 0.95"):
        edited = make_table(CONFIG.replace("steps: [5, 25, 100]", edit), 2)
        assert fingerprint(edited.routes[0]) != fingerprint(host.table.routes[0])
        restarted = RolloutController(host)
        restarted.load(saved, edited)
        assert restarted.states["api"].state == "aborted"
        assert restarted.states["api"].canary_weight == 0.0


async def test_reload_changing_the_split_aborts_and_runtime_split_pauses(setup: Setup) -> None:
    host, _, controller = setup
    await controller.command(host.table, "api", "start")
    assert controller.runtime_split_set("api")
    assert controller.states["api"].state == "paused"
    assert controller.reconcile(host.table, {"api"})
    assert controller.states["api"].state == "aborted"
    # Once ended, the next change of the file releases the route to the file's split.
    assert controller.reconcile(host.table, {"api"})
    assert controller.states["api"].state == "idle"
    assert controller.splits(host.table) == {}
    without = make_table(CONFIG.split("    rollout:")[0], 3)
    assert controller.reconcile(without, set())
    assert "api" not in controller.states


@pytest.mark.parametrize("action", ["abort", "promote"])
async def test_release_after_the_rollout_ended(setup: Setup, action: str) -> None:
    host, _, controller = setup
    assert not controller.release("api")  # nothing ran
    await controller.command(host.table, "api", "start")
    assert not controller.release("api")  # in progress: its weights stay
    ended = await controller.command(host.table, "api", action)
    assert controller.release("api")
    state = controller.states["api"]
    assert (state.state, state.canary_weight) == ("idle", 0.0)
    assert state.reason == f"{ended.state} rollout released: the file's split is in force"
    assert controller.splits(host.table) == {}
    # The released rollout is kept for its reason and history, and survives a restart.
    saved = controller.state_json()
    assert saved["api"]["state"] == "idle"
    restarted = RolloutController(host)
    assert restarted.load(saved, host.table) == []
    assert restarted.splits(host.table) == {}
    assert (await controller.command(host.table, "api", "start")).state == "running"


async def test_operator_calls_and_their_refusals(setup: Setup) -> None:
    host, _, controller = setup
    with pytest.raises(core.RolloutError):
        await controller.command(host.table, "api", "pause")
    with pytest.raises(KeyError):
        await controller.command(host.table, "nope", "start")
    with pytest.raises(core.RolloutError):
        await controller.command(host.table, "api", "explode")
    await controller.command(host.table, "api", "start")
    with pytest.raises(core.RolloutError):
        await controller.command(host.table, "api", "start")
    assert (await controller.command(host.table, "api", "pause")).state == "paused"
    assert (await controller.command(host.table, "api", "resume")).state == "running"
    promoted = await controller.command(host.table, "api", "promote")
    assert (promoted.state, promoted.canary_weight) == ("succeeded", 100.0)
    restarted = await controller.command(host.table, "api", "start")
    aborted = await controller.command(host.table, "api", "abort")
    assert restarted.state == "running"
    assert (aborted.state, aborted.canary_weight) == ("aborted", 0.0)


async def test_three_intervals_without_enough_traffic_pause(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    for _ in range(36):  # 180 s, 5 canary requests a minute
        if clock.now % 60 == 0:
            host.serve("canary", ok=5)
            host.serve("blue", ok=95)
        clock.now += 5
        await controller.tick()
    state = controller.states["api"]
    assert state.state == "paused"
    assert [h.verdict for h in state.history] == ["inconclusive"] * 3
    # The evidence grew over the three intervals: it was never started over.
    assert [h.canary["requests"] for h in state.history] == [5, 10, 15]
    assert controller.verdicts[("api", "inconclusive")] == 3


async def test_a_follower_never_moves_a_rollout(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.leading = False
    for _ in range(20):
        host.serve("canary", ok=0, errors=50)
        host.serve("blue", ok=1000)
        clock.now += 5
        await controller.tick()
    state = controller.states["api"]
    assert (state.state, state.step, state.history) == ("running", 0, ())
    host.leading = True  # it leads now: the same evidence fails the canary
    clock.now += 5
    await controller.tick()
    assert controller.states["api"].state == "failed"


async def test_a_new_leader_goes_on_with_the_shared_evidence(setup: Setup) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=40)
    host.serve("blue", ok=760)
    shared = controller.state_json(marks=True)
    assert "mark" in shared["api"]
    # Another instance takes over with the shared state: its evidence starts at the same mark,
    # so the 40 canary requests served before the handover count.
    successor = RolloutController(host, clock=clock)
    try:
        successor.adopt(shared, host.table)
        assert successor.states == controller.states
        clock.now += 60  # the interval's end: a verdict on all the evidence
        await successor.tick()
        (entry,) = successor.states["api"].history
        assert (entry.verdict, entry.canary["requests"]) == ("inconclusive", 40)
    finally:
        await successor.close()
    # Without the marks (the state file's form) a restored step starts its evidence over.
    assert "mark" not in controller.state_json()["api"]


async def test_a_shared_mark_keeps_the_grpc_errors_before_it(setup: Setup) -> None:
    host, clock, controller = setup
    # gRPC errors served before the step began are not the step's evidence.
    host.serve("canary", ok=0, grpc_errors=50)
    host.serve("blue", ok=500)
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=40)
    host.serve("blue", ok=760)
    shared = orjson.loads(orjson.dumps(controller.state_json(marks=True)))
    assert shared["api"]["mark"]["canary"]["grpc_errors"] == 50
    successor = RolloutController(host, clock=clock)
    try:
        successor.adopt(shared, host.table)
        clock.now += 60
        await successor.tick()
        (entry,) = successor.states["api"].history
        assert (entry.verdict, entry.canary["requests"], entry.canary["errors"]) == (
            "inconclusive",
            40,
            0,
        )
    finally:
        await successor.close()


@pytest.mark.parametrize(
    ("mark", "message"),
    [
        ({"canary": {"codes": {}}}, "mark.canary.buckets: missing"),
        ({"canary": {"codes": {"200": -1}, "buckets": []}}, "mark.canary.codes.200: must be"),
        ({"canary": {"codes": {}, "buckets": [0] * 20}, "baseline": 1}, "mark.baseline: must be"),
    ],
)
async def test_an_unreadable_shared_mark_is_left_out_and_logged(
    setup: Setup, caplog: pytest.LogCaptureFixture, mark: dict[str, object], message: str
) -> None:
    host, _, controller = setup
    await controller.command(host.table, "api", "start")
    shared = controller.state_json(marks=True)
    shared["api"] = {**shared["api"], "mark": mark}
    successor = RolloutController(host)
    try:
        successor.adopt(shared, host.table)
        assert successor.states == {}
    finally:
        await successor.close()
    assert f"rollout state of route 'api' in the fleet unreadable: {message}" in caplog.text


async def test_a_verdict_that_is_not_stored_is_never_counted_or_told(setup: Setup) -> None:
    host, clock, controller = setup
    events: list[Event] = []
    controller = RolloutController(host, clock=clock, annotate=events.append)
    try:
        await controller.command(host.table, "api", "start")
        events.clear()
        host.storing = False  # e.g. the leader lost its lease between the look and the write
        host.serve("canary", ok=0, errors=50)
        host.serve("blue", ok=1000)
        clock.now += 5
        await controller.tick()
        assert controller.verdicts == {}
        assert events == []
    finally:
        await controller.close()


# --------------------------------------------------------------------------- webhooks


class Receiver:
    """A real HTTP server for webhooks: records every POST; `status` says what to answer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.status: dict[str, int] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def bodies(self, name: str) -> list[dict[str, Any]]:
        return [body for called, body in self.calls if called == name]

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.calls.append((name, orjson.loads(await request.read())))
        status = self.status.get(name, 200)
        return web.Response(status=status, text="load test failed" if status >= 400 else "ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver()
    await made.start()
    yield made
    await made.stop()


def hooked(receiver: Receiver) -> Table:
    hooks = "".join(
        f"        - {{on: {event}, url: '{receiver.url(event)}', timeout: 2s}}\n"
        for event in ("before_step", "after_step", "rollback", "succeeded")
    )
    return make_table(CONFIG + "      webhooks:\n" + hooks)


async def test_webhooks_gate_each_step_and_hear_every_verdict(receiver: Receiver) -> None:
    host = FakeHost(hooked(receiver))
    clock = Clock()
    controller = RolloutController(host, clock=clock)
    try:
        state = await controller.command(host.table, "api", "start")
        assert (state.waiting, state.canary_weight) == (True, 0.0)
        await async_wait_until(lambda: not controller.states["api"].waiting, what="step 0 to begin")
        assert controller.states["api"].canary_weight == 5.0
        (gate,) = receiver.bodies("before_step")
        assert (gate["event"], gate["route"], gate["step"], gate["weight"]) == (
            "before_step",
            "api",
            0,
            5.0,
        )
        for _ in range(12):
            host.serve("canary", ok=25)
            host.serve("blue", ok=475)
            clock.now += 5
            await controller.tick()
        # Passed step 0; step 1 waits for its gate at step 0's weight.
        await async_wait_until(
            lambda: controller.states["api"].canary_weight == 25.0, what="step 1 to begin"
        )
        assert [body["step"] for body in receiver.bodies("before_step")] == [0, 1]
        await async_wait_until(lambda: len(receiver.bodies("after_step")) == 1, what="after_step")
        (after,) = receiver.bodies("after_step")
        assert (after["step"], after["weight"], after["verdict"]) == (0, 5.0, "pass")
        assert after["figures"]["canary"]["requests"] == 300
        assert {test["name"] for test in after["figures"]["tests"]} >= {"errors", "latency"}
        for _ in range(12):
            host.serve("canary", ok=125)
            host.serve("blue", ok=375)
            clock.now += 5
            await controller.tick()
        assert controller.states["api"].state == "succeeded"
        await async_wait_until(lambda: len(receiver.bodies("succeeded")) == 1, what="succeeded")
        (done,) = receiver.bodies("succeeded")
        assert (done["step"], done["verdict"], done["state"]) == (1, "pass", "succeeded")
        assert receiver.bodies("rollback") == []
    finally:
        await controller.close()


async def test_a_refusing_gate_fails_the_step_and_rolls_back(receiver: Receiver) -> None:
    receiver.status["before_step"] = 503
    host = FakeHost(hooked(receiver))
    controller = RolloutController(host, clock=Clock())
    try:
        await controller.command(host.table, "api", "start")
        await async_wait_until(
            lambda: controller.states["api"].state == "failed", what="the refusal"
        )
        state = controller.states["api"]
        assert state.canary_weight == 0.0
        assert state.reason == (
            f"failed at step 0 (5%) before it began: before_step webhook "
            f"{receiver.url('before_step')} answered 503: load test failed"
        )
        assert controller.verdicts[("api", "fail")] == 1
        await async_wait_until(lambda: len(receiver.bodies("rollback")) == 1, what="rollback")
        (rollback,) = receiver.bodies("rollback")
        assert (rollback["verdict"], rollback["state"], rollback["step"]) == ("fail", "failed", 0)
        assert "answered 503" in rollback["reason"]
    finally:
        await controller.close()


async def test_a_silent_gate_times_out_and_fails_the_step(receiver: Receiver) -> None:
    # A port nobody listens on would refuse at once; a listener that never accepts times out.
    silent = socket.create_server(("127.0.0.1", 0), backlog=1)
    try:
        port = silent.getsockname()[1]
        text = CONFIG + (
            f"      webhooks: [{{on: before_step, url: 'http://127.0.0.1:{port}/', "
            "timeout: 300ms}]\n"
        )
        host = FakeHost(make_table(text))
        controller = RolloutController(host, clock=Clock())
        try:
            await controller.command(host.table, "api", "start")
            await async_wait_until(
                lambda: controller.states["api"].state == "failed", what="the timeout"
            )
            assert controller.states["api"].reason.endswith("did not answer within 0.3s")
        finally:
            await controller.close()
    finally:
        silent.close()


async def test_an_abort_while_waiting_drops_the_gate_answer(receiver: Receiver) -> None:
    host = FakeHost(hooked(receiver))
    controller = RolloutController(host, clock=Clock(), webhooks=Webhooks(first_backoff=0.01))
    try:
        await controller.command(host.table, "api", "start")
        aborted = await controller.command(host.table, "api", "abort")
        assert aborted.state == "aborted"
        await async_wait_until(lambda: len(receiver.bodies("rollback")) == 1, what="rollback")
        (rollback,) = receiver.bodies("rollback")
        assert (rollback["verdict"], rollback["reason"]) == (None, "aborted by operator")
        assert controller.states["api"].state == "aborted"
        assert controller.splits(host.table)["api"][0]["canary"] == 0.0
    finally:
        await controller.close()
