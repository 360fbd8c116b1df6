"""The rollout controller driven by a fake clock and synthetic worker counters (no sockets).

The end-to-end proof with real upstreams is in tests/system/test_rollout_e2e.py; here every
branch of the controller is walked quickly and deterministically by calling `tick()`.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy import rollout as core
from proxy.config import parse_config
from proxy.controller import RolloutController, fingerprint
from proxy.stats import DURATION_BUCKETS
from proxy.table import Table, compile_table

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


def make_table(text: str = CONFIG, generation: int = 1) -> Table:
    return compile_table(parse_config(text, "t.yaml"), generation=generation, sha256="x")


class FakeHost:
    """Counts requests per (route, upstream, code) like the workers would, in one fake worker."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.codes: dict[tuple[str, str], dict[int, int]] = {}
        self.changes = 0

    def serve(self, upstream: str, ok: int, errors: int = 0) -> None:
        codes = self.codes.setdefault(("api", upstream), {})
        codes[200] = codes.get(200, 0) + ok
        codes[500] = codes.get(500, 0) + errors

    async def request_stats(self, timeout: float) -> list[dict[str, Any]]:  # noqa: ASYNC109
        routes = []
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
                }
            )
        return [{"routes": routes}]

    async def rollout_changed(self) -> None:
        self.changes += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> tuple[FakeHost, Clock, RolloutController]:
    host = FakeHost(make_table())
    clock = Clock()
    return host, clock, RolloutController(host, clock=clock)


async def test_healthy_canary_walks_every_step_to_100(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
    host, clock, controller = setup
    state = await controller.command(host.table, "api", "start")
    assert (state.state, state.canary_weight) == ("running", 5.0)
    assert controller.splits(host.table) == {"api": ({"blue": 95.0, "canary": 5.0}, "rollout")}
    weights = []
    for _ in range(3):
        host.serve("canary", ok=300)
        host.serve("blue", ok=3000, errors=3)
        clock.now += 61
        await controller.tick()
        weights.append(controller.states["api"].canary_weight)
    assert weights == [25.0, 100.0, 100.0]
    assert controller.states["api"].state == "succeeded"
    assert controller.verdicts[("api", "pass")] == 2
    assert [h.verdict for h in controller.states["api"].history] == ["pass", "pass"]


async def test_failing_canary_is_rolled_back_at_once(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=210, errors=90)
    host.serve("blue", ok=3000, errors=3)
    clock.now += 61
    changes = host.changes
    await controller.tick()
    state = controller.states["api"]
    assert (state.state, state.canary_weight) == ("failed", 0.0)
    assert host.changes == changes + 1
    assert controller.splits(host.table) == {"api": ({"blue": 100.0, "canary": 0.0}, "rollout")}
    assert controller.verdicts[("api", "fail")] == 1


async def test_window_not_due_is_not_judged(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=10, errors=10)
    clock.now += 30
    await controller.tick()
    assert controller.states["api"].state == "running"
    assert controller.states["api"].history == ()


async def test_restart_resumes_and_never_reexposes_a_failed_canary(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    host.serve("canary", ok=300)
    host.serve("blue", ok=3000)
    clock.now += 61
    await controller.tick()
    saved = controller.state_json()
    restarted = RolloutController(host, clock=clock)
    assert restarted.load(saved, host.table) == []
    assert restarted.states["api"].canary_weight == 25.0
    assert restarted.states["api"].state == "running"
    # The first tick after the restart marks a fresh window; the next due one judges it.
    await restarted.tick()
    host.serve("canary", ok=100, errors=200)
    clock.now += 61
    await restarted.tick()
    assert restarted.states["api"].state == "failed"
    again = RolloutController(host, clock=clock)
    again.load(restarted.state_json(), host.table)
    assert again.splits(host.table)["api"][0]["canary"] == 0.0


async def test_config_changed_while_down_aborts_on_load(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
    host, _, controller = setup
    await controller.command(host.table, "api", "start")
    saved = controller.state_json()
    edited = make_table(CONFIG.replace("steps: [5, 25, 100]", "steps: [10, 100]"), 2)
    assert fingerprint(edited.routes[0]) != fingerprint(host.table.routes[0])
    restarted = RolloutController(host)
    restarted.load(saved, edited)
    assert restarted.states["api"].state == "aborted"
    assert restarted.states["api"].canary_weight == 0.0


async def test_reload_changing_the_split_aborts_and_runtime_split_pauses(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
    host, _, controller = setup
    await controller.command(host.table, "api", "start")
    assert controller.runtime_split_set("api")
    assert controller.states["api"].state == "paused"
    assert controller.reconcile(host.table, {"api"})
    assert controller.states["api"].state == "aborted"
    without = make_table(CONFIG.split("    rollout:")[0], 3)
    assert controller.reconcile(without, set())
    assert "api" not in controller.states


async def test_operator_calls_and_their_refusals(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
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


async def test_too_few_requests_three_times_pauses(
    setup: tuple[FakeHost, Clock, RolloutController],
) -> None:
    host, clock, controller = setup
    await controller.command(host.table, "api", "start")
    for _ in range(3):
        host.serve("canary", ok=5)
        clock.now += 61
        await controller.tick()
    state = controller.states["api"]
    assert state.state == "paused"
    assert [h.verdict for h in state.history] == ["inconclusive"] * 3
