"""The admin API through a real Turnout: /admin/routes, runtime splits (PUT/DELETE) with the state
file and restarts, rejected bodies, the token, and /admin/explain against the data plane.

Data-plane requests go on fresh connections so that, with `workers: 2`, both workers answer
(the X-Request-Id prefix names the worker).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.support.rawhttp import get
from tests.support.turnout import PROJECT_ROOT, TurnoutProcess, free_port, start_turnout
from tests.support.upstreams import EchoUpstream

DEADLINE = 15.0
STATE = "turnout.state.json"
TOKEN = "admin-s3cret"


@pytest.fixture
def started() -> Iterator[list[TurnoutProcess]]:
    """Turnouts a test starts itself; killed at teardown."""
    procs: list[TurnoutProcess] = []
    yield procs
    for proc in procs:
        proc.close()


def call(
    proc: TurnoutProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None = None,
) -> tuple[int, Any]:
    """One admin call: (status, JSON body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(
        f"{proc.admin_url}{path}", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, raw = int(exc.code), exc.read()
    return status, orjson.loads(raw)


def put_split(proc: TurnoutProcess, route: str, body: bytes) -> tuple[int, Any]:
    return call(proc, "PUT", f"/admin/routes/{route}/split", body)


def route_state(proc: TurnoutProcess, name: str = "api") -> dict[str, Any]:
    status, body = call(proc, "GET", "/admin/routes")
    assert status == 200
    (route,) = [route for route in body["routes"] if route["name"] == name]
    assert isinstance(route, dict)
    return route


def served_by(proc: TurnoutProcess, count: int, path: str = "/api/x") -> tuple[set[str], set[str]]:
    """Send `count` GETs on fresh connections: (upstreams that answered, workers that answered)."""
    upstreams, workers = set(), set()
    for _ in range(count):
        response = get(proc.port, path)
        assert response.status == 200, response.body
        upstreams.add(response.json()["upstream"])
        request_id = response.header("x-request-id")
        assert request_id is not None
        workers.add(request_id[:16])
    return upstreams, workers


def config(blue: EchoUpstream, green: EchoUpstream, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "workers": 2,
        "state_file": STATE,
        "drain": {"delay": "0s", "shutdown": "5s"},
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "split": {"blue": 100, "green": 0},
                "overrides": [{"cookie": "release", "value": "canary", "to": "green"}],
                "sticky": {"header": "x-user-id"},
                "retries": 1,
            },
            {"name": "web", "split": {"blue": 1}},
        ],
    }
    base.update(extra)
    return base


def start(cfg: dict[str, Any], folder: Path, started: list[TurnoutProcess]) -> TurnoutProcess:
    folder.mkdir(exist_ok=True)
    proc = start_turnout(cfg, folder)
    started.append(proc)
    return proc


def saved_splits(folder: Path) -> dict[str, Any]:
    splits = orjson.loads((folder / STATE).read_bytes())["splits"]
    assert isinstance(splits, dict)
    return splits


# --- /admin/routes --------------------------------------------------------------------------------


def test_routes_view(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    proc = start(config(blue, green), tmp_path / "t", started)
    status, body = call(proc, "GET", "/admin/routes")
    assert status == 200
    assert body["generation"] == 1
    assert [route["name"] for route in body["routes"]] == ["api", "web"]
    api = body["routes"][0]
    assert api["configured_split"] == {"blue": 100, "green": 0}
    assert api["effective_split"] == {"blue": 100.0, "green": 0.0}
    assert api["split_source"] == "file"
    assert api["overrides"] == [{"cookie": "release", "value": "canary", "to": "green"}]
    assert api["sticky"] == {"header": "x-user-id"}
    assert api["mirror"] is None
    assert api["rollout"] is None
    assert body["routes"][1]["effective_split"] == {"blue": 100.0}


# --- runtime splits -------------------------------------------------------------------------------


def test_put_flips_every_worker_at_once_and_survives_a_restart(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    folder = tmp_path / "t"
    cfg = config(blue, green)
    proc = start(cfg, folder, started)
    assert served_by(proc, 10)[0] == {"blue"}

    status, body = put_split(proc, "api", b'{"blue": 0, "green": 100}')
    assert status == 200, body
    assert body["name"] == "api"
    assert body["generation"] == 2
    assert body["split_source"] == "runtime"
    assert body["effective_split"] == {"blue": 0.0, "green": 100.0}
    assert body["configured_split"] == {"blue": 100, "green": 0}
    # On disk before the answer came.
    assert saved_splits(folder) == {"api": {"blue": 0.0, "green": 100.0}}
    # The very next requests, in both workers, go to green.
    upstreams, workers = served_by(proc, 30)
    assert upstreams == {"green"}
    assert len(workers) == 2
    # Other routes keep the file's split.
    assert served_by(proc, 3, "/other")[0] == {"blue"}

    assert proc.stop() == 0
    proc = start(cfg, folder, started)
    api = route_state(proc)
    assert (api["split_source"], api["effective_split"]) == (
        "runtime",
        {"blue": 0.0, "green": 100.0},
    )
    assert served_by(proc, 10)[0] == {"green"}

    status, body = call(proc, "DELETE", "/admin/routes/api/split")
    assert status == 200
    assert (body["split_source"], body["effective_split"]) == (
        "file",
        {"blue": 100.0, "green": 0.0},
    )
    assert saved_splits(folder) == {}
    assert served_by(proc, 10)[0] == {"blue"}
    # Dropping a split that is not there is fine too, and changes nothing.
    generation = body["generation"]
    status, body = call(proc, "DELETE", "/admin/routes/api/split")
    assert (status, body["generation"]) == (200, generation)


def test_left_out_upstreams_get_zero(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    cfg = config(blue, green)
    cfg["routes"][0]["split"] = {"blue": 50, "green": 50}
    proc = start(cfg, tmp_path / "t", started)
    status, body = put_split(proc, "api", b'{"green": 3}')
    assert status == 200, body
    assert body["effective_split"] == {"blue": 0.0, "green": 100.0}
    assert served_by(proc, 10)[0] == {"green"}


BAD_BODIES = [
    (b"", "not JSON"),
    (b"{not json", "not JSON"),
    (b"NaN", "not JSON"),
    (b'{"blue": NaN}', "not JSON"),
    (b"[100]", "JSON object"),
    (b'"blue"', "JSON object"),
    (b"null", "JSON object"),
    (b'{"purple": 100}', "unknown upstream"),
    (b'{"blue": -1, "green": 100}', "from 0 to 1000000"),
    (b'{"blue": true}', "must be a number"),
    (b'{"blue": "100"}', "must be a number"),
    (b'{"blue": null}', "must be a number"),
    (b'{"blue": [100]}', "must be a number"),
    (b'{"blue": 0, "green": 0}', "at least one weight"),
    (b"{}", "at least one weight"),
    (b'{"blue": 1e308, "green": 1e308}', "from 0 to 1000000"),
    (b'{"blue": 1000001}', "from 0 to 1000000"),
]


def test_bad_bodies_are_rejected_and_change_nothing(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    folder = tmp_path / "t"
    proc = start(config(blue, green), folder, started)
    before = call(proc, "GET", "/admin/routes")
    for body, message in BAD_BODIES:
        status, answer = put_split(proc, "api", body)
        assert status == 400, body
        assert message in answer["error"], (body, answer)
    unknown_route: list[tuple[str, bytes | None]] = [("PUT", b'{"blue": 1}'), ("DELETE", None)]
    for method, payload in unknown_route:
        status, answer = call(proc, method, "/admin/routes/nope/split", payload)
        assert status == 404
        assert "nope" in answer["error"]
    assert call(proc, "GET", "/admin/routes") == before
    assert not (folder / STATE).exists()
    assert served_by(proc, 5)[0] == {"blue"}


def test_reload_drops_the_runtime_split_only_when_the_file_changes_it(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    folder = tmp_path / "t"
    cfg = config(blue, green)
    proc = start(cfg, folder, started)
    cfg.update(listen=proc.config["listen"], admin=proc.config["admin"])
    assert put_split(proc, "api", b'{"green": 1}')[0] == 200

    def reload_with(change: Callable[[dict[str, Any]], None]) -> None:
        change(cfg["routes"][0])
        proc.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        status, body = call(proc, "POST", "/admin/reload")
        assert status == 200, body

    # Another key of the route changed: the runtime split stays.
    reload_with(lambda route: route.update(retries=2))
    assert route_state(proc)["split_source"] == "runtime"
    assert saved_splits(folder) == {"api": {"green": 1.0}}
    assert served_by(proc, 5)[0] == {"green"}

    # The file changed the route's split: the file wins.
    reload_with(lambda route: route.update(split={"blue": 99, "green": 1}))
    api = route_state(proc)
    assert (api["split_source"], api["effective_split"]) == ("file", {"blue": 99.0, "green": 1.0})
    assert saved_splits(folder) == {}


def test_corrupt_state_file_is_moved_aside_at_start(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / STATE).write_bytes(b'{"version": 1, "splits": {"api": ')
    proc = start(config(blue, green), folder, started)
    (aside,) = folder.glob(f"{STATE}.corrupt-*")
    assert aside.read_bytes() == b'{"version": 1, "splits": {"api": '
    assert f"moved it to {aside}" in proc.stderr_text()
    assert route_state(proc)["split_source"] == "file"
    assert put_split(proc, "api", b'{"green": 1}')[0] == 200
    assert saved_splits(folder) == {"api": {"green": 1.0}}


def test_without_state_file_splits_live_in_memory(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    cfg = config(blue, green)
    del cfg["state_file"]
    folder = tmp_path / "t"
    proc = start(cfg, folder, started)
    assert put_split(proc, "api", b'{"green": 1}')[0] == 200
    assert served_by(proc, 5)[0] == {"green"}
    assert sorted(p.name for p in folder.iterdir() if "state" in p.name) == []
    assert "kept in memory only" in proc.stderr_text()


# --- errors are JSON --------------------------------------------------------------------------


def raw_call(
    proc: TurnoutProcess, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One admin call: (status, headers, raw body)."""
    request = urllib.request.Request(f"{proc.admin_url}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers), exc.read()


@pytest.mark.parametrize(
    ("method", "path", "status", "error", "allow"),
    [
        ("GET", "/admin/nope", 404, "unknown path '/admin/nope'", None),
        ("GET", "/metrics/", 404, "unknown path '/metrics/'", None),
        (
            "POST",
            "/admin/routes/api/rollout/bogus",
            404,
            "unknown path '/admin/routes/api/rollout/bogus'",
            None,
        ),
        (
            "GET",
            "/admin/routes/api/split",
            405,
            "method GET is not allowed on '/admin/routes/api/split' (allowed: DELETE, PUT)",
            "DELETE,PUT",
        ),
        (
            "POST",
            "/healthz",
            405,
            "method POST is not allowed on '/healthz' (allowed: GET, HEAD)",
            "GET,HEAD",
        ),
        (
            "DELETE",
            "/",
            405,
            "method DELETE is not allowed on '/' (allowed: GET, HEAD)",
            "GET,HEAD",
        ),
        (
            "PUT",
            "/admin/routes/api/split",
            413,
            "the request body is over 1048576 bytes (1 MiB), the admin API's limit",
            None,
        ),
    ],
)
def test_unknown_paths_wrong_methods_and_huge_bodies_answer_json(
    admin_turnout: TurnoutProcess,
    method: str,
    path: str,
    status: int,
    error: str,
    allow: str | None,
) -> None:
    # 1 MiB is aiohttp's limit on an admin request body; one byte more is refused.
    body = b"{" + b" " * (1 << 20) + b"}" if status == 413 else None
    got, headers, raw = raw_call(admin_turnout, method, path, body)
    assert (got, headers["Content-Type"]) == (status, "application/json")
    assert orjson.loads(raw) == {"error": error}
    assert headers.get("Allow") == allow
    # The dashboard page is still served.
    page_status, page_headers, _ = raw_call(admin_turnout, "GET", "/")
    assert (page_status, page_headers["Content-Type"]) == (200, "text/html; charset=utf-8")


@pytest.fixture(scope="module")
def admin_turnout(
    tmp_path_factory: pytest.TempPathFactory, blue: EchoUpstream, green: EchoUpstream
) -> Iterator[TurnoutProcess]:
    """One Turnout for the error-shape cases, which change nothing."""
    proc = start_turnout(config(blue, green, workers=1), tmp_path_factory.mktemp("errors"))
    yield proc
    proc.close()


# --- token ----------------------------------------------------------------------------------------


def test_token_is_required_for_admin_calls(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    cfg = config(blue, green)
    cfg.update(listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{free_port()}")
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TURNOUT_ADMIN_TOKEN=TOKEN)
    with open(tmp_path / "turnout.stderr", "wb") as stderr:
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
    started.append(proc)
    proc.wait_ready()

    guarded = [
        ("GET", "/admin/routes", None),
        ("PUT", "/admin/routes/api/split", b'{"green": 1}'),
        ("DELETE", "/admin/routes/api/split", None),
        ("GET", "/admin/explain?path=/api/x", None),
    ]
    for method, target, body in guarded:
        for token in (None, "wrong"):
            status, answer = call(proc, method, target, body, token=token)
            assert status == 401, (method, target, token)
            assert "error" in answer
    assert route_state_with_token(proc)["split_source"] == "file"
    for method, target, body in guarded:
        assert call(proc, method, target, body, token=TOKEN)[0] == 200, (method, target)
    # Scrapes need no token.
    with urllib.request.urlopen(f"{proc.admin_url}/metrics", timeout=10) as response:
        assert response.status == 200
    # Without the token every path but the public ones answers 401, an unknown one too: nobody
    # learns which paths exist. With it, an unknown path is a JSON 404.
    assert call(proc, "GET", "/admin/nope") == (401, {"error": "missing or wrong admin token"})
    assert call(proc, "GET", "/admin/nope", token=TOKEN) == (
        404,
        {"error": "unknown path '/admin/nope'"},
    )
    # A public path with a wrong method: 405, token or not.
    status, answer = call(proc, "POST", "/metrics", b"")
    assert (status, answer["error"]) == (
        405,
        "method POST is not allowed on '/metrics' (allowed: GET, HEAD)",
    )


def route_state_with_token(proc: TurnoutProcess) -> dict[str, Any]:
    status, body = call(proc, "GET", "/admin/routes", token=TOKEN)
    assert status == 200
    route = body["routes"][0]
    assert isinstance(route, dict)
    return route


# --- explain --------------------------------------------------------------------------------------


def explain(proc: TurnoutProcess, **params: str | list[str]) -> dict[str, Any]:
    status, body = call(proc, "GET", "/admin/explain?" + urllib.parse.urlencode(params, doseq=True))
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def test_explain_answers_like_the_data_plane(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    cfg = config(blue, green)
    cfg["routes"][0]["split"] = {"blue": 50, "green": 50}
    proc = start(cfg, tmp_path / "t", started)

    seen = set()
    for user in range(24):
        answer = explain(proc, path="/api/x", header=f"x-user-id:{user}")
        assert (answer["route"], answer["reason"]) == ("api", "sticky")
        response = get(proc.port, "/api/x", [("X-User-Id", str(user))])
        assert response.json()["upstream"] == answer["upstream"], user
        seen.add(answer["upstream"])
    # Both upstreams appear, so agreement is not a coincidence of one answer.
    assert seen == {"blue", "green"}

    answer = explain(proc, path="/api/x", cookie=["other:1", "release:canary"])
    assert (answer["upstream"], answer["reason"]) == ("green", "override")
    assert answer["override"]["cookie"] == "release"
    response = get(proc.port, "/api/x", [("Cookie", "other=1; release=canary")])
    assert response.json()["upstream"] == "green"

    answer = explain(proc, path="/api/x")
    assert (answer["route"], answer["upstream"], answer["random"]) == ("api", None, True)
    assert answer["split"] == {"blue": 50.0, "green": 50.0}
    answer = explain(proc, path="/x", host="Example.COM:8080", method="post")
    assert (answer["route"], answer["reason"]) == ("web", "weight")
    assert answer["request"]["host"] == "example.com"
    assert answer["request"]["method"] == "POST"

    # After a runtime split, explain and the data plane move together.
    assert put_split(proc, "api", b'{"green": 1}')[0] == 200
    answer = explain(proc, path="/api/x", header="x-user-id:7")
    assert (answer["upstream"], answer["split_source"]) == ("green", "runtime")
    assert get(proc.port, "/api/x", [("x-user-id", "7")]).json()["upstream"] == "green"


MALFORMED_EXPLAIN = [
    ("header=x-user-id", "expected header=NAME:VALUE"),
    ("header=:42", "expected header=NAME:VALUE"),
    ("cookie=release", "expected cookie=NAME:VALUE"),
    ("cookie=a:b;c", "cannot contain ';'"),
    ("path=api", "must start with '/'"),
    ("method=G%20ET", "HTTP method"),
    ("headers=x:1", "unknown parameter"),
    ("path=/a&path=/b", "more than once"),
]


def test_explain_rejects_malformed_parameters(
    tmp_path: Path, blue: EchoUpstream, green: EchoUpstream, started: list[TurnoutProcess]
) -> None:
    proc = start(config(blue, green), tmp_path / "t", started)
    for query, message in MALFORMED_EXPLAIN:
        status, body = call(proc, "GET", f"/admin/explain?{query}")
        assert status == 400, query
        assert message in body["error"], (query, body)
