"""The JSON access log on stdout (contract section 8), read from a real Turnout subprocess.

Turnout is stopped (SIGTERM) before stdout is judged, so "exactly one line per request" and
"no line at all" are decided on the complete output, not on a wait that hopes.
"""

from __future__ import annotations

from typing import Any

import orjson

from tests.support import rawhttp
from tests.support.rawhttp import RawConnection
from tests.support.turnout import TurnoutFactory
from tests.support.upstreams import EchoUpstream

KEYS = {
    "time",
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "route",
    "upstream",
    "decision",
    "endpoint",
    "attempts",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "mirrored",
    "protocol",
    "authority",
    "user_agent",
    "upstream_ttfb_ms",
    "flags",
}


def config_for(blue: EchoUpstream, green: EchoUpstream) -> dict[str, Any]:
    return {
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [
            {
                "name": "ovr",
                "match": {"path_prefix": "/ovr"},
                "split": {"blue": 100},
                "overrides": [{"header": "x-canary", "value": "true", "to": "green"}],
            },
            {
                "name": "sticky",
                "match": {"path_prefix": "/sticky"},
                "split": {"blue": 50, "green": 50},
                "sticky": {"header": "x-user-id"},
            },
            {"name": "weighted", "match": {"path_prefix": "/w"}, "split": {"blue": 100}},
        ],
    }


def test_one_json_line_per_request_with_every_key(
    blue: EchoUpstream, green: EchoUpstream, turnout_factory: TurnoutFactory
) -> None:
    turnout = turnout_factory(config_for(blue, green), access_log=True)
    upload = b"u" * 1000
    with RawConnection(turnout.port) as conn:
        weighted = conn.request(
            "GET", "/w/a?q=1", [("X-Request-Id", "log-weight"), ("User-Agent", "curl/8.5")]
        )
        posted = conn.request("POST", "/w/upload", [("X-Request-Id", "log-post")], upload)
        override = conn.request(
            "GET", "/ovr/x", [("X-Request-Id", "log-override"), ("X-Canary", "true")]
        )
        sticky = conn.request(
            "GET", "/sticky/x", [("X-Request-Id", "log-sticky"), ("X-User-Id", "u-1")]
        )
        failing = conn.request("GET", "/w/status/503", [("X-Request-Id", "log-503")])
    missing = rawhttp.get(turnout.port, "/nowhere", [("X-Request-Id", "log-404")])
    refused, _ = rawhttp.send_raw(
        turnout.port, b"GET /../x HTTP/1.0\r\nX-Request-Id: log-400\r\n\r\n"
    )
    assert [weighted.status, posted.status, override.status, sticky.status] == [200] * 4
    assert (failing.status, missing.status, refused.status) == (503, 404, 400)

    assert turnout.stop() == 0
    lines = [line for line in turnout.stdout_lines() if line.strip()]
    entries = [orjson.loads(line) for line in lines]  # stdout holds nothing but the log
    assert all(isinstance(entry, dict) for entry in entries)
    by_id: dict[str, dict[str, Any]] = {}
    for entry in entries:
        assert entry["request_id"] not in by_id, f"two lines for {entry['request_id']}"
        by_id[entry["request_id"]] = entry
    ids = {"log-weight", "log-post", "log-override", "log-sticky", "log-503", "log-404", "log-400"}
    assert set(by_id) == ids, f"logged ids: {sorted(by_id)}"
    for entry in by_id.values():
        assert set(entry) >= KEYS, f"missing keys {sorted(KEYS - set(entry))} in {entry}"
        assert isinstance(entry["time"], str)
        assert entry["time"]
        assert str(entry["client"]).startswith("127.0.0.1")
        assert isinstance(entry["duration_ms"], int | float)
        assert entry["duration_ms"] >= 0
        assert entry["mirrored"] is False

    entry = by_id["log-weight"]
    assert (entry["method"], entry["status"], entry["route"]) == ("GET", 200, "weighted")
    assert entry["path"].startswith("/w/a")
    assert (entry["upstream"], entry["decision"]) == ("blue", "weight")
    assert entry["endpoint"] == blue.address
    assert entry["attempts"] == 1
    assert entry["bytes_out"] >= len(weighted.body)
    assert (entry["protocol"], entry["authority"]) == ("HTTP/1.1", "turnout.test")
    assert entry["user_agent"] == "curl/8.5"
    assert 0 <= entry["upstream_ttfb_ms"] <= entry["duration_ms"]
    assert entry["flags"] == ""

    entry = by_id["log-post"]
    assert entry["method"] == "POST"
    assert entry["bytes_in"] >= len(upload)
    assert entry["bytes_out"] >= len(posted.body)

    entry = by_id["log-override"]
    assert (entry["route"], entry["upstream"], entry["decision"]) == ("ovr", "green", "override")
    assert entry["endpoint"] == green.address

    entry = by_id["log-sticky"]
    assert (entry["route"], entry["decision"]) == ("sticky", "sticky")
    assert entry["upstream"] == sticky.json()["upstream"]

    # A 503 the upstream sent has no flag; the proxy's own answers say why they were made.
    assert by_id["log-503"]["status"] == 503
    assert by_id["log-503"]["upstream"] == "blue"
    assert by_id["log-503"]["flags"] == ""
    assert by_id["log-404"]["status"] == 404
    assert by_id["log-404"]["route"] in ("", None)
    assert (by_id["log-404"]["flags"], by_id["log-404"]["upstream_ttfb_ms"]) == ("no_route", None)
    assert (by_id["log-400"]["flags"], by_id["log-400"]["protocol"]) == ("refused", "HTTP/1.0")


def test_no_access_log_with_the_flag(
    blue: EchoUpstream, green: EchoUpstream, turnout_factory: TurnoutFactory
) -> None:
    turnout = turnout_factory(config_for(blue, green), access_log=False)
    with RawConnection(turnout.port) as conn:
        for index in range(5):
            assert conn.request("GET", f"/w/{index}").status == 200
    assert rawhttp.get(turnout.port, "/nowhere").status == 404
    assert turnout.stop() == 0
    assert turnout.access_log() == []
    assert [line for line in turnout.stdout_lines() if line.strip()] == []
