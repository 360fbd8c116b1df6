"""HTTP/1.1 clients through Turnout to upstreams reached over HTTP/2 (`protocol: h2c | h2`).

The upstreams are `tests.support.h2server.H2Upstream` servers (h2 over asyncio, h2c and TLS
with ALPN); Turnout is one in-process worker. Covered: header translation (pseudo-headers,
lower-case names, hop-by-hop fields, `te: trailers`), bodies both ways with their framing,
trailers to a chunked HTTP/1.1 client, flow control against a slow client and a slow server,
stream multiplexing within the server's MAX_CONCURRENT_STREAMS, GOAWAY, RST_STREAM and the
retry rules, connect/ALPN failures, drain and idle close, HTTP/2 health checks, and mirrors to
an HTTP/2 shadow (skipped).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.control.prober import Prober
from proxy.core.config import parse_config
from proxy.core.spec import ConfigSpec, UpstreamTls
from proxy.runtime.tls import client_context
from tests.support import async_wait_until, rawhttp, wait_until
from tests.support.certs import write_ca, write_pair
from tests.support.h2server import H2Upstream
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, RawResponse, build_request, chunked
from tests.support.turnout import free_port
from tests.support.upstreams import UpstreamHost, pattern_bytes, pattern_sha256


@dataclass
class Servers:
    """The module's HTTP/2 upstreams."""

    plain: H2Upstream  # h2c
    secure: H2Upstream  # h2 over TLS
    h1only: H2Upstream  # TLS whose ALPN selects http/1.1 only
    ca: Path


def start(host: UpstreamHost, server: H2Upstream) -> H2Upstream:
    host.call(server.start())
    return server


@pytest.fixture(scope="module")
def servers(
    upstream_host: UpstreamHost, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("h2certs")
    ca = trustme.CA()
    pair = write_pair(ca, folder, "upstream", "localhost", "127.0.0.1")
    started = Servers(
        plain=start(upstream_host, H2Upstream("plain")),
        secure=start(upstream_host, H2Upstream("secure", tls=pair)),
        h1only=start(upstream_host, H2Upstream("h1only", tls=pair, alpn=("http/1.1",))),
        ca=write_ca(ca, folder / "ca.pem"),
    )
    yield started
    for server in (started.plain, started.secure, started.h1only):
        upstream_host.call(server.stop())


def route(name: str) -> dict[str, Any]:
    return {"name": name, "match": {"path_prefix": f"/{name}"}, "split": {name: 100}}


@pytest.fixture(scope="module")
def turnout(servers: Servers) -> Iterator[InProcessTurnout]:
    def tls() -> dict[str, str]:
        return {"ca": str(servers.ca)}

    config: dict[str, Any] = {
        "timeouts": {"connect": "2s", "response": "10s"},
        "upstreams": {
            "c": {"endpoints": [servers.plain.address], "protocol": "h2c"},
            "s": {"endpoints": [servers.secure.address], "protocol": "h2", "tls": tls()},
            "alpn": {"endpoints": [servers.h1only.address], "protocol": "h2", "tls": tls()},
            "dead": {"endpoints": [f"127.0.0.1:{free_port()}"], "protocol": "h2c"},
        },
        "routes": [route("c"), route("s"), route("alpn"), route("dead")],
    }
    with start_inprocess(config) as process:
        yield process


def header_map(described: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in described["headers"]:
        out.setdefault(name, []).append(value)
    return out


def assert_error_json(response: RawResponse, status: int) -> None:
    assert response.status == status, response
    body = response.json()
    assert isinstance(body.get("error"), str)
    assert body["error"]
    assert isinstance(body.get("request_id"), str)
    assert body["request_id"]


# -- requests and their translation ---------------------------------------------------------


def test_get_over_h2c_has_pseudo_headers_and_forwarding_fields(turnout: InProcessTurnout) -> None:
    response = rawhttp.get(turnout.port, "/c/echo?x=1", [("X-Request-Id", "rid-h2c")])
    assert response.status == 200, response
    assert response.header("x-upstream") == "plain"
    assert response.framing == "content-length"
    assert response.header_values("x-request-id") == ["rid-h2c"]
    described = response.json()
    assert described["method"] == "GET"
    assert described["path"] == "/c/echo?x=1"
    assert described["authority"] == "turnout.test"
    assert described["scheme"] == "http"
    fields = header_map(described)
    assert "host" not in fields, "Host travels as :authority over HTTP/2"
    assert fields["x-request-id"] == ["rid-h2c"]
    assert fields["x-forwarded-for"] == ["127.0.0.1"]
    assert fields["x-forwarded-proto"] == ["http"]
    assert fields["x-forwarded-host"] == ["turnout.test"]
    # Via names the version each hop received: HTTP/1.1 from the client, HTTP/2 from the
    # upstream (RFC 9110 section 7.6.3).
    assert len(fields["via"]) == 1
    assert fields["via"][0].startswith("1.1 ")
    assert (response.header("via") or "").startswith("2 ")


def test_header_case_hop_by_hop_and_te(turnout: InProcessTurnout) -> None:
    headers = [
        ("X-Custom-Header", "Value With Case"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
    ]
    response = rawhttp.get(turnout.port, "/c/echo", headers)
    assert response.status == 200, response
    fields = header_map(response.json())
    assert all(name == name.lower() for name in fields), fields
    assert fields["x-custom-header"] == ["Value With Case"]
    for hop in ("connection", "x-hop", "keep-alive", "proxy-connection", "transfer-encoding"):
        assert hop not in fields, hop
    assert fields["te"] == ["trailers"]
    plain = header_map(rawhttp.get(turnout.port, "/c/echo", [("TE", "gzip")]).json())
    assert "te" not in plain, "only `te: trailers` may cross to HTTP/2"


def test_post_with_length_and_chunked(turnout: InProcessTurnout) -> None:
    body = pattern_bytes(100_000, "post")
    with RawConnection(turnout.port) as conn:
        response = conn.request("POST", "/c/upload", [("Content-Type", "x/y")], body)
        assert response.status == 200, response
        described = response.json()
        assert described["body_length"] == len(body)
        assert described["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert header_map(described)["content-length"] == [str(len(body))]
        # The same client connection goes on (keep-alive) with a chunked body.
        parts = [body[:30_000], body[30_000:]]
        conn.send(
            build_request("POST", "/c/upload", [("Transfer-Encoding", "chunked")]) + chunked(parts)
        )
        _, second = conn.read_final_response()
    assert second.status == 200, second
    described = second.json()
    assert described["body_length"] == len(body)
    assert described["body_sha256"] == hashlib.sha256(body).hexdigest()
    fields = header_map(described)
    assert "content-length" not in fields
    assert "transfer-encoding" not in fields


def test_head_and_empty_post(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        head = conn.request("HEAD", "/c/echo")
        assert head.status == 200
        assert head.body == b""
        empty = conn.request("POST", "/c/echo", body=b"")
    assert empty.status == 200
    assert empty.json()["body_length"] == 0


def test_h2_over_tls(turnout: InProcessTurnout) -> None:
    response = rawhttp.get(turnout.port, "/s/echo")
    assert response.status == 200, response
    described = response.json()
    assert described["upstream"] == "secure"
    assert described["scheme"] == "https"


# -- trailers ---------------------------------------------------------------------------------


def test_trailers_reach_a_chunked_http1_client(turnout: InProcessTurnout) -> None:
    response = rawhttp.get(turnout.port, "/c/trailers")
    assert response.status == 200, response
    assert response.framing == "chunked"
    assert response.body == b"payload"
    assert ("grpc-status", "0") in response.trailers
    assert ("x-checksum", "abc123") in response.trailers


def test_trailers_only_answer_reaches_http1_client_whole(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        response = conn.request("GET", "/c/trailers-only")
        assert response.status == 200, response
        assert response.header("grpc-status") == "5"
        assert response.body == b""
        # The connection stays usable: the empty answer was framed.
        assert conn.request("GET", "/c/echo").status == 200


def test_interim_response_passes_and_oversized_heads_are_refused(
    turnout: InProcessTurnout,
) -> None:
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", "/c/early-hints"))
        interim, final = conn.read_final_response()
    assert [r.status for r in interim] == [103]
    assert interim[0].header("link") == "</a.css>; rel=preload"
    assert final.status == 200
    assert final.json()["path"] == "/c/early-hints"
    # limits.max_headers is 100: a response head with more is the upstream's fault.
    assert_error_json(rawhttp.get(turnout.port, "/c/many-headers?n=150"), 502)
    assert rawhttp.get(turnout.port, "/c/many-headers?n=50").status == 200


# -- flow control -----------------------------------------------------------------------------


def test_large_response_to_a_slow_client_is_flow_controlled(
    turnout: InProcessTurnout, servers: Servers
) -> None:
    total = 48 * 1024 * 1024
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", turnout.port))
    sock.settimeout(20)
    before = servers.plain.sent_bytes
    try:
        sock.sendall(build_request("GET", f"/c/stream?n={total}&chunk=16384"))
        # The client reads nothing: the server must stall, held by the stream's window.
        last = [-1, 0]

        def stalled() -> bool:
            sent = servers.plain.sent_bytes
            if sent == last[0] and sent > before:
                last[1] += 1
            else:
                last[0], last[1] = sent, 0
            time.sleep(0.05)
            return last[1] >= 10

        wait_until(stalled, timeout=20, what="the server to stop sending")
        in_flight = servers.plain.sent_bytes - before
        assert in_flight < total // 3, f"{in_flight} bytes sent to a client that reads nothing"
        received = bytearray()
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += data
            if received.endswith(b"0\r\n\r\n"):
                break
    finally:
        sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    assert b"transfer-encoding: chunked" in head.lower()
    payload = bytearray()
    rest = memoryview(body)
    while True:
        line_end = bytes(rest[:20]).index(b"\r\n")
        size = int(bytes(rest[:line_end]), 16)
        if size == 0:
            break
        payload += rest[line_end + 2 : line_end + 2 + size]
        rest = rest[line_end + 4 + size :]
    assert len(payload) == total
    assert hashlib.sha256(payload).hexdigest() == pattern_sha256(total)


def test_an_upload_the_server_does_not_read_pauses_the_client(upstream_host: UpstreamHost) -> None:
    server = start(upstream_host, H2Upstream("stall"))
    config = {
        "upstreams": {"u": {"endpoints": [server.address], "protocol": "h2c"}},
        "routes": [route("u")],
    }
    total = 64 * 1024 * 1024
    try:
        with start_inprocess(config) as turnout:
            sock = socket.create_connection(("127.0.0.1", turnout.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sock.setblocking(False)
            sock.sendall(build_request("POST", "/u/stall", [("Content-Length", str(total))], None))
            block = b"x" * 65536
            sent = 0
            quiet = 0
            deadline = time.monotonic() + 20
            # Send until the proxy has stopped reading for a while (its buffers are full).
            while quiet < 20 and sent < total and time.monotonic() < deadline:
                _, writable, _ = select.select([], [sock], [], 0.05)
                if not writable:
                    quiet += 1
                    continue
                try:
                    sent += sock.send(block)
                    quiet = 0
                except BlockingIOError:
                    quiet += 1
            assert quiet >= 20, "the proxy kept reading an upload its upstream does not take"
            assert sent < total // 4, f"{sent} bytes taken for an upstream that reads nothing"
            # The server resets the stream: the client gets a 502, the connection stays.
            server.release_held(upstream_host.loop)
            sock.setblocking(True)
            sock.settimeout(10)
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            sock.close()
            assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
            assert rawhttp.get(turnout.port, "/u/echo").status == 200
            assert server.connections == 1
    finally:
        upstream_host.call(server.stop())


def test_large_upload_to_a_slow_server_respects_its_windows(turnout: InProcessTurnout) -> None:
    body = pattern_bytes(4 * 1024 * 1024, "upload")
    with RawConnection(turnout.port, deadline=60) as conn:
        response = conn.request("POST", "/c/slowupload?pause_ms=1", body=body)
    assert response.status == 200, response
    described = response.json()
    assert described["body_length"] == len(body)
    assert described["body_sha256"] == hashlib.sha256(body).hexdigest()


# -- connections and streams ------------------------------------------------------------------


def concurrent_gets(port: int, paths: list[str]) -> list[RawResponse]:
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(lambda path: rawhttp.get(port, path, deadline=20), paths))


@pytest.mark.parametrize(("limit", "requests", "connections"), [(None, 4, 1), (2, 3, 2), (2, 6, 3)])
def test_streams_share_connections_up_to_the_server_limit(
    upstream_host: UpstreamHost, limit: int | None, requests: int, connections: int
) -> None:
    server = start(upstream_host, H2Upstream("mux", max_streams=limit))
    config = {
        "upstreams": {"m": {"endpoints": [server.address], "protocol": "h2c"}},
        "routes": [route("m")],
    }
    try:
        with start_inprocess(config) as turnout, concurrent.futures.ThreadPoolExecutor(1) as bg:
            future = bg.submit(concurrent_gets, turnout.port, ["/m/hold"] * requests)
            wait_until(lambda: server.streams == requests, what="every request at the server")
            assert server.connections == connections
            if limit is not None:
                assert server.max_open <= limit
            server.release_held(upstream_host.loop)
            responses = future.result(30)
            assert [r.status for r in responses] == [200] * requests
            used = {r.json()["connection"] for r in responses}
            assert len(used) == connections
            # Later requests reuse the pooled connections.
            assert rawhttp.get(turnout.port, "/m/echo").status == 200
            assert server.connections == connections
    finally:
        upstream_host.call(server.stop())


def test_goaway_moves_later_requests_to_a_new_connection(upstream_host: UpstreamHost) -> None:
    server = start(upstream_host, H2Upstream("away"))
    config = {
        "upstreams": {"g": {"endpoints": [server.address], "protocol": "h2c"}},
        "routes": [route("g")],
    }
    try:
        with start_inprocess(config) as turnout:
            first = rawhttp.get(turnout.port, "/g/goaway")
            assert first.status == 200, first
            second = rawhttp.get(turnout.port, "/g/echo")
            assert second.status == 200, second
            assert second.json()["connection"] != first.json()["connection"]
            assert server.connections == 2
            # A GOAWAY before the answer: the stream it covers still completes, with its body.
            graceful = rawhttp.get(turnout.port, "/g/goaway-first")
            assert graceful.status == 200, graceful
            assert graceful.json()["connection"] == second.json()["connection"]
            assert rawhttp.get(turnout.port, "/g/echo").json()["connection"] == 3
    finally:
        upstream_host.call(server.stop())


def test_reset_stream_follows_the_retry_rules(upstream_host: UpstreamHost) -> None:
    server = start(upstream_host, H2Upstream("resets"))
    config = {
        "upstreams": {"r": {"endpoints": [server.address], "protocol": "h2c"}},
        "routes": [{**route("r"), "retries": 2}],
    }
    try:
        with start_inprocess(config) as turnout:
            response = rawhttp.get(turnout.port, "/r/reset")
            assert_error_json(response, 502)
            assert server.paths.count("/r/reset") == 3, "GET retried twice after a reset"
            with RawConnection(turnout.port) as conn:
                posted = conn.request("POST", "/r/reset", body=b"once")
            assert_error_json(posted, 502)
            assert server.paths.count("/r/reset") == 4, "a reset POST is never retried"
            # REFUSED_STREAM: not processed, so the request goes again once, POST or not.
            with RawConnection(turnout.port) as conn:
                refused = conn.request("POST", "/r/reset?code=7", body=b"twice")
            assert_error_json(refused, 502)
            assert server.paths.count("/r/reset?code=7") == 2
            # The connection survived the resets: every stream went over one.
            assert rawhttp.get(turnout.port, "/r/echo").status == 200
            assert server.connections == 1
    finally:
        upstream_host.call(server.stop())


def test_a_post_left_out_of_a_goaway_goes_on_a_new_connection(
    upstream_host: UpstreamHost,
) -> None:
    server = start(upstream_host, H2Upstream("unprocessed"))
    config = {
        "upstreams": {"u": {"endpoints": [server.address], "protocol": "h2c"}},
        "routes": [{**route("u"), "retries": 0}],
    }
    body = pattern_bytes(40_000, "replay")
    try:
        with start_inprocess(config) as turnout, RawConnection(turnout.port) as conn:
            response = conn.request("POST", "/u/goaway-unprocessed", body=body)
            assert response.status == 200, response
            described = response.json()
            assert described["body_sha256"] == hashlib.sha256(body).hexdigest()
            assert described["connection"] == 2
            assert server.refused_by_goaway == 1
    finally:
        upstream_host.call(server.stop())


def test_reset_after_the_head_reaches_the_client_broken(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", "/c/reset-after-head"))
        _, response = conn.read_final_response(allow_incomplete=True)
        assert response.status == 200
        assert response.framing == "chunked"
        assert not response.complete, "a reset stream was relayed as a complete response"
        assert conn.wait_closed()
    assert rawhttp.get(turnout.port, "/c/echo").status == 200


# -- failures to connect ----------------------------------------------------------------------


def test_connect_failure_gets_502_json(turnout: InProcessTurnout) -> None:
    assert_error_json(rawhttp.get(turnout.port, "/dead/x"), 502)


def test_server_refusing_h2_by_alpn_gets_502_and_a_clear_log(turnout: InProcessTurnout) -> None:
    assert_error_json(rawhttp.get(turnout.port, "/alpn/x"), 502)
    wait_until(
        lambda: "did not select h2 by ALPN" in turnout.stderr_text(), what="the ALPN warning"
    )


def test_websocket_upgrade_to_an_h2_upstream_is_refused(turnout: InProcessTurnout) -> None:
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    response, _ = rawhttp.send_raw(turnout.port, build_request("GET", "/c/ws", headers))
    assert_error_json(response, 502)
    assert "WebSocket" in response.json()["error"]


# -- pools across reloads and time, health checks, mirrors -------------------------------------


def test_reload_and_idle_sweep_close_connections_with_goaway(upstream_host: UpstreamHost) -> None:
    first = start(upstream_host, H2Upstream("first"))
    second = start(upstream_host, H2Upstream("second"))
    b = {"endpoints": [second.address], "protocol": "h2c"}
    both = {
        "upstreams": {"a": {"endpoints": [first.address], "protocol": "h2c"}, "b": b},
        "routes": [route("a"), route("b")],
    }
    try:
        with start_inprocess(both) as turnout:
            assert rawhttp.get(turnout.port, "/a/echo").status == 200
            assert rawhttp.get(turnout.port, "/b/echo").status == 200
            # A reload without `a`: its idle connection is drained with a GOAWAY.
            turnout.reload({"upstreams": {"b": b}, "routes": [route("b")]})
            wait_until(lambda: first.goaways_received == 1, what="GOAWAY to the removed upstream")
            assert second.goaways_received == 0
            # Past the idle timeout, the sweep closes `b`'s connection the same way.
            turnout.call_soon(lambda: turnout.ctx.pools.sweep(turnout.ctx.loop.time() + 3600))
            wait_until(lambda: second.goaways_received == 1, what="GOAWAY from the idle sweep")
            # A later request opens a new connection.
            assert rawhttp.get(turnout.port, "/b/echo").status == 200
            assert second.connections == 2
    finally:
        upstream_host.call(first.stop())
        upstream_host.call(second.stop())


def test_health_checks_speak_http2(servers: Servers) -> None:
    prober = Prober(lambda down: None)
    secure = client_context(UpstreamTls(ca=str(servers.ca)))

    async def checks() -> list[str | None]:
        try:
            return [
                await prober.probe_h2(servers.plain.address, "/ready", 5.0),
                await prober.probe_h2(servers.plain.address, "/status/503", 5.0),
                await prober.probe_h2(servers.secure.address, "/ready", 5.0, secure, "localhost"),
                await prober.probe_h2(servers.h1only.address, "/ready", 5.0, secure, "localhost"),
                await prober.probe_h2(f"127.0.0.1:{free_port()}", "/ready", 5.0),
            ]
        finally:
            await prober.close()

    ok, unavailable, tls_ok, alpn, refused = asyncio.run(checks())
    assert ok is None
    assert unavailable == "status 503"
    assert tls_ok is None
    assert alpn is not None
    assert "did not select h2 by ALPN" in alpn
    assert refused is not None


def test_mirror_to_an_http2_shadow_goes_as_streams(
    servers: Servers, upstream_host: UpstreamHost
) -> None:
    # An h2c shadow (a gRPC service, say) gets its copies as streams over HTTP/2, the body
    # included, marked as copies; the client's answer is the primary's.
    shadow = start(upstream_host, H2Upstream("shadow"))
    config = {
        "upstreams": {
            "c": {"endpoints": [servers.plain.address], "protocol": "h2c"},
            "shadow": {"endpoints": [shadow.address], "protocol": "h2c"},
        },
        "routes": [{**route("c"), "mirror": {"to": "shadow", "percent": 100}}],
    }
    try:
        with start_inprocess(config) as mirrored:
            assert rawhttp.get(mirrored.port, "/c/echo").status == 200
            with rawhttp.RawConnection(mirrored.port) as conn:
                posted = conn.request("POST", "/c/upload", body=b"copy me")
            assert posted.status == 200
            assert posted.json()["body_length"] == 7
            wait_until(
                lambda: (
                    'turnout_mirror_requests_total{outcome="sent",route="c",upstream="shadow"}'
                    " 2.0" in mirrored.metrics_text()
                ),
                what="both copies answered",
            )
            assert shadow.streams == 2
            assert sorted(shadow.paths) == ["/c/echo", "/c/upload"]
            for head in shadow.heads:
                fields = dict(head)
                assert fields[b"x-turnout-mirror"] == b"1"
                assert b"x-request-id" in fields
                assert b"transfer-encoding" not in fields
            assert "skipped" not in mirrored.stderr_text()
    finally:
        upstream_host.call(shadow.stop())


def test_prober_checks_an_h2c_upstream_over_http2(servers: Servers) -> None:
    def spec(path: str) -> ConfigSpec:
        text = f"""
upstreams:
  grpc:
    endpoints: [{servers.plain.address}]
    protocol: h2c
    health: {{path: {path}, interval: 50ms, timeout: 2s, unhealthy_after: 2, healthy_after: 1}}
routes: [{{name: all, split: {{grpc: 1}}}}]
"""
        return parse_config(text, "t.yaml")

    async def run() -> None:
        prober = Prober(lambda down: None)
        key = ("grpc", servers.plain.address)
        try:
            prober.update(spec("/status/503"))
            await async_wait_until(lambda: prober.down == {key}, what="down on 503")
            prober.update(spec("/ready"))
            await async_wait_until(lambda: prober.down == frozenset(), what="up on 200")
        finally:
            await prober.close()

    asyncio.run(run())
    assert "/status/503" in servers.plain.paths


def test_http10_request_without_host_gets_the_endpoint_as_authority(
    turnout: InProcessTurnout, servers: Servers
) -> None:
    response, _ = rawhttp.send_raw(turnout.port, b"GET /c/echo HTTP/1.0\r\n\r\n")
    assert response.status == 200, response
    described = response.json()
    assert described["authority"] == servers.plain.address
    assert "host" not in header_map(described)
