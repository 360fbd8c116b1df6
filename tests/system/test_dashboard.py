"""The dashboard page (`GET /` on admin) in a real headless Chromium, against a real Turnout.

Chromium is Debian's (`apt-get install chromium`), driven by Playwright for Python with that
executable (`playwright install` is never needed). The browser tests skip, saying why, when
either is missing. Every request the page makes is recorded: it must only ever talk to the
admin port.

Set TURNOUT_DASHBOARD_SCREENSHOT=docs/img/dashboard.png to write the screenshot of the docs
(the test takes one into its temporary folder otherwise).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.support import wait_until
from tests.support.turnout import PROJECT_ROOT, TurnoutProcess, free_port, start_turnout
from tests.support.upstreams import EchoUpstream

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, sync_playwright
except ImportError:  # the skip below says what to install
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True

CHROMIUM = os.environ.get("TURNOUT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "dashboard-s3cret"
# The page refreshes every 2 s and needs two answers for a rate: a few refreshes at most.
DEADLINE = 20.0
# Bounds on the traffic a test sends.
MAX_LOAD_S = 30.0
RATE = 40.0

MISSING = (
    "needs Playwright for Python (pip install playwright) and Debian's chromium "
    f"(apt-get install chromium; looked for {CHROMIUM}, or set TURNOUT_CHROMIUM)"
)


# --- traffic and the admin API ----------------------------------------------------------------


class Traffic:
    """GETs through Turnout at RATE per second on one keep-alive connection until stopped.

    Bounded: stops by itself after MAX_LOAD_S. Counts answers by (upstream, status).
    """

    def __init__(self, turnout: TurnoutProcess, paths: list[str]) -> None:
        self.port = turnout.port
        self.paths = paths
        self.seen: Counter[tuple[str, int]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
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
            self._stop.wait(max(0.0, started + sent / RATE - time.monotonic()))
            path = self.paths[sent % len(self.paths)]
            sent += 1
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                self.seen[(response.getheader("X-Upstream", "?"), response.status)] += 1
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.close()


def answered_by(turnout: TurnoutProcess, path: str, count: int) -> Counter[str]:
    """Send `count` GETs to `path`; the X-Upstream of each answer."""
    seen: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", turnout.port, timeout=5)
    try:
        for _ in range(count):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            seen[response.getheader("X-Upstream", "?")] += 1
    finally:
        conn.close()
    return seen


def admin(
    turnout: TurnoutProcess, method: str, path: str, *, token: str | None = None
) -> tuple[int, Any, dict[str, str]]:
    """One admin call: (status, body as JSON or text, headers)."""
    request = urllib.request.Request(f"{turnout.admin_url}{path}", method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), exc.headers
    is_json = headers.get("Content-Type", "").startswith("application/json")
    return status, orjson.loads(raw) if is_json else raw.decode(), dict(headers)


def routes_of(turnout: TurnoutProcess, token: str | None = None) -> dict[str, dict[str, Any]]:
    status, body, _ = admin(turnout, "GET", "/admin/routes", token=token)
    assert status == 200, body
    return {route["name"]: route for route in body["routes"]}


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not HAVE_PLAYWRIGHT or not os.access(CHROMIUM, os.X_OK):
        pytest.skip(MISSING)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Dashboard:
    """A page open on a Turnout's dashboard that records what it asked for and any JS error."""

    def __init__(self, browser: Browser, turnout: TurnoutProcess) -> None:
        self.origin = turnout.admin_url
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page: Page = self.context.new_page()
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.page.on("request", self._request)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)
        # Every button that changes traffic asks first; the tests say yes.
        self.page.on("dialog", lambda dialog: dialog.accept())
        self.page.goto(f"{self.origin}/")

    def _request(self, request: Request) -> None:
        self.requests.append(request)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def close(self) -> None:
        self.context.close()

    def row(self, route: str, upstream: str) -> Any:
        return self.page.locator(f'section[data-route="{route}"] tr[data-upstream="{upstream}"]')

    def value(self, route: str, upstream: str, field: str) -> float | None:
        """A version's figure as the page computed it (`data-value`); None while it shows a dash."""
        cell = self.row(route, upstream).locator(f'[data-field="{field}"]')
        raw = cell.get_attribute("data-value", timeout=DEADLINE * 1000)
        return float(raw) if raw else None

    def wait_for(self, condition: Any, what: str) -> None:
        wait_until(condition, timeout=DEADLINE, what=what)

    def outside_origin(self) -> list[str]:
        return [r.url for r in self.requests if not r.url.startswith(self.origin + "/")]


@pytest.fixture
def open_dashboard(browser: Browser) -> Iterator[Any]:
    opened: list[Dashboard] = []

    def factory(turnout: TurnoutProcess) -> Dashboard:
        dashboard = Dashboard(browser, turnout)
        opened.append(dashboard)
        return dashboard

    yield factory
    for dashboard in opened:
        dashboard.close()


# --- Turnout ------------------------------------------------------------------------------------


def config(blue: EchoUpstream, green: EchoUpstream, tmp_path: Path) -> dict[str, Any]:
    return {
        "state_file": str(tmp_path / "turnout.state.json"),
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [
            {"name": "api", "match": {"path_prefix": "/api"}, "split": {"blue": 100, "green": 0}},
            {
                "name": "checkout",
                "match": {"path_prefix": "/checkout"},
                "split": {"blue": 100, "green": 0},
                "rollout": {
                    "baseline": "blue",
                    "canary": "green",
                    "steps": [10, 50, 100],
                    "interval": "1500ms",
                    "min_requests": 3,
                },
            },
            {"name": "web", "split": {"blue": 50, "green": 50}},
        ],
    }


@pytest.fixture
def turnout(blue: EchoUpstream, green: EchoUpstream, tmp_path: Path) -> Iterator[TurnoutProcess]:
    proc = start_turnout(config(blue, green, tmp_path), tmp_path)
    yield proc
    proc.close()


@pytest.fixture
def guarded(blue: EchoUpstream, green: EchoUpstream, tmp_path: Path) -> Iterator[TurnoutProcess]:
    """A Turnout with TURNOUT_ADMIN_TOKEN set (the harness's launcher always clears it)."""
    cfg = config(blue, green, tmp_path)
    cfg.update(listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{free_port()}")
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TURNOUT_ADMIN_TOKEN=TOKEN)
    with open(path.with_suffix(".stderr"), "wb") as stderr:
        popen = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", str(path), "--no-access-log"],
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
    proc = TurnoutProcess(popen, cfg, path)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.close()


# --- the tests ----------------------------------------------------------------------------------


def test_page_renders_every_route_and_version(turnout: TurnoutProcess, open_dashboard: Any) -> None:
    dashboard = open_dashboard(turnout)
    page = dashboard.page
    routes = routes_of(turnout)
    page.wait_for_selector("section[data-route]", timeout=DEADLINE * 1000)
    shown = page.eval_on_selector_all("section[data-route]", "els => els.map(e => e.dataset.route)")
    assert shown == list(routes)  # table order
    for name, route in routes.items():
        versions = page.eval_on_selector_all(
            f'section[data-route="{name}"] tr[data-upstream]',
            "els => els.map(e => e.dataset.upstream)",
        )
        assert set(versions) == set(route["effective_split"]), name
        for upstream, share in route["effective_split"].items():
            assert dashboard.value(name, upstream, "split") == pytest.approx(share)
    # The rollout of `checkout` has not started: the page says so and offers only `start`.
    rollout = page.locator('section[data-route="checkout"] [data-field="rollout"]')
    assert rollout.locator('[data-field="rollout-state"]').inner_text() == "idle"
    visible = rollout.locator("button[data-action]:visible")
    assert visible.evaluate_all("els => els.map(e => e.dataset.action)") == ["start"]
    assert page.locator('section[data-route="api"] [data-field="rollout"]').count() == 0
    assert dashboard.outside_origin() == []
    assert dashboard.errors == []


def test_numbers_move_under_traffic(turnout: TurnoutProcess, open_dashboard: Any) -> None:
    dashboard = open_dashboard(turnout)
    # A quarter of api's requests answer 500: all of api's traffic goes to blue (100/0).
    with Traffic(turnout, ["/api/a", "/api/b", "/api/c", "/api/status/500"]) as traffic:
        dashboard.wait_for(
            lambda: (
                (dashboard.value("api", "blue", "rps") or 0) > 0
                and (dashboard.value("api", "blue", "errors") or 0) > 0
            ),
            "req/s and error % of api/blue above 0",
        )
        p99 = dashboard.value("api", "blue", "p99")
        assert p99 is not None
        assert p99 > 0
        # green gets nothing on api, and no route but api gets traffic.
        assert not dashboard.value("api", "green", "rps")
        assert not dashboard.value("web", "blue", "rps")
    assert set(traffic.seen) == {("blue", 200), ("blue", 500)}
    text = dashboard.row("api", "blue").locator('[data-field="rps"]').inner_text()
    assert re.fullmatch(r"[\d.,]+", text), text
    assert dashboard.outside_origin() == []
    assert dashboard.errors == []


def test_flip_from_the_page_moves_traffic(turnout: TurnoutProcess, open_dashboard: Any) -> None:
    dashboard = open_dashboard(turnout)
    assert answered_by(turnout, "/api/x", 10) == Counter(blue=10)
    dashboard.row("api", "green").locator('button[data-action="flip"]').click()
    dashboard.wait_for(
        lambda: dashboard.value("api", "green", "split") == 100, "the page to show green at 100 %"
    )
    route = routes_of(turnout)["api"]
    assert route["split_source"] == "runtime"
    assert answered_by(turnout, "/api/x", 20) == Counter(green=20)
    # The page shows that a runtime split is in force, and offers the way back.
    section = dashboard.page.locator('section[data-route="api"]')
    assert section.locator('[data-field="source"]').inner_text() == "runtime split"
    section.locator('button[data-action="reset"]').click()
    dashboard.wait_for(
        lambda: dashboard.value("api", "blue", "split") == 100, "the page to show blue at 100 %"
    )
    assert routes_of(turnout)["api"]["split_source"] == "file"
    assert answered_by(turnout, "/api/x", 20) == Counter(blue=20)
    assert dashboard.errors == []


def test_rollout_step_history_and_buttons(
    turnout: TurnoutProcess, open_dashboard: Any, tmp_path: Path
) -> None:
    dashboard = open_dashboard(turnout)
    section = dashboard.page.locator('section[data-route="checkout"]')
    state = section.locator('[data-field="rollout-state"]')

    def click(action: str) -> None:
        section.locator(f'button[data-action="{action}"]').click()

    # Start and abort from the page: the canary is on 10 %, then back to 0.
    click("start")
    dashboard.wait_for(lambda: state.inner_text() == "running", "rollout running")
    assert section.locator('[data-field="rollout-step"]').inner_text() == "step 0 · canary at 10 %"
    assert routes_of(turnout)["checkout"]["effective_split"]["green"] == pytest.approx(10)
    click("abort")
    dashboard.wait_for(lambda: state.inner_text() == "aborted", "rollout aborted")
    assert routes_of(turnout)["checkout"]["effective_split"]["green"] == 0
    # A button the state no longer allows (a page another operator overtook): the server's
    # refusal is shown as it came.
    pause = section.locator('button[data-action="pause"]')
    assert pause.is_hidden()
    pause.evaluate("button => { button.hidden = false; }")
    pause.click()
    status, refusal, _ = admin(turnout, "POST", "/admin/routes/checkout/rollout/pause")
    assert status == 409
    message = dashboard.page.locator("#message")
    dashboard.wait_for(
        lambda: message.inner_text() == f"Rollout of checkout: pause: {refusal['error']}",
        "the refusal in the page",
    )
    # Promote overrides the abort: all of checkout to green.
    click("promote")
    dashboard.wait_for(lambda: state.inner_text() == "succeeded", "rollout promoted")
    assert answered_by(turnout, "/checkout/x", 10) == Counter(green=10)

    # A new rollout under traffic: the verdicts appear in the page as the API lists them.
    click("start")
    dashboard.wait_for(lambda: state.inner_text() == "running", "second rollout running")
    history = section.locator('[data-field="history"] tbody tr')
    paths = ["/checkout/a", "/api/x", "/checkout/b", "/api/slow?ms=20", "/checkout/c", "/x"]
    with Traffic(turnout, [*paths, *paths, "/api/status/503"]):

        def verdicts_shown() -> bool:
            entries = (routes_of(turnout)["checkout"]["rollout"] or {}).get("history", [])
            shown = history.evaluate_all(
                "rows => rows.map(r => r.cells.length > 3 ? r.cells[3].innerText : '')"
            )
            return len(entries) >= 2 and shown == [e["verdict"] for e in entries[::-1][:10]]

        dashboard.wait_for(verdicts_shown, "the verdict history in the page")
        dashboard.wait_for(
            lambda: (
                (dashboard.value("api", "blue", "rps") or 0) > 0
                and (dashboard.value("web", "green", "rps") or 0) > 0
            ),
            "rates on api and web",
        )
        target = os.environ.get("TURNOUT_DASHBOARD_SCREENSHOT")
        shot = Path(target) if target else tmp_path / "dashboard.png"
        dashboard.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert dashboard.outside_origin() == []
    # Chromium logs the refused call; nothing else went wrong.
    assert dashboard.errors == [
        "Failed to load resource: the server responded with a status of 409 (Conflict)"
    ]


def test_with_a_token(guarded: TurnoutProcess, open_dashboard: Any) -> None:
    # The page and its assets carry no data and are served without the token; data calls are not.
    for path in ("/", "/dashboard.js", "/dashboard.css"):
        assert admin(guarded, "GET", path)[0] == 200, path
    for path in ("/admin/stats", "/admin/routes"):
        status, body, _ = admin(guarded, "GET", path)
        assert (status, body) == (401, {"error": "missing or wrong admin token"}), path
    status, _, _ = admin(guarded, "PUT", "/admin/routes/api/split")
    assert status == 401

    dashboard = open_dashboard(guarded)
    page = dashboard.page
    form = page.locator("#token-form")
    form.wait_for(state="visible", timeout=DEADLINE * 1000)
    assert page.locator("section[data-route]").count() == 0
    # A wrong token is refused and asked again.
    page.fill("#token", "not-the-token")
    page.click("#token-form button[type=submit]")
    page.locator("#token-error").wait_for(state="visible", timeout=DEADLINE * 1000)
    assert "refused" in page.locator("#token-error").inner_text()
    assert page.locator("section[data-route]").count() == 0

    page.fill("#token", TOKEN)
    before = len(dashboard.requests)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector('section[data-route="api"]', timeout=DEADLINE * 1000)
    assert form.is_hidden()
    dashboard.row("api", "green").locator('button[data-action="flip"]').click()
    dashboard.wait_for(
        lambda: routes_of(guarded, TOKEN)["api"]["effective_split"]["green"] == 100,
        "the flip made with the token",
    )
    assert answered_by(guarded, "/api/x", 10) == Counter(green=10)
    # Every data call of the page since carried the token: the reads, and the flip's PUT.
    data_calls = [r for r in dashboard.requests[before:] if "/admin/" in r.url]
    assert {r.method for r in data_calls} == {"GET", "PUT"}
    assert {r.headers.get("authorization") for r in data_calls} == {f"Bearer {TOKEN}"}
    assert dashboard.outside_origin() == []


def test_stats_are_the_metrics_counters(turnout: TurnoutProcess) -> None:
    with Traffic(turnout, ["/api/x", "/api/status/502", "/x"]):
        wait_until(
            lambda: (
                admin(turnout, "GET", "/admin/stats")[1]["routes"][0]["upstreams"][0]["requests"]
                >= 20
            ),
            timeout=DEADLINE,
            what="20 requests on api/blue in /admin/stats",
        )
    # A scrape polls every worker; with no traffic since, /admin/stats holds the same counts.
    _, text, _ = admin(turnout, "GET", "/metrics")
    status, stats, headers = admin(turnout, "GET", "/admin/stats")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert 0 <= stats["poll_age"] < 5
    assert isinstance(stats["poll_time"], float)
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("turnout_request", "turnout_grpc_responses"))
    }
    pairs = 0
    for route in stats["routes"]:
        for upstream in route["upstreams"]:
            labels = f'route="{route["name"]}",upstream="{upstream["name"]}"'
            codes = {
                int(m.group(1)): value
                for key, value in samples.items()
                if (m := re.fullmatch(rf'turnout_requests_total\{{code="(\d+)",{labels}\}}', key))
            }
            assert upstream["requests"] == sum(codes.values()), labels
            assert upstream["errors_5xx"] == sum(v for c, v in codes.items() if c >= 500), labels
            grpc_errors = sum(
                value
                for key, value in samples.items()
                if re.fullmatch(
                    rf'turnout_grpc_responses_total\{{grpc_status="(UNKNOWN|DEADLINE_EXCEEDED|'
                    rf'UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS)",{labels}\}}',
                    key,
                )
            )
            assert upstream["errors"] == upstream["errors_5xx"] + grpc_errors, labels
            if not upstream["requests"]:
                assert upstream["buckets"] == []
                continue
            pairs += 1
            cumulative = 0
            bounds = [repr(float(b)) for b in stats["le"]] + ["+Inf"]
            for bound, count in zip(bounds, upstream["buckets"], strict=True):
                cumulative += count
                key = f'turnout_request_duration_seconds_bucket{{le="{bound}",{labels}}}'
                assert samples[key] == cumulative, key
    # api/blue (200 and 502), and web/blue or web/green or both (web's split is drawn at random).
    assert pairs >= 2


def test_page_headers_forbid_framing_and_foreign_code(turnout: TurnoutProcess) -> None:
    status, html, headers = admin(turnout, "GET", "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["X-Frame-Options"] == "DENY"
    policy = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    # No asset from elsewhere: every src and href of the page is a path on this server.
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links
    assert all(link.startswith("/") and not link.startswith("//") for link in links), links
    assert admin(turnout, "GET", "/dashboard.js")[2]["Content-Type"].startswith("text/javascript")
