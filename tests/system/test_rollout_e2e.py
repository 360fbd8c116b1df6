"""Automated canary analysis end to end: real Turnout, real upstreams, real paced traffic.

At 50 req/s: a canary answering 20% 500s (the baseline 2%) is rolled back at the first or second
look of its first step; a canary identical to its baseline (both 2% 500s) walks to 100%; a proxy
restarted mid-rollout resumes where it was from its state file; after an abort, a DELETE of the
split gives the route its file's split back; `turnout demo --rollout` walks the demo's config to
100% on the 25 req/s it sends.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
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
from tests.support.turnout import PROJECT_ROOT, TurnoutProcess, free_port, start_turnout
from tests.support.upstreams import UpstreamHost

RATE = 50.0  # requests per second through Turnout
CHECK_S = 5  # the default `check`
MAX_LOAD_S = 60.0  # no load runs longer than this, whatever the test does


class FlakyUpstream:
    """Answers `{"upstream": name}`; every `error_every`-th request gets a 500 (0: never)."""

    def __init__(self, name: str, error_every: int = 0) -> None:
        self.name = name
        self.error_every = error_every
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
        failing = self.error_every and self.count % self.error_every == 0
        return web.json_response({"upstream": self.name}, status=500 if failing else 200)


class PacedLoad:
    """GETs through Turnout at `rate` per second on one keep-alive connection, until stopped.

    Bounded: it stops by itself after MAX_LOAD_S. Counts responses by (upstream, status).
    """

    def __init__(self, port: int, rate: float = RATE) -> None:
        self.port = port
        self.period = 1.0 / rate
        self.seen: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PacedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        started = time.monotonic()
        sent = 0
        while not self._stop.is_set() and time.monotonic() - started < MAX_LOAD_S:
            # On a schedule, not "as fast as possible": the rate the rollout is tuned for.
            self._stop.wait(max(0.0, started + sent * self.period - time.monotonic()))
            sent += 1
            try:
                conn.request("GET", "/api/x")
                response = conn.getresponse()
                upstream = orjson.loads(response.read()).get("upstream", "?")
                self.seen[(upstream, response.status)] += 1
            except (OSError, http.client.HTTPException, orjson.JSONDecodeError) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
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


def route_of(turnout: TurnoutProcess) -> dict[str, Any]:
    status, body = admin(turnout, "GET", "/admin/routes")
    assert status == 200
    (route,) = [r for r in body["routes"] if r["name"] == "api"]
    return dict(route)


def rollout_of(turnout: TurnoutProcess) -> dict[str, Any]:
    route = route_of(turnout)
    return dict(route["rollout"] or {}, effective_split=route["effective_split"])


@pytest.fixture
def upstreams(upstream_host: UpstreamHost) -> Iterator[dict[str, FlakyUpstream]]:
    made = {
        "blue": FlakyUpstream("blue", error_every=50),  # 2%
        "good": FlakyUpstream("good", error_every=50),  # 2%: the same as blue
        "bad": FlakyUpstream("bad", error_every=5),  # 20%
    }
    for upstream in made.values():
        upstream_host.call(upstream.start())
    yield made
    for upstream in made.values():
        upstream_host.call(upstream.stop())


def config(
    upstreams: dict[str, FlakyUpstream], canary: str, tmp_path: Path, **rollout: Any
) -> dict[str, Any]:
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
                    "steps": [25, 50, 100],
                    "interval": "6s",
                    "check": "2s",
                    "min_requests": 30,
                    "max_error_rate": 0.1,
                    "max_p99": "2s",
                    **rollout,
                },
            }
        ],
    }


@pytest.mark.timeout(90)
def test_a_canary_with_20_percent_errors_is_rolled_back_within_two_checks(
    upstreams: dict[str, FlakyUpstream], tmp_path: Path
) -> None:
    # The default check (5 s); an interval the step never reaches before the verdict.
    conf = config(upstreams, "bad", tmp_path, steps=[50, 100], interval="30s", check=f"{CHECK_S}s")
    turnout = start_turnout(conf, tmp_path)
    try:
        with PacedLoad(turnout.port) as load:
            status, body = admin(turnout, "POST", "/admin/routes/api/rollout/start")
            assert status == 200, body
            assert body["effective_split"]["bad"] == 50
            wait_until(
                lambda: rollout_of(turnout).get("state") == "failed",
                timeout=3 * CHECK_S + 10,
                what="the rollback",
            )
            final = rollout_of(turnout)
            # Looks come every `check`: rejected at the first or the second.
            assert final["last_check"]["elapsed_s"] < 3 * CHECK_S, final["last_check"]
            assert final["effective_split"] == {"blue": 100, "bad": 0}
            fail = final["history"][-1]
            assert (fail["verdict"], fail["step"], fail["weight"]) == ("fail", 0, 50)
            assert any(test["reject"] for test in fail["tests"])
            assert fail["canary"]["errors"] * 5 == pytest.approx(fail["canary"]["requests"], 5)
            # Traffic keeps flowing; none of it reaches the canary any more.
            before = upstreams["bad"].count
            served = sum(load.seen.values())
            wait_until(lambda: sum(load.seen.values()) >= served + 25, what="25 more requests")
            assert upstreams["bad"].count - before <= 2  # requests already in flight at most
        assert not load.failures
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(90)
def test_identical_versions_with_2_percent_errors_reach_100(
    upstreams: dict[str, FlakyUpstream], tmp_path: Path
) -> None:
    turnout = start_turnout(config(upstreams, "good", tmp_path), tmp_path)
    try:
        with PacedLoad(turnout.port) as load:
            status, body = admin(turnout, "POST", "/admin/routes/api/rollout/start")
            assert status == 200, body
            assert body["rollout"]["state"] == "running"
            assert body["effective_split"]["good"] == 25
            wait_until(
                lambda: rollout_of(turnout).get("state") == "succeeded",
                timeout=40,
                what="the rollout to succeed",
            )
        final = rollout_of(turnout)
        assert final["effective_split"] == {"blue": 0, "good": 100}
        # An interval that ends short of min_requests on a loaded machine is inconclusive,
        # and the step goes on: not a verdict.
        judged = [h for h in final["history"] if h["verdict"] != "inconclusive"]
        assert [(h["step"], h["verdict"]) for h in judged] == [(0, "pass"), (1, "pass")]
        for entry in judged:
            assert entry["canary"]["requests"] >= 30
            assert entry["canary"]["errors"] > 0  # the canary's 2% were seen, and tolerated
            assert not any(test["reject"] for test in entry["tests"])
        assert not load.failures
        assert {code for (_, code) in load.seen} == {200, 500}
        host, port = turnout.admin_url.removeprefix("http://").rsplit(":", 1)

        def metrics() -> str:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            return text

        # A verdict is counted once stored, just after the state the admin API shows: a
        # scrape in between may still miss the last one.
        passes = 'turnout_rollout_verdicts_total{route="api",verdict="pass"} 2.0'
        wait_until(lambda: passes in metrics(), timeout=10, what="both verdicts counted")
        assert 'turnout_rollout_step{route="api"} 1.0' in metrics()
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(120)
def test_restart_mid_rollout_resumes_where_it_was(
    upstreams: dict[str, FlakyUpstream], tmp_path: Path
) -> None:
    conf = config(upstreams, "good", tmp_path)
    turnout = start_turnout(conf, tmp_path)
    try:
        with PacedLoad(turnout.port):
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
        verdicts = [h["verdict"] for h in resumed["history"]]
        assert [v for v in verdicts if v != "inconclusive"] == ["pass"]
        with PacedLoad(turnout.port):
            wait_until(
                lambda: rollout_of(turnout).get("state") == "succeeded",
                timeout=30,
                what="the resumed rollout to succeed",
            )
    finally:
        turnout.stop(20)


@pytest.mark.timeout(60)
def test_delete_of_the_split_after_an_abort_restores_the_file_split(
    upstreams: dict[str, FlakyUpstream], tmp_path: Path
) -> None:
    conf = config(upstreams, "good", tmp_path)
    conf["routes"][0]["split"] = {"blue": 90, "good": 10}
    turnout = start_turnout(conf, tmp_path)
    try:
        status, body = admin(turnout, "POST", "/admin/routes/api/rollout/start")
        assert status == 200, body
        # A PUT pauses the rollout; its DELETE gives the route back to the paused rollout.
        status, body = admin_put(turnout, {"blue": 100})
        assert (status, body["split_source"], body["rollout"]["state"]) == (
            200,
            "runtime",
            "paused",
        )
        status, body = admin(turnout, "DELETE", "/admin/routes/api/split")
        assert (status, body["split_source"], body["effective_split"]) == (
            200,
            "rollout",
            {"blue": 75, "good": 25},
        )
        status, body = admin(turnout, "POST", "/admin/routes/api/rollout/abort")
        assert (status, body["split_source"], body["effective_split"]) == (
            200,
            "rollout",
            {"blue": 100, "good": 0},
        )
        status, body = admin(turnout, "DELETE", "/admin/routes/api/split")
        assert status == 200
        assert (body["split_source"], body["effective_split"]) == ("file", {"blue": 90, "good": 10})
        assert body["rollout"]["state"] == "idle"
        assert body["rollout"]["reason"] == (
            "aborted rollout released: the file's split is in force"
        )
        # In force in the workers: the canary gets traffic again, at the file's 10%.
        with PacedLoad(turnout.port, rate=200.0) as load:
            wait_until(lambda: load.seen[("good", 200)] > 0, what="a request to the canary")
        # And after a restart (the state file says so too).
        assert turnout.stop(20) == 0
        conf["listen"], conf["admin"] = turnout.config["listen"], turnout.config["admin"]
        turnout = start_turnout(conf, tmp_path)
        route = route_of(turnout)
        assert (route["split_source"], route["rollout"]["state"]) == ("file", "idle")
    finally:
        turnout.stop(20)


def admin_put(turnout: TurnoutProcess, weights: dict[str, int]) -> tuple[int, Any]:
    host, port = turnout.admin_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("PUT", "/admin/routes/api/split", body=orjson.dumps(weights))
        response = conn.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_demo_rollout_walks_the_demo_config_to_100_at_hand_traffic(tmp_path: Path) -> None:
    """`turnout demo --rollout` on config/demo.yaml (moved to free ports): 25 req/s suffice."""
    text = (PROJECT_ROOT / "config" / "demo.yaml").read_text(encoding="utf-8")
    for port in (8080, 9901, 9001, 9101, 9201, 9301):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    path = tmp_path / "demo.yaml"
    path.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"}
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("turnout")),
            "demo",
            "--config",
            str(path),
            "--rollout",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd=PROJECT_ROOT,
        check=False,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Rollout of route 'api': canary 'canary' against baseline 'blue'")
    verdicts = [line.split("s  ", 1)[1] for line in lines if " at step " in line]
    assert [v.split(":")[0] for v in verdicts] == ["pass at step 0 (20%)", "pass at step 1 (50%)"]
    assert lines[-1].startswith("Final state: succeeded after ")
    assert lines[-1].endswith("effective split blue 0, canary 100.")
