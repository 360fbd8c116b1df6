"""The JSON access log on stdout (contract section 8), read from a real Turnout subprocess.

Turnout is stopped (SIGTERM) before stdout is judged, so "exactly one line per request" and
"no line at all" are decided on the complete output, not on a wait that hopes. The first tests
drive `AccessLog` in-process with records, for the formatting on its own.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy.dataplane.accesslog import AccessLog, AccessRecord
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


def record(**changes: Any) -> AccessRecord:
    base = AccessRecord(
        request_id="rid-1",
        client="192.0.2.7",
        method="POST",
        target=b"/api/items?secret=1",
        status=201,
        route="api",
        upstream="blue",
        decision="weighted",
        endpoint="127.0.0.1:9001",
        attempts=2,
        duration=0.0123456,
        bytes_in=10,
        bytes_out=20,
        mirrored=True,
        version="1.0",
        authority=b"example.test:8080",
        headers=[(b"accept", b"Accept", b"*/*"), (b"user-agent", b"User-Agent", b"curl/8\xe9")],
        ttfb=0.0045,
        flag="retried",
        tls_version="TLSv1.3",
        sni="example.test",
    )
    return dataclasses.replace(base, **changes)


def lines_of(records: list[AccessRecord], tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        log = AccessLog(fd)
        for rec in records:
            log.record(rec)
        log.flush()
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


def test_a_record_becomes_one_line(tmp_path: Path) -> None:
    (line,) = lines_of([record()], tmp_path)
    assert set(line) == KEYS | {"tls_version", "sni"}
    assert line["time"].endswith("Z")
    assert {k: v for k, v in line.items() if k != "time"} == {
        "request_id": "rid-1",
        "client": "192.0.2.7",
        "method": "POST",
        "path": "/api/items",
        "status": 201,
        "route": "api",
        "upstream": "blue",
        "decision": "weighted",
        "endpoint": "127.0.0.1:9001",
        "attempts": 2,
        "duration_ms": 12.346,
        "bytes_in": 10,
        "bytes_out": 20,
        "mirrored": True,
        "protocol": "HTTP/1.0",
        "authority": "example.test:8080",
        "user_agent": "curl/8\u00e9",
        "upstream_ttfb_ms": 4.5,
        "flags": "retried",
        "tls_version": "TLSv1.3",
        "sni": "example.test",
    }


def test_a_record_without_host_agent_or_upstream_answer(tmp_path: Path) -> None:
    (line,) = lines_of(
        [record(authority=None, headers=[], ttfb=-1.0, tls_version=None, sni=None, target=b"*")],
        tmp_path,
    )
    assert line["authority"] == ""
    assert line["user_agent"] == ""
    assert line["upstream_ttfb_ms"] is None
    assert line["tls_version"] is None
    assert line["sni"] is None
    assert line["path"] == "*"


def test_many_records_are_written_whole_and_in_order(tmp_path: Path) -> None:
    # Past the 64 KiB buffer: records write batches themselves, before the final flush.
    lines = lines_of([record(request_id=f"r{i}") for i in range(2000)], tmp_path)
    assert [line["request_id"] for line in lines] == [f"r{i}" for i in range(2000)]


@given(st.lists(st.floats(min_value=0.0, max_value=4_102_444_799.0), max_size=20))
def test_timestamps_read_as_datetime_writes_them(times: list[float]) -> None:
    log = AccessLog()  # one log for the whole sequence: its once-a-second cache is tested too
    for now in times:
        expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        assert log.timestamp(now) == expected.replace("+00:00", "Z")


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
