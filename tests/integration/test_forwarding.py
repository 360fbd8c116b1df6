"""Forwarding headers (contract section 3) through a real Turnout to real upstreams.

Requests go out as raw bytes so that the exact header lines are under the test's control; the
echo upstream answers with the header lines it received, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import Headers, RawConnection, RawResponse
from tests.support.upstreams import EchoUpstream, RawUpstream, UpstreamHost

HOP_BY_HOP = (
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
)


@pytest.fixture(scope="module")
def hop(upstream_host: UpstreamHost) -> Iterator[RawUpstream]:
    upstream = upstream_host.raw("hop", "hop_by_hop")
    yield upstream
    upstream_host.stop(upstream)


@pytest.fixture(scope="module")
def pooled(upstream_host: UpstreamHost) -> Iterator[RawUpstream]:
    upstream = upstream_host.raw("pooled", "ok")
    yield upstream
    upstream_host.stop(upstream)


@pytest.fixture(scope="module")
def turnout(
    blue: EchoUpstream,
    hop: RawUpstream,
    pooled: RawUpstream,
) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "hop": {"endpoints": [hop.address]},
            "pooled": {"endpoints": [pooled.address]},
        },
        "routes": [
            {"name": "hop", "match": {"path_prefix": "/hop"}, "split": {"hop": 100}},
            {"name": "pooled", "match": {"path_prefix": "/pooled"}, "split": {"pooled": 100}},
            {"name": "main", "split": {"blue": 100}},
        ],
    }
    with start_inprocess(config) as process:
        yield process


def echo(
    turnout: InProcessTurnout,
    path: str = "/",
    headers: Headers | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    host: str = "turnout.test",
) -> tuple[RawResponse, Headers]:
    """One request through Turnout; the response and the header lines the upstream saw."""
    with RawConnection(turnout.port) as conn:
        response = conn.request(method, path, headers, body, host=host)
    assert response.status == 200, response
    seen = [(str(name), str(value)) for name, value in response.json()["headers"]]
    return response, seen


def values(headers: Headers, name: str) -> list[str]:
    lower = name.lower()
    return [value for key, value in headers if key.lower() == lower]


def test_request_path_query_method_and_body_pass_unchanged(turnout: InProcessTurnout) -> None:
    path = "/api/a%20b/c;p=1?x=1&y=%2F&x=2&empty="
    response, _ = echo(turnout, path, method="PUT", body=b"payload")
    described = response.json()
    assert described["path"] == path
    assert described["method"] == "PUT"
    assert described["body_len"] == len(b"payload")


def test_hop_by_hop_request_headers_are_not_forwarded(turnout: InProcessTurnout) -> None:
    _, seen = echo(
        turnout,
        "/hop-request",
        [
            ("Connection", "keep-alive, X-Secret-Req"),
            ("X-Secret-Req", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authenticate", "Basic realm=client"),
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "foo/1"),
            ("X-Kept", "yes"),
        ],
    )
    names = {name.lower() for name, _ in seen}
    leaked = sorted(names & {*HOP_BY_HOP, "x-secret-req"})
    assert leaked == [], f"hop-by-hop headers reached the upstream: {leaked}; saw {seen}"
    for value in values(seen, "connection"):
        assert "x-secret-req" not in value.lower(), seen
    assert values(seen, "x-kept") == ["yes"]


def test_hop_by_hop_response_headers_are_not_forwarded(
    turnout: InProcessTurnout, hop: RawUpstream
) -> None:
    with RawConnection(turnout.port) as conn:
        response = conn.request("GET", "/hop/a")
        assert response.status == 200
        assert response.body == hop.body
        names = {name.lower() for name, _ in response.headers}
        leaked = sorted(names & {*HOP_BY_HOP, "x-secret"})
        assert leaked == [], f"hop-by-hop headers reached the client: {response.headers}"
        for value in response.header_values("connection"):
            assert "x-secret" not in value.lower(), response.headers
        assert response.header_values("x-kept") == ["yes"]
        # The upstream's chunked body ended with a trailer; the proxy must have re-framed the
        # message cleanly, so a second request on the same connection still parses.
        again = conn.request("GET", "/hop/b")
        assert again.status == 200
        assert again.body == hop.body


def test_x_forwarded_for_is_set_when_absent(turnout: InProcessTurnout) -> None:
    _, seen = echo(turnout, "/xff")
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]


def test_x_forwarded_for_is_appended_to_an_incoming_one(turnout: InProcessTurnout) -> None:
    _, seen = echo(turnout, "/xff", [("X-Forwarded-For", "203.0.113.7, 198.51.100.2")])
    forwarded = values(seen, "x-forwarded-for")
    joined = ", ".join(forwarded)
    hops = [part.strip() for part in joined.split(",")]
    assert hops == ["203.0.113.7", "198.51.100.2", "127.0.0.1"], forwarded


def test_forwarded_proto_and_host_set_and_host_unchanged(turnout: InProcessTurnout) -> None:
    _, seen = echo(turnout, "/fwd", host="App.Example.test:8443")
    assert values(seen, "host") == ["App.Example.test:8443"]
    assert values(seen, "x-forwarded-host") == ["App.Example.test:8443"]
    assert values(seen, "x-forwarded-proto") == ["http"]

    _, seen = echo(turnout, "/fwd", host="plain.example.test")
    assert values(seen, "host") == ["plain.example.test"]
    assert values(seen, "x-forwarded-host") == ["plain.example.test"]


def test_request_id_is_generated_when_absent(turnout: InProcessTurnout) -> None:
    first, seen_first = echo(turnout, "/rid")
    second, seen_second = echo(turnout, "/rid")
    for response, seen in ((first, seen_first), (second, seen_second)):
        at_upstream = values(seen, "x-request-id")
        assert len(at_upstream) == 1, seen
        assert at_upstream[0].strip() != ""
        assert response.header_values("x-request-id") == at_upstream
    assert values(seen_first, "x-request-id") != values(seen_second, "x-request-id")


def test_request_id_is_passed_through_when_present(turnout: InProcessTurnout) -> None:
    response, seen = echo(turnout, "/rid", [("X-Request-Id", "client-chosen-42")])
    assert values(seen, "x-request-id") == ["client-chosen-42"]
    assert response.header_values("x-request-id") == ["client-chosen-42"]


def test_traceparent_and_tracestate_pass_untouched(turnout: InProcessTurnout) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    _, seen = echo(turnout, "/trace", [("traceparent", traceparent), ("tracestate", tracestate)])
    assert values(seen, "traceparent") == [traceparent]
    assert values(seen, "tracestate") == [tracestate]


def test_duplicate_request_headers_keep_their_order(turnout: InProcessTurnout) -> None:
    _, seen = echo(
        turnout,
        "/multi",
        [("X-Multi", "one"), ("X-Other", "between"), ("X-Multi", "two"), ("X-Multi", "three")],
    )
    multi = values(seen, "x-multi")
    # Two lines or one comma-joined line are the same field (RFC 9110 5.3); order must hold.
    assert [part.strip() for part in ", ".join(multi).split(",")] == ["one", "two", "three"]
    assert values(seen, "x-other") == ["between"]


def test_duplicate_response_headers_and_set_cookies_are_preserved(
    turnout: InProcessTurnout,
) -> None:
    with RawConnection(turnout.port) as conn:
        response = conn.request("GET", "/c/cookies")
    assert response.status == 200
    # Set-Cookie can never be joined into one line: each must arrive as its own line, in order.
    assert response.header_values("set-cookie") == [
        "a=1; Path=/",
        "b=2; Path=/; HttpOnly",
        "c=3; Path=/; Secure",
    ]
    multi = response.header_values("x-multi")
    assert [part.strip() for part in ", ".join(multi).split(",")] == ["first", "second"]


def test_upstream_identity_header_reaches_client(turnout: InProcessTurnout) -> None:
    # End-to-end sanity that ordinary response headers are not dropped with the hop-by-hop ones.
    response, _ = echo(turnout, "/plain")
    assert response.header_values("x-upstream") == ["blue"]
    assert response.header("content-type") == "application/json"


def test_upstream_connections_are_pooled_and_reused(
    turnout: InProcessTurnout, pooled: RawUpstream
) -> None:
    # Sequential requests, from one client connection and then from fresh ones, need only the
    # one keep-alive upstream connection (a little slack for a pool that keeps a spare).
    with RawConnection(turnout.port) as conn:
        for index in range(25):
            assert conn.request("GET", f"/pooled/ka/{index}").body == pooled.body
    for index in range(25):
        with RawConnection(turnout.port) as conn:
            assert conn.request("GET", f"/pooled/fresh/{index}").body == pooled.body
    targets = [request.target for request in pooled.requests]
    expected = [f"/pooled/ka/{i}" for i in range(25)] + [f"/pooled/fresh/{i}" for i in range(25)]
    assert targets == expected
    assert pooled.connections <= 2, f"{pooled.connections} upstream connections for 50 requests"
