"""Upstream failures through a real Turnout: error mapping, retries, broken bodies, stale pools.

One Turnout serves every test of the module; each failure mode has its own upstream and route.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import rawhttp
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, RawResponse, build_request
from tests.support.turnout import free_port
from tests.support.upstreams import EchoUpstream, RawUpstream, UpstreamHost


@dataclass
class Upstreams:
    """Every upstream of the module's Turnout."""

    alpha: EchoUpstream
    beta: EchoUpstream
    reset_get: RawUpstream
    reset_put: RawUpstream
    reset_post: RawUpstream
    truncate_length: RawUpstream
    truncate_chunked: RawUpstream
    stale: RawUpstream
    connection_close: RawUpstream
    http10: RawUpstream
    silent: RawUpstream


@pytest.fixture(scope="module")
def ups(upstream_host: UpstreamHost) -> Iterator[Upstreams]:
    started = Upstreams(
        alpha=upstream_host.echo("alpha"),
        beta=upstream_host.echo("beta"),
        reset_get=upstream_host.raw("reset_get", "reset"),
        reset_put=upstream_host.raw("reset_put", "reset"),
        reset_post=upstream_host.raw("reset_post", "reset"),
        truncate_length=upstream_host.raw("truncl", "truncate_length"),
        truncate_chunked=upstream_host.raw("truncc", "truncate_chunked"),
        stale=upstream_host.raw("stale", "close_after_response"),
        connection_close=upstream_host.raw("connclose", "connection_close"),
        http10=upstream_host.raw("http10", "http10"),
        silent=upstream_host.raw("silent", "close_no_answer"),
    )
    yield started
    for upstream in vars(started).values():
        upstream_host.stop(upstream)


def route(name: str, upstream: str) -> dict[str, Any]:
    return {"name": name, "match": {"path_prefix": f"/{name}"}, "split": {upstream: 100}}


@pytest.fixture(scope="module")
def turnout(ups: Upstreams) -> Iterator[InProcessTurnout]:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    config: dict[str, Any] = {
        "timeouts": {"connect": "1s", "response": "1s"},
        "upstreams": {
            "refused": {"endpoints": dead[:2]},
            "halfdead": {"endpoints": [dead[2], ups.alpha.address]},
            "resetget": {"endpoints": [ups.reset_get.address, ups.beta.address]},
            "resetput": {"endpoints": [ups.reset_put.address, ups.beta.address]},
            "resetpost": {"endpoints": [ups.reset_post.address, ups.beta.address]},
            "slow": {"endpoints": [ups.alpha.address]},
            "truncl": {"endpoints": [ups.truncate_length.address]},
            "truncc": {"endpoints": [ups.truncate_chunked.address]},
            "stale": {"endpoints": [ups.stale.address]},
            "connclose": {"endpoints": [ups.connection_close.address]},
            "http10": {"endpoints": [ups.http10.address]},
            "silent": {"endpoints": [ups.silent.address]},
        },
        "routes": [
            route("refused", "refused"),
            route("halfdead", "halfdead"),
            route("resetget", "resetget"),
            route("resetput", "resetput"),
            route("resetpost", "resetpost"),
            route("slow", "slow"),
            route("truncl", "truncl"),
            route("truncc", "truncc"),
            route("stale", "stale"),
            route("connclose", "connclose"),
            route("http10", "http10"),
            route("silent", "silent"),
        ],
    }
    with start_inprocess(config) as process:
        yield process


def assert_error_json(response: RawResponse, status: int, request_id: str | None = None) -> None:
    assert response.status == status, response
    body = response.json()
    assert isinstance(body.get("error"), str)
    assert body["error"]
    assert isinstance(body.get("request_id"), str)
    assert body["request_id"]
    if request_id is not None:
        assert body["request_id"] == request_id
        assert response.header_values("x-request-id") == [request_id]


def test_no_route_gets_404_json(turnout: InProcessTurnout) -> None:
    response = rawhttp.get(turnout.port, "/nowhere/at/all", [("X-Request-Id", "rid-404")])
    assert_error_json(response, 404, "rid-404")
    generated = rawhttp.get(turnout.port, "/nowhere")
    assert_error_json(generated, 404)
    assert generated.header_values("x-request-id") == [generated.json()["request_id"]]


def test_connect_refused_everywhere_gets_502_json(turnout: InProcessTurnout) -> None:
    response = rawhttp.get(turnout.port, "/refused/x", [("X-Request-Id", "rid-502")])
    assert_error_json(response, 502, "rid-502")


def test_one_dead_endpoint_is_skipped_by_retry(turnout: InProcessTurnout, ups: Upstreams) -> None:
    before = ups.alpha.requests
    with RawConnection(turnout.port) as conn:
        for index in range(20):
            response = conn.request("GET", f"/halfdead/{index}")
            assert response.status == 200, response
            assert response.json()["upstream"] == "alpha"
    assert ups.alpha.requests - before == 20


# Turnout ejects an endpoint after a few consecutive failures (passive health), so each of these
# tests has a resetting endpoint of its own and stops soon after it was first hit.


def test_reset_before_response_is_retried_for_get(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    with RawConnection(turnout.port) as conn:
        for index in range(30):
            response = conn.request("GET", f"/resetget/{index}")
            assert response.status == 200, response
            assert response.json()["upstream"] == "beta"
            if ups.reset_get.requests:
                break
    # Two endpoints chosen at random: the resetting one was tried (p of not: 2**-30).
    assert len(ups.reset_get.requests) == 1


def test_reset_before_response_is_retried_for_put_with_small_body(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    with RawConnection(turnout.port) as conn:
        for index in range(30):
            response = conn.request("PUT", f"/resetput/{index}", body=b"x" * 1000)
            assert response.status == 200, response
            assert response.json()["body_len"] == 1000
            if ups.reset_put.requests:
                break
    assert len(ups.reset_put.requests) == 1
    assert ups.reset_put.requests[0].body == b"x" * 1000


def test_reset_before_response_is_not_retried_for_post(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    for index in range(30):
        beta_before = ups.beta.requests
        with RawConnection(turnout.port) as conn:
            answer = conn.request("POST", f"/resetpost/{index}", body=b"p" * 100)
        if ups.reset_post.requests:
            assert ups.beta.requests == beta_before, (
                "a POST that broke before a response was retried"
            )
            assert_error_json(answer, 502)
            return
        assert answer.status == 200
        assert ups.beta.requests == beta_before + 1
    pytest.fail("the resetting endpoint was never chosen in 30 POSTs")


def test_response_timeout_gets_504_json(turnout: InProcessTurnout) -> None:
    response = rawhttp.get(turnout.port, "/slow/slow?ms=3000", [("X-Request-Id", "rid-504")])
    assert_error_json(response, 504, "rid-504")


def test_no_answer_at_all_gets_502_after_bounded_attempts(
    turnout: InProcessTurnout, ups: Upstreams
) -> None:
    before = len(ups.silent.requests)
    response = rawhttp.get(turnout.port, "/silent/x")
    assert_error_json(response, 502)
    attempts = len(ups.silent.requests) - before
    assert 1 <= attempts <= 3, f"{attempts} attempts with retries: 2"


def read_broken(turnout: InProcessTurnout, path: str) -> tuple[RawResponse, bool]:
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", path))
        _, response = conn.read_final_response(allow_incomplete=True)
        closed = conn.wait_closed() if response.status == 200 else True
    return response, closed


def test_truncated_content_length_body_reaches_client_broken(turnout: InProcessTurnout) -> None:
    response, closed = read_broken(turnout, "/truncl/x")
    if response.status == 200:
        assert response.framing in ("content-length", "chunked"), (
            "a truncated body was relayed close-delimited: the client cannot tell it is short"
        )
        assert not response.complete, "a short body was relayed as a complete response"
        assert len(response.body) <= 100
        assert closed
    else:
        # The proxy saw the truncation before committing the response: an error is fine too.
        assert response.status == 502, response
    assert rawhttp.get(turnout.port, "/slow/after-truncation").status == 200


def test_truncated_chunked_body_reaches_client_broken(turnout: InProcessTurnout) -> None:
    response, closed = read_broken(turnout, "/truncc/x")
    if response.status == 200:
        assert response.framing in ("content-length", "chunked"), (
            "a truncated body was relayed close-delimited: the client cannot tell it is short"
        )
        assert not response.complete, "the proxy sent a terminating chunk for a broken body"
        assert closed
    else:
        assert response.status == 502, response
    assert rawhttp.get(turnout.port, "/slow/after-truncation").status == 200


def test_stale_pooled_connections_are_not_reused(turnout: InProcessTurnout, ups: Upstreams) -> None:
    requests_before = len(ups.stale.requests)
    with RawConnection(turnout.port) as conn:
        for index in range(50):
            response = conn.request("GET", f"/stale/{index}")
            assert response.status == 200, f"request {index}: {response}"
            assert response.body == ups.stale.body
    # The upstream reads one request per connection; a duplicate delivery would show here.
    assert len(ups.stale.requests) - requests_before == 50


def test_upstream_connection_close_every_time(turnout: InProcessTurnout, ups: Upstreams) -> None:
    with RawConnection(turnout.port) as conn:
        for index in range(50):
            response = conn.request("GET", f"/connclose/{index}")
            assert response.status == 200, f"request {index}: {response}"
            assert response.body == ups.connection_close.body


def test_http10_close_delimited_upstream_body(turnout: InProcessTurnout, ups: Upstreams) -> None:
    conn = RawConnection(turnout.port)
    try:
        for index in range(20):
            conn.send(build_request("GET", f"/http10/{index}"))
            _, response = conn.read_final_response()
            assert response.status == 200
            assert response.body == ups.http10.body
            if response.framing == "close":
                conn.close()
                conn = RawConnection(turnout.port)
    finally:
        conn.close()
