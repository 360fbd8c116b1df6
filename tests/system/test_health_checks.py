"""Active health checks: an endpoint failing its check gets no traffic (in every worker, restarted
ones included) and comes back after passing again; all down fails open and is counted; health
state is carried across a reload. Plus the prober in process against real servers.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.control.prober import Prober
from proxy.core.config import parse_config
from proxy.core.health import EndpointKey
from proxy.core.spec import ConfigSpec
from tests.support import async_wait_until, wait_until
from tests.support.rawhttp import get
from tests.support.turnout import TurnoutFactory, TurnoutProcess, free_port
from tests.support.upstreams import EchoUpstream, UpstreamHost

INTERVAL = 0.2
UNHEALTHY_AFTER = 2
HEALTHY_AFTER = 2
# Scheduling on a loaded machine, the checks' own time: bounds a hang, not a performance.
MARGIN = 5.0
DOWN_DEADLINE = INTERVAL * UNHEALTHY_AFTER + MARGIN
UP_DEADLINE = INTERVAL * HEALTHY_AFTER + MARGIN
DEADLINE = 15.0


class CheckedUpstream(EchoUpstream):
    """An echo upstream whose `/health` answers `health_status` (settable while it runs)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.health_status = 200
        self.checks = 0

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            self.checks += 1
            return web.Response(status=self.health_status, text="health\n")
        return await super()._dispatch(request)


def checked(host: UpstreamHost, name: str) -> CheckedUpstream:
    upstream = CheckedUpstream(name)
    host.call(upstream.start())
    return upstream


@pytest.fixture
def pair(upstream_host: UpstreamHost) -> Iterator[tuple[CheckedUpstream, CheckedUpstream]]:
    first, second = checked(upstream_host, "blue-a"), checked(upstream_host, "blue-b")
    yield first, second
    for upstream in (first, second):
        upstream_host.call(upstream.stop())


def health(**extra: Any) -> dict[str, Any]:
    check = {
        "path": "/health",
        "interval": f"{int(INTERVAL * 1000)}ms",
        "timeout": "1s",
        "unhealthy_after": UNHEALTHY_AFTER,
        "healthy_after": HEALTHY_AFTER,
    }
    check.update(extra)
    return check


def config(endpoints: list[str], workers: int = 2) -> dict[str, Any]:
    return {
        "workers": workers,
        "drain": {"delay": "0s", "shutdown": "5s"},
        "upstreams": {"blue": {"endpoints": endpoints, "health": health()}},
        "routes": [{"name": "api", "split": {"blue": 100}}],
    }


def scrape(proc: TurnoutProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"{proc.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def healthy(proc: TurnoutProcess, upstream: EchoUpstream) -> float:
    key = (
        "turnout_endpoint_healthy",
        frozenset({("upstream", "blue"), ("endpoint", upstream.address)}),
    )
    return scrape(proc)[key]


def answered_by(proc: TurnoutProcess, count: int) -> list[str]:
    """Which echo upstream answered each of `count` GETs on fresh connections."""
    names = []
    for _ in range(count):
        response = get(proc.port, "/x")
        assert response.status == 200, response.body
        names.append(response.json()["upstream"])
    return names


def admin_json(proc: TurnoutProcess, path: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(f"{proc.admin_url}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        body = orjson.loads(response.read())
    assert isinstance(body, dict)
    return body


def test_failing_endpoint_gets_no_traffic_then_comes_back(
    turnout_factory: TurnoutFactory, pair: tuple[CheckedUpstream, CheckedUpstream]
) -> None:
    first, second = pair
    proc = turnout_factory(config([first.address, second.address]))
    wait_until(lambda: second.checks > 0, timeout=DEADLINE, what="the first check")
    assert set(answered_by(proc, 20)) == {"blue-a", "blue-b"}

    second.health_status = 500
    wait_until(
        lambda: healthy(proc, second) == 0,
        timeout=DOWN_DEADLINE,
        what="blue-b down after failing its checks",
    )
    # A scrape asks every worker for stats after the health message on the same channel, so
    # every worker already knows.
    assert set(answered_by(proc, 30)) == {"blue-a"}
    assert healthy(proc, first) == 1

    # A worker started now learns the down set before it serves.
    victim = admin_json(proc, "/admin/config")["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        workers = admin_json(proc, "/admin/config")["workers"]
        return (
            len(workers) == 2
            and all(w["ready"] for w in workers)
            and victim not in {w["pid"] for w in workers}
        )

    wait_until(replaced, timeout=DEADLINE, what="a new worker")
    assert set(answered_by(proc, 30)) == {"blue-a"}

    second.health_status = 200
    wait_until(
        lambda: healthy(proc, second) == 1,
        timeout=UP_DEADLINE,
        what="blue-b up after passing its checks",
    )
    wait_until(lambda: "blue-b" in answered_by(proc, 5), timeout=DEADLINE, what="traffic to blue-b")


def test_all_endpoints_down_fails_open_and_is_counted(
    turnout_factory: TurnoutFactory, pair: tuple[CheckedUpstream, CheckedUpstream]
) -> None:
    first, _ = pair
    first.health_status = 503
    proc = turnout_factory(config([first.address], workers=1))
    wait_until(lambda: healthy(proc, first) == 0, timeout=DOWN_DEADLINE, what="blue-a down")
    # Nothing healthy: every endpoint is tried anyway, and each such choice is counted.
    assert answered_by(proc, 7) == ["blue-a"] * 7
    key = ("turnout_endpoint_fail_open_total", frozenset({("upstream", "blue")}))
    wait_until(lambda: scrape(proc)[key] == 7, timeout=DEADLINE, what="7 fail-open requests")


def test_health_state_is_carried_across_a_reload(
    turnout_factory: TurnoutFactory,
    pair: tuple[CheckedUpstream, CheckedUpstream],
    upstream_host: UpstreamHost,
) -> None:
    first, second = pair
    second.health_status = 500
    cfg = config([first.address, second.address])
    proc = turnout_factory(cfg)
    wait_until(lambda: healthy(proc, second) == 0, timeout=DOWN_DEADLINE, what="blue-b down")

    third = checked(upstream_host, "blue-c")
    try:
        third.health_status = 500
        # blue-b stays (still down at once), blue-c is new (up until its checks say otherwise).
        cfg = dict(cfg, listen=proc.config["listen"], admin=proc.config["admin"])
        cfg["upstreams"] = {
            "blue": {
                "endpoints": [first.address, second.address, third.address],
                "health": health(),
            }
        }
        cfg["routes"] = [{"name": "api", "split": {"blue": 100}, "retries": 1}]
        proc.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        assert admin_json(proc, "/admin/reload", "POST")["generation"] == 2
        assert healthy(proc, second) == 0
        assert "blue-b" not in answered_by(proc, 20)
        wait_until(lambda: healthy(proc, third) == 0, timeout=DOWN_DEADLINE, what="blue-c down")
        assert set(answered_by(proc, 20)) == {"blue-a"}
    finally:
        upstream_host.call(third.stop())


async def test_prober_tracks_endpoints_across_updates() -> None:
    # In process: one real HTTP server on two ports; /health answers what `status` holds.
    status = {"code": 200}
    hits: list[tuple[int, str]] = []

    async def health_handler(request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        hits.append((int(sockname[1]) if sockname else 0, request.path))
        return web.Response(status=status["code"])

    app = web.Application()
    app.router.add_get("/{path:.*}", health_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for _ in range(2):
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    first_port, second_port = (int(address[1]) for address in runner.addresses)
    first, second = f"127.0.0.1:{first_port}", f"127.0.0.1:{second_port}"
    dead = f"127.0.0.1:{free_port()}"

    def checks(port: int) -> int:
        return sum(1 for hit_port, _ in hits if hit_port == port)

    changes: list[frozenset[EndpointKey]] = []
    prober = Prober(changes.append)

    def spec(check_path: str, *endpoints: str) -> ConfigSpec:
        text = f"""
upstreams:
  blue:
    endpoints: [{", ".join(endpoints)}]
    health:
      {{path: {check_path}, interval: 50ms, timeout: 1s, unhealthy_after: 2, healthy_after: 1}}
routes: [{{name: all, split: {{blue: 1}}}}]
"""
        return parse_config(text, "t.yaml")

    try:
        prober.update(spec("/a", first))
        await async_wait_until(lambda: checks(first_port) >= 2, what="checks of /a")
        assert prober.down == frozenset()

        status["code"] = 500
        await async_wait_until(lambda: prober.down == {("blue", first)}, what="down")
        assert changes == [frozenset({("blue", first)})]

        # A changed check (another path) keeps the endpoint's state: still down, no change.
        prober.update(spec("/b", first))
        assert prober.down == {("blue", first)}
        status["code"] = 204
        await async_wait_until(lambda: prober.down == frozenset(), what="up via /b")
        assert hits[-1] == (first_port, "/b")

        # New endpoints start up; the removed one is no longer checked.
        prober.update(spec("/b", second, dead))
        assert prober.down == frozenset()
        await async_wait_until(lambda: checks(second_port) >= 1, what="checks of the new one")
        removed_checks = checks(first_port)
        # A refused connection fails the check; two in a row take the endpoint down.
        await async_wait_until(lambda: prober.down == {("blue", dead)}, what="refused: down")
        await async_wait_until(lambda: checks(second_port) >= 4, what="more checks")
        assert checks(first_port) == removed_checks
        assert changes[-1] == frozenset({("blue", dead)})
    finally:
        await prober.close()
        await runner.cleanup()
