"""Automated canary analysis end to end: real Turnout, real upstreams, real traffic.

A healthy canary walks every step to 100; a canary failing 30% of its requests is rolled back
within two intervals; a proxy restarted mid-rollout resumes where it was from its state file.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.support import wait_until
from tests.support.turnout import TurnoutProcess, start_turnout
from tests.support.upstreams import UpstreamHost

INTERVAL_MS = 1500


class FlakyUpstream:
    """Answers `{"upstream": name}`; with `failing`, 3 of every 10 requests get a 500."""

    def __init__(self, name: str, failing: bool = False) -> None:
        self.name = name
        self.failing = failing
        self.count = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.count += 1
        if self.failing and self.count % 10 < 3:
            return web.json_response({"upstream": self.name}, status=500)
        return web.json_response({"upstream": self.name})


class Load:
    """Two keep-alive clients sending GETs through Turnout until stopped; counts by upstream."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        deadline = time.monotonic() + 60  # bounded even if a test forgets to stop it
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", "/api/x")
                response = conn.getresponse()
                body = response.read()
                upstream = orjson.loads(body).get("upstream", "?")
                self.seen[(upstream, response.status)] += 1
            except (OSError, http.client.HTTPException, orjson.JSONDecodeError) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                time.sleep(0.05)
        conn.close()


def admin(turnout: TurnoutProcess, method: str, path: str) -> tuple[int, Any]:
    host, port = turnout.admin_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        conn.close()


def rollout_of(turnout: TurnoutProcess) -> dict[str, Any]:
    status, body = admin(turnout, "GET", "/admin/routes")
    assert status == 200
    (route,) = [r for r in body["routes"] if r["name"] == "api"]
    return dict(route["rollout"] or {}, effective_split=route["effective_split"])


@pytest.fixture
def upstreams(upstream_host: UpstreamHost) -> Iterator[dict[str, FlakyUpstream]]:
    made = {
        "blue": FlakyUpstream("blue"),
        "good": FlakyUpstream("good"),
        "bad": FlakyUpstream("bad", failing=True),
    }
    for upstream in made.values():
        upstream_host.call(upstream.start())
    yield made
    for upstream in made.values():
        upstream_host.call(upstream.stop())


def config(upstreams: dict[str, FlakyUpstream], canary: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "state_file": str(tmp_path / "turnout.state.json"),
        "upstreams": {
            name: {"endpoints": [f"127.0.0.1:{up.port}"]} for name, up in upstreams.items()
        },
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "split": {"blue": 100, canary: 0},
                "rollout": {
                    "baseline": "blue",
                    "canary": canary,
                    "steps": [10, 50, 100],
                    "interval": f"{INTERVAL_MS}ms",
                    "min_requests": 20,
                    "max_error_rate": 0.05,
                    "max_p99": "2s",
                },
            }
        ],
    }


@pytest.mark.timeout(90)
def test_healthy_canary_is_promoted_through_every_step(
    upstreams: dict[str, FlakyUpstream], tmp_path: Path
) -> None:
    turnout = start_turnout(config(upstreams, "good", tmp_path), tmp_path)
    try:
        with Load(turnout.port) as load:
            status, body = admin(turnout, "POST", "/admin/routes/api/rollout/start")
            assert status == 200, body
            assert body["rollout"]["state"] == "running"
            assert body["effective_split"]["good"] == 10
            wait_until(
                lambda: rollout_of(turnout).get("state") == "succeeded",
                timeout=30,
                what="the rollout to succeed",
            )
        final = rollout_of(turnout)
        assert final["effective_split"] == {"blue": 0, "good": 100}
        steps = [(h["step"], h["verdict"]) for h in final["history"]]
        assert steps[-2:] == [(0, "pass"), (1, "pass")], steps
        assert not load.failures
        assert all(code == 200 for (_, code) in load.seen)
        host, port = turnout.admin_url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        assert 'turnout_rollout_verdicts_total{route="api",verdict="pass"} 2.0' in metrics
        assert 'turnout_rollout_step{route="api"}' in metrics
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(90)
def test_failing_canary_is_rolled_back_within_two_intervals(
    upstreams: dict[str, FlakyUpstream], tmp_path: Path
) -> None:
    turnout = start_turnout(config(upstreams, "bad", tmp_path), tmp_path)
    try:
        with Load(turnout.port):
            status, body = admin(turnout, "POST", "/admin/routes/api/rollout/start")
            assert status == 200, body
            started = time.monotonic()
            wait_until(
                lambda: rollout_of(turnout).get("state") == "failed",
                timeout=2 * INTERVAL_MS / 1000 + 5,
                what="the rollback",
            )
            # Two intervals, plus the controller's one-second tick and a scrape of the workers.
            assert time.monotonic() - started < 2 * INTERVAL_MS / 1000 + 2.5
            final = rollout_of(turnout)
            assert final["effective_split"] == {"blue": 100, "bad": 0}
            assert final["history"][-1]["verdict"] == "fail"
            before = upstreams["bad"].count
            time.sleep(0.5)  # traffic keeps flowing; none of it may reach the canary now
            assert upstreams["bad"].count - before <= 2  # requests already in flight at most
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(120)
def test_restart_mid_rollout_resumes_where_it_was(
    upstreams: dict[str, FlakyUpstream], tmp_path: Path
) -> None:
    conf = config(upstreams, "good", tmp_path)
    conf["routes"][0]["rollout"]["interval"] = "3s"
    turnout = start_turnout(conf, tmp_path)
    try:
        with Load(turnout.port):
            status, _ = admin(turnout, "POST", "/admin/routes/api/rollout/start")
            assert status == 200
            wait_until(
                lambda: rollout_of(turnout).get("step") == 1, timeout=20, what="step 1 (50%)"
            )
        assert turnout.stop(20) == 0
        # Same addresses and the same state file: a restart of the same proxy.
        conf["listen"], conf["admin"] = turnout.config["listen"], turnout.config["admin"]
        turnout = start_turnout(conf, tmp_path)
        resumed = rollout_of(turnout)
        assert resumed["state"] == "running"
        assert resumed["step"] == 1
        assert resumed["effective_split"] == {"blue": 50, "good": 50}
        with Load(turnout.port):
            wait_until(
                lambda: rollout_of(turnout).get("state") == "succeeded",
                timeout=30,
                what="the resumed rollout to succeed",
            )
    finally:
        turnout.stop(20)
