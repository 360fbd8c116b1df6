"""Deployment annotations end to end: a real Turnout posting to a real HTTP server that stands in
for Grafana's annotation API (`POST /api/annotations`).

A runtime split change, a reload (applied and rejected), a rollout start, a step's verdict and
an abort each arrive as one annotation with the right tags and text, carrying the token from
`TURNOUT_GRAFANA_TOKEN`. A Grafana that holds its connections open delays neither the admin
answers nor the change, and what it did not take is posted again once it answers.

At the end, in-process: the helpers `reload_changes` and `annotation_body`, and the rollout
controller's events on the paths the end-to-end test does not take.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from proxy.control.annotations import MAX_TEXT, Event, annotation_body, reload_changes
from proxy.control.rollouts import RolloutController
from proxy.control.webhooks import Webhooks
from proxy.core.config import parse_config
from proxy.core.table import compile_table
from tests.support import async_wait_until, wait_until
from tests.support.turnout import TurnoutProcess, start_turnout
from tests.support.upstreams import UpstreamHost
from tests.system.test_rollout_e2e import FlakyUpstream, PacedLoad, admin, rollout_of
from tests.unit.test_controller import Clock, FakeHost, Receiver, hooked

TOKEN = "glsa_annotations-test"
ROLLOUT_TAGS = ["route:api", "upstream:blue", "upstream:canary"]


class FakeGrafana:
    """Grafana's `POST /api/annotations`, under the base path `/grafana/`.

    Records every POST (headers and JSON body) and answers `{"id", "message"}` like Grafana.
    `script` lists statuses to answer in turn (then 200). While `holding` is set, each POST is
    held open, unanswered, until `release(status)`.
    """

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.script: list[int] = []
        self.holding = False
        self.port = 0
        self._held: list[tuple[web.Request, asyncio.Future[int]]] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/grafana/api/annotations", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        await self.release(200)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/grafana/"

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [body for _, body in self.posts]

    def with_tag(self, tag: str) -> list[dict[str, Any]]:
        return [body for body in self.bodies() if tag in body["tags"]]

    def held_open(self) -> int:
        """POSTs held unanswered whose connection Turnout still keeps open."""
        with self._lock:
            return sum(
                1
                for request, _ in self._held
                if request.transport is not None and not request.transport.is_closing()
            )

    async def release(self, status: int) -> None:
        """Answer every held POST with `status`, and hold no more."""
        with self._lock:
            self.holding = False
            held, self._held = self._held, []
        for _, answer in held:
            if not answer.done():
                answer.set_result(status)

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        with self._lock:
            self.posts.append((dict(request.headers), body))
            status = self.script.pop(0) if self.script else 200
            answer: asyncio.Future[int] | None = None
            if self.holding:
                answer = asyncio.get_running_loop().create_future()
                self._held.append((request, answer))
        if answer is not None:
            status = await answer
        if status != 200:
            return web.json_response({"message": "database is locked"}, status=status)
        return web.json_response({"id": len(self.posts), "message": "Annotation added"})


@pytest.fixture
def grafana(upstream_host: UpstreamHost) -> Iterator[FakeGrafana]:
    made = FakeGrafana()
    upstream_host.call(made.start())
    yield made
    upstream_host.call(made.stop())


@pytest.fixture(autouse=True)
def grafana_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token Turnout's subprocess finds in its environment."""
    monkeypatch.setenv("TURNOUT_GRAFANA_TOKEN", TOKEN)


def config(
    upstreams: dict[str, FlakyUpstream], grafana: FakeGrafana, timeout: str = "5s", **rollout: str
) -> dict[str, Any]:
    return {
        "annotations": {"grafana": grafana.url, "timeout": timeout},
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
                    "interval": "2s",
                    "check": "1s",
                    "min_requests": 20,
                    "max_p99": "2s",
                    **rollout,
                },
            },
            {"name": "web", "split": {"blue": 1}},
        ],
    }


def write_config(turnout: TurnoutProcess, text: str) -> None:
    """Replace the config file at once (the file watch never reads half of it)."""
    temporary = turnout.config_path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, turnout.config_path)


def one(grafana: FakeGrafana, tag: str, count: int = 1) -> dict[str, Any]:
    """Wait for the `count`-th annotation tagged `tag`; return it."""
    wait_until(lambda: len(grafana.with_tag(tag)) >= count, what=f"annotation #{count} `{tag}`")
    return grafana.with_tag(tag)[count - 1]


def annotations_total(turnout: TurnoutProcess, result: str) -> float:
    with urllib.request.urlopen(f"{turnout.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'^turnout_annotations_total{{result="{result}"}} (\S+)$', text, re.M)
    assert found is not None, text
    return float(found.group(1))


@pytest.mark.timeout(90)
def test_splits_reloads_and_rollout_events_are_annotated_with_tags(
    upstreams: dict[str, FlakyUpstream], grafana: FakeGrafana, tmp_path: Path
) -> None:
    turnout = start_turnout(config(upstreams, grafana), tmp_path)
    try:
        # A runtime split: set, then dropped.
        before_ms = int(time.time() * 1000)
        status, _ = admin_json(
            turnout, "PUT", "/admin/routes/api/split", b'{"blue": 1, "canary": 1}'
        )
        assert status == 200
        put = one(grafana, "split")
        assert put["tags"] == ["turnout", "split", *ROLLOUT_TAGS]
        assert put["text"].startswith(
            "api: runtime split set: blue 50%, canary 50% (was blue 100%, canary 0%) (on "
        )
        assert before_ms <= put["time"] <= int(time.time() * 1000)
        headers = grafana.posts[0][0]
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Content-Type"] == "application/json"
        assert admin_json(turnout, "DELETE", "/admin/routes/api/split")[0] == 200
        dropped = one(grafana, "split", 2)
        assert dropped["tags"] == ["turnout", "split", *ROLLOUT_TAGS]
        assert dropped["text"].startswith(
            "api: runtime split dropped, the file's split is in force: blue 100%, canary 0% "
            "(was blue 50%, canary 50%)"
        )

        # A reload that changes route web's split (the file watch may be the one to apply it).
        conf = turnout.config
        conf["routes"][1]["split"] = {"blue": 1, "canary": 1}
        write_config(turnout, yaml.safe_dump(conf, sort_keys=False))
        assert admin_json(turnout, "POST", "/admin/reload")[0] == 200
        reload = one(grafana, "reload")
        assert reload["tags"] == [
            "turnout",
            "reload",
            "route:web",
            "upstream:blue",
            "upstream:canary",
        ]
        assert re.match(
            r"config reloaded \((admin|watch)\): generation \d+ in force, sha256 [0-9a-f]{12}; "
            r"1 route changed \(web\), 2 upstreams changed \(blue, canary\) \(on ",
            reload["text"],
        ), reload["text"]
        # A rejected file: the old config stays, and that is annotated too.
        write_config(turnout, "upstreams: {}\nroutes: []\n")
        assert admin_json(turnout, "POST", "/admin/reload")[0] == 400
        rejected = one(grafana, "failed")
        assert rejected["tags"] == ["turnout", "reload", "failed"]
        assert re.match(
            r"config reload \((admin|watch)\) rejected; generation \d+ stays: "
            r".*turnout\.yaml:1:12: upstreams: at least one upstream is required \(and 1 more\)",
            rejected["text"],
        ), rejected["text"]
        assert len(grafana.with_tag("reload")) == len(grafana.with_tag("failed")) + 1

        # A rollout: start, the first step passes, then an abort rolls the canary back.
        with PacedLoad(turnout.port) as load:
            assert admin_json(turnout, "POST", "/admin/routes/api/rollout/start")[0] == 200
            started = one(grafana, "rollout")
            assert started["tags"] == ["turnout", "rollout", *ROLLOUT_TAGS]
            assert started["text"].startswith(
                "api: rollout started: canary at 25% (state running, step 0, canary 25%)"
            )
            passed = one(grafana, "verdict:pass")
        assert not load.failures
        # No traffic any more: step 1 cannot pass before the abort.
        assert passed["tags"] == ["turnout", "rollout", "verdict:pass", *ROLLOUT_TAGS]
        assert passed["text"].startswith(
            "api: rollout verdict pass: passed step 0 (25%); canary at 50% "
            "(state running, step 1, canary 50%)"
        )
        assert admin_json(turnout, "POST", "/admin/routes/api/rollout/abort")[0] == 200
        aborted = one(grafana, "rollback")
        assert aborted["tags"] == ["turnout", "rollout", "rollback", *ROLLOUT_TAGS]
        assert aborted["text"].startswith(
            "api: rollout aborted by operator (state aborted, step 1, canary 0%)"
        )
        assert rollout_of(turnout)["effective_split"] == {"blue": 100, "canary": 0}
        every = grafana.bodies()
        wait_until(lambda: annotations_total(turnout, "sent") == len(every), what="the sent count")
        assert annotations_total(turnout, "failed") == 0
    finally:
        assert turnout.stop(20) == 0


@pytest.mark.timeout(60)
def test_a_grafana_that_hangs_or_fails_delays_nothing_and_is_posted_to_again(
    upstreams: dict[str, FlakyUpstream],
    grafana: FakeGrafana,
    upstream_host: UpstreamHost,
    tmp_path: Path,
) -> None:
    # Each attempt may take 30 s: Turnout keeps the connections open for the whole test. No
    # verdict comes in a 60 s interval: the annotations are exactly the test's three.
    conf = config(upstreams, grafana, timeout="30s", interval="60s", check="5s")
    turnout = start_turnout(conf, tmp_path)
    try:
        grafana.holding = True
        assert admin_json(turnout, "PUT", "/admin/routes/api/split", b'{"canary": 1}')[0] == 200
        wait_until(lambda: grafana.held_open() == 1, what="the first annotation to be held")
        # Grafana holds that connection: the next calls answer anyway, with their change done.
        status, body = admin_json(turnout, "PUT", "/admin/routes/web/split", b'{"canary": 1}')
        assert (status, body["effective_split"]) == (200, {"blue": 0.0, "canary": 100.0})
        status, body = admin_json(turnout, "POST", "/admin/routes/api/rollout/start")
        assert (status, body["rollout"]["state"]) == (200, "running")
        assert grafana.held_open() >= 1
        wait_until(lambda: grafana.held_open() == 3, what="three annotations held")
        texts = {body["text"] for body in grafana.bodies()}
        assert len(texts) == 3
        # Grafana answers them 500 at last, then 503 once: each is posted again until a 200.
        grafana.script = [503]
        upstream_host.call(grafana.release(500))
        wait_until(
            lambda: annotations_total(turnout, "sent") == 3, timeout=20, what="all three sent"
        )
        for text in texts:
            copies = [body for body in grafana.bodies() if body["text"] == text]
            assert len(copies) >= 2
            # The same annotation each time: the time is the event's, not the attempt's.
            assert all(copy == copies[0] for copy in copies)
        assert len(grafana.bodies()) == 7
        assert annotations_total(turnout, "failed") == 0
        # Rate-limited: one warning line for the first problem, the later ones left out.
        warnings = [line for line in turnout.stderr_text().splitlines() if "annotation to" in line]
        assert len(warnings) == 1, warnings
        assert "Grafana answered 500" in warnings[0]
        assert "trying again in 1s" in warnings[0]
    finally:
        assert turnout.stop(20) == 0


def admin_json(
    turnout: TurnoutProcess, method: str, path: str, body: bytes | None = None
) -> tuple[int, Any]:
    """One admin call with an optional body: (status, JSON answer)."""
    if body is None:
        return admin(turnout, method, path)
    request = urllib.request.Request(f"{turnout.admin_url}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), orjson.loads(exc.read())


# --- the pure helpers, in-process ----------------------------------------------------------------

BASE = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001"]}
  green: {endpoints: ["127.0.0.1:9101"]}
routes:
  - name: api
    match: {path_prefix: /api}
    split: {blue: 90, green: 10}
  - name: web
    split: {blue: 1}
"""


def test_reload_changes_names_what_changed() -> None:
    def table(text: str) -> Any:
        return compile_table(parse_config(text, "/t.yaml"), generation=1, sha256="x")

    old = table(BASE)
    assert reload_changes(old, table(BASE + "timeouts: {connect: 1s}\n")) == ((), ())
    moved = BASE.replace("{blue: 90, green: 10}", "{blue: 50, green: 50}")
    assert reload_changes(old, table(moved)) == (("api",), ("blue", "green"))
    endpoint = BASE.replace("127.0.0.1:9101", "127.0.0.1:9102")
    assert reload_changes(old, table(endpoint)) == ((), ("green",))
    gone = BASE.replace("  - name: web\n    split: {blue: 1}\n", "")
    assert reload_changes(old, table(gone)) == (("web",), ())


def test_annotation_body_is_grafanas_shape_and_bounded() -> None:
    event = Event(kind="split", text="api: x", routes=("api",), upstreams=("blue",))
    assert annotation_body(event, 1_700_000_000_123, "host-1") == {
        "time": 1_700_000_000_123,
        "tags": ["turnout", "split", "route:api", "upstream:blue"],
        "text": "api: x (on host-1)",
    }
    long = annotation_body(Event(kind="reload", text="e" * 5000), 1, "h")
    assert len(str(long["text"])) == MAX_TEXT
    assert str(long["text"]).endswith("...")


async def test_every_rollout_change_is_handed_to_annotate_once() -> None:
    """The paths the end-to-end test does not take: a `before_step` gate that opens a step or
    refuses it, and a reload that ends a rollout."""
    events: list[Event] = []
    receiver = Receiver()
    await receiver.start()
    host = FakeHost(hooked(receiver))
    controller = RolloutController(
        host, clock=Clock(), webhooks=Webhooks(first_backoff=0.01), annotate=events.append
    )
    gate = f"before_step webhook {receiver.url('before_step')}"
    try:
        await controller.command(host.table, "api", "start")
        await async_wait_until(lambda: len(events) == 2, what="step 0 to begin")
        controller.reconcile(host.table, {"api"})
        receiver.status["before_step"] = 503
        await controller.command(host.table, "api", "start")
        await async_wait_until(lambda: len(events) == 5, what="the refusal")
    finally:
        await controller.close()
        await receiver.stop()
    waiting = "started: waiting for the before_step webhooks of step 0 (5%)"
    assert [(event.text, event.labels) for event in events] == [
        (f"api: rollout {waiting} (state running, step 0, canary 0%)", ()),
        ("api: rollout step 0 began: canary at 5% (state running, step 0, canary 5%)", ()),
        ("api: rollout config changed (state aborted, step 0, canary 0%)", ("rollback",)),
        (f"api: rollout {waiting} (state running, step 0, canary 0%)", ()),
        (
            f"api: rollout failed at step 0 (5%) before it began: {gate} answered 503: load "
            "test failed (state failed, step 0, canary 0%)",
            ("verdict:fail", "rollback"),
        ),
    ]
    assert {(event.kind, event.routes, event.upstreams) for event in events} == {
        ("rollout", ("api",), ("blue", "canary"))
    }
