"""Rollout webhooks end to end: real Turnout, a real HTTP receiver started by the test.

`before_step` gates every step (a refusal fails the rollout before the canary gets any
traffic); `after_step`, `rollback` and `succeeded` arrive as JSON bodies; a notification that
fails is tried again with back-off, and a receiver that never answers holds up neither the
traffic nor the rollout.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.support import wait_until
from tests.support.turnout import TurnoutProcess, start_turnout
from tests.support.upstreams import UpstreamHost
from tests.system.test_rollout_e2e import FlakyUpstream, PacedLoad, admin, rollout_of

BODY_KEYS = {"route", "step", "weight", "verdict", "reason", "figures"}


class Receiver:
    """Records every POST per path; answers from a script of statuses, or hangs.

    `script[name]` lists the statuses to answer in turn (then 200); `hang` names paths that
    never answer (the request is held until the receiver stops).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.script: dict[str, list[int]] = {}
        self.hang: set[str] = set()
        self.port = 0
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None

    async def start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def bodies(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for called, body in self.calls if called == name]

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = orjson.loads(await request.read())
        with self._lock:
            self.calls.append((name, body))
            script = self.script.get(name, [])
            status = script.pop(0) if script else 200
        if name in self.hang and self._release is not None:
            await self._release.wait()
        text = "load test failed: p99 too high" if status >= 400 else "ok"
        return web.Response(status=status, text=text)


@pytest.fixture
def receiver(upstream_host: UpstreamHost) -> Iterator[Receiver]:
    made = Receiver()
    upstream_host.call(made.start())
    yield made
    upstream_host.call(made.stop())


def config(
    upstreams: dict[str, FlakyUpstream], receiver: Receiver, timeout: str = "2s"
) -> dict[str, Any]:
    return {
        "upstreams": {
            name: {"endpoints": [f"127.0.0.1:{up.port}"]} for name, up in upstreams.items()
        },
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "split": {"blue": 100, "canary": 0},
                "rollout": {
                    "baseline": "blue",
                    "canary": "canary",
                    "steps": [25, 50, 100],
                    "interval": "4s",
                    "check": "2s",
                    "min_requests": 20,
                    "webhooks": [
                        {"on": event, "url": receiver.url(event), "timeout": timeout}
                        for event in ("before_step", "after_step", "rollback", "succeeded")
                    ],
                },
            }
        ],
    }


def start(turnout: TurnoutProcess) -> dict[str, Any]:
    status, body = admin(turnout, "POST", "/admin/routes/api/rollout/start")
    assert status == 200, body
    return dict(body)


@pytest.mark.timeout(60)
def test_before_step_gates_each_step_and_every_event_is_heard(
    upstreams: dict[str, FlakyUpstream], receiver: Receiver, tmp_path: Path
) -> None:
    turnout = start_turnout(config(upstreams, receiver), tmp_path)
    try:
        with PacedLoad(turnout.port) as load:
            body = start(turnout)
            # The first step waits for its gate: no canary traffic yet.
            assert (body["rollout"]["waiting"], body["effective_split"]["canary"]) == (True, 0)
            wait_until(
                lambda: rollout_of(turnout).get("state") == "succeeded",
                timeout=40,
                what="the rollout to succeed",
            )
        assert not load.failures
        gates = receiver.bodies("before_step")
        assert [(g["step"], g["weight"], g["verdict"]) for g in gates] == [
            (0, 25.0, None),
            (1, 50.0, None),
        ]
        wait_until(lambda: len(receiver.bodies("succeeded")) == 1, what="succeeded")
        afters = receiver.bodies("after_step")
        assert [(a["step"], a["weight"], a["verdict"]) for a in afters] == [
            (0, 25.0, "pass"),
            (1, 50.0, "pass"),
        ]
        for after in afters:
            assert after.keys() >= BODY_KEYS
            assert after["route"] == "api"
            assert after["figures"]["canary"]["requests"] >= 20
            assert {test["name"] for test in after["figures"]["tests"]} == {
                "errors",
                "latency",
                "error_gate",
                "p99_gate",
            }
        (done,) = receiver.bodies("succeeded")
        assert done.keys() >= BODY_KEYS
        assert (done["step"], done["verdict"], done["state"]) == (1, "pass", "succeeded")
        assert done["reason"].startswith("succeeded: passed step 1 (50%)")
        assert receiver.bodies("rollback") == []
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(60)
def test_a_refusing_before_step_fails_the_rollout_before_any_canary_traffic(
    upstreams: dict[str, FlakyUpstream], receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script["before_step"] = [409]
    turnout = start_turnout(config(upstreams, receiver), tmp_path)
    try:
        with PacedLoad(turnout.port) as load:
            body = start(turnout)
            assert body["rollout"]["waiting"] is True
            assert body["effective_split"]["canary"] == 0
            wait_until(
                lambda: rollout_of(turnout).get("state") == "failed", what="the refused step"
            )
            final = rollout_of(turnout)
            assert final["reason"] == (
                f"failed at step 0 (25%) before it began: before_step webhook "
                f"{receiver.url('before_step')} answered 409: load test failed: p99 too high"
            )
            assert final["effective_split"] == {"blue": 100, "canary": 0}
            assert final["history"][-1]["verdict"] == "fail"
            wait_until(lambda: len(receiver.bodies("rollback")) == 1, what="the rollback")
            served = sum(load.seen.values())
            wait_until(lambda: sum(load.seen.values()) >= served + 10, what="more traffic")
        (rollback,) = receiver.bodies("rollback")
        assert (rollback["step"], rollback["verdict"], rollback["state"]) == (0, "fail", "failed")
        assert "answered 409" in rollback["reason"]
        assert upstreams["canary"].count == 0
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(60)
def test_a_failed_notification_is_tried_again_with_back_off(
    upstreams: dict[str, FlakyUpstream], receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script["rollback"] = [503, 502]
    turnout = start_turnout(config(upstreams, receiver), tmp_path)
    try:
        start(turnout)
        status, body = admin(turnout, "POST", "/admin/routes/api/rollout/abort")
        assert (status, body["rollout"]["state"]) == (200, "aborted")
        wait_until(lambda: len(receiver.bodies("rollback")) == 3, what="three deliveries")
        first, *again = receiver.bodies("rollback")
        assert all(body == first for body in again)  # the same notification each time
        assert (first["verdict"], first["reason"], first["state"]) == (
            None,
            "aborted by operator",
            "aborted",
        )
        wait_until(lambda: "trying again in 2s" in turnout.stderr_text(), what="the log line")
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(60)
def test_a_receiver_that_never_answers_holds_up_nothing(
    upstreams: dict[str, FlakyUpstream], receiver: Receiver, tmp_path: Path
) -> None:
    receiver.hang = {"after_step", "succeeded"}
    turnout = start_turnout(config(upstreams, receiver, timeout="1s"), tmp_path)
    try:
        with PacedLoad(turnout.port) as load:
            start(turnout)
            # Every after_step delivery times out and is tried again; the walk goes on.
            wait_until(
                lambda: rollout_of(turnout).get("state") == "succeeded",
                timeout=40,
                what="the rollout to succeed",
            )
        assert not load.failures
        assert len(receiver.bodies("after_step")) >= 2
        assert "did not answer within 1s; trying again" in turnout.stderr_text()
    finally:
        # Deliveries still under way are cut at shutdown; the exit stays clean.
        assert turnout.stop(20) == 0
