"""Downstream HTTP/2 (contract section 11) through one worker's data plane in this process.

Clients are real: curl (`--http2-prior-knowledge`, `--http2` over TLS), httpx with HTTP/2, and
the raw client of tests.support.h2client for exact frames and flow control. Upstreams are the
HTTP/1.1 echo servers of tests.support.upstreams.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import h2.events
import h2.settings
import httpx
import orjson
import pytest
import trustme
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, GoAwayFrame

from proxy.dataplane.http1 import PAUSE_BACKPRESSURE
from proxy.dataplane.http2 import STREAM_BUFFER, STREAM_WINDOW, Http2Connection
from tests.support import wait_until
from tests.support.certs import write_ca, write_pair
from tests.support.h2client import RawH2
from tests.support.h2server import H2Upstream
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.upstreams import EchoUpstream, UpstreamHost, pattern_bytes, pattern_sha256

MAX_STREAMS = 8


def config(blue: EchoUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "limits": {"max_concurrent_streams": MAX_STREAMS},
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "dead": {"endpoints": ["127.0.0.1:1"]},
        },
        "routes": [
            {"name": "none", "match": {"path_prefix": "/none"}, "split": {"dead": 100}},
            {
                "name": "main",
                "match": {"path_prefix": "/"},
                "split": {"blue": 100},
                "sticky": {"cookie": "sid", "set": True},
            },
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    with start_inprocess(config(blue), access_log=True) as process:
        yield process


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=30, check=False)


def seen_headers(body: bytes) -> list[tuple[str, str]]:
    return [(str(n).lower(), str(v)) for n, v in orjson.loads(body)["headers"]]


def goaways(turnout: InProcessTurnout) -> dict[str, int]:
    """GOAWAYs the worker counted (turnout_http2_goaways_total), by reason, the non-zero."""
    return turnout.call_soon(
        lambda: {reason: n for reason, n in turnout.ctx.stats.h2_goaways.items() if n}
    )


# -- requests and responses -------------------------------------------------------------------


def test_curl_prior_knowledge(turnout: InProcessTurnout) -> None:
    done = curl(
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-H",
        "cookie: a=1",
        "-H",
        "cookie: b=2",
        f"{turnout.url}/hello?x=1",
    )
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200"), head
    lines = head.lower().split(b"\r\n")
    assert any(line.startswith(b"x-request-id: ") for line in lines)
    assert any(line.startswith(b"via: 1.1 turnout-") for line in lines)
    # A new visitor of a sticky route is given its cookie, as over HTTP/1.1.
    assert any(line.startswith(b"set-cookie: sid=") for line in lines)
    seen = orjson.loads(body)
    assert seen["path"] == "/hello?x=1"
    headers = seen_headers(body)
    assert ("host", f"127.0.0.1:{turnout.port}") in headers
    # Via names the version each hop received: HTTP/2 from the client (to the upstream), and
    # HTTP/1.1 from the upstream (above, to the client).
    assert [v for n, v in headers if n == "via"][-1].startswith("2 turnout-")
    # RFC 9113 section 8.2.3: split cookie fields reach an HTTP/1.1 upstream as one.
    assert [v for n, v in headers if n == "cookie"] == ["a=1; b=2"]
    assert ("x-forwarded-proto", "http") in headers
    request_id = next(v for n, v in headers if n == "x-request-id")
    entry = turnout.wait_for_log({request_id})[request_id]
    assert entry["protocol"] == "HTTP/2"
    assert entry["status"] == 200


def test_a_stream_is_mirrored_like_an_http1_request(
    blue: EchoUpstream, green: EchoUpstream
) -> None:
    # Mirror is one of the routing features every stream gets: the copy goes to the shadow
    # over HTTP/1.1, the client's answer comes from the primary.
    cfg = config(blue)
    cfg["upstreams"]["green"] = {"endpoints": [green.address]}
    cfg["routes"][1]["mirror"] = {"to": "green", "percent": 100}
    before = green.requests
    with start_inprocess(cfg) as turnout, RawH2(turnout.port) as client:
        sid = client.request("/mirrored", method="POST", body=b"copy me")
        status, _, body = client.response(sid)
        assert status == 200
        assert orjson.loads(body)["upstream"] == "blue"
        wait_until(lambda: green.requests == before + 1, what="the shadow's copy")


def test_body_without_length_goes_chunked(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        body = pattern_bytes(300_000)
        sid = client.request("/upload", method="POST", end=False)
        client.send_body(sid, body)
        status, _, answer = client.response(sid)
    assert status == 200
    seen = orjson.loads(answer)
    assert seen["body_len"] == len(body)
    assert seen["body_sha256"] == pattern_sha256(len(body))
    assert ("transfer-encoding", "chunked") in seen_headers(answer)


def test_body_with_length_is_not_chunked(turnout: InProcessTurnout) -> None:
    body = b"x" * 1000
    with RawH2(turnout.port) as client:
        sid = client.request(
            "/upload", method="POST", headers=[(b"content-length", b"1000")], body=body
        )
        status, _, answer = client.response(sid)
    assert status == 200
    headers = seen_headers(answer)
    assert ("content-length", "1000") in headers
    assert not any(n == "transfer-encoding" for n, _ in headers)


@pytest.mark.parametrize(
    ("declared", "frames", "trailers", "message"),
    [
        (10, [b"x" * 20], False, "request body longer than its content-length (10 bytes)"),
        (100, [b"x" * 10], False, "request body of 10 bytes, shorter than its content-length"),
        # Ended by trailers: h2 counts only DATA frames ending a stream, Turnout checks this.
        (100, [b"x" * 10], True, "request body of 10 bytes, shorter than its content-length"),
        (5, [], False, "request body of 0 bytes, shorter than its content-length (5)"),
    ],
)
def test_a_body_that_does_not_match_its_content_length_is_a_stream_error(
    turnout: InProcessTurnout, declared: int, frames: list[bytes], trailers: bool, message: str
) -> None:
    # RFC 9113 section 8.1.1: a malformed request, a stream error. The request is answered
    # 400 (its response had not begun) and the connection's other streams go on.
    request_id = f"cl-{declared}-{len(frames)}-{trailers}"
    head = [(b"content-length", str(declared).encode()), (b"x-request-id", request_id.encode())]
    with RawH2(turnout.port) as client:
        sid = client.request("/upload", method="POST", headers=head, end=not frames)
        for n, data in enumerate(frames):
            client.conn.send_data(sid, data, end_stream=not trailers and n == len(frames) - 1)
        if trailers:
            client.conn.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
        client.flush()
        status, _, body = client.response(sid)
        assert status == 400
        assert orjson.loads(body)["error"].startswith(message)
        after = client.request("/after")
        assert client.response(after)[0] == 200
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)

        def open_streams() -> list[int]:
            return [
                len(conn.streams)
                for conn in turnout.ctx.acceptor.connections
                if isinstance(conn, Http2Connection)
            ]

        # Nothing is left of either stream (a leaked one would count against the limit).
        wait_until(lambda: turnout.call_soon(open_streams) == [0], what="both streams gone")
    entry = turnout.wait_for_log({request_id})[request_id]
    assert (entry["status"], entry["flags"]) == (400, "refused")


def test_httpx_multiplexes_on_one_connection(turnout: InProcessTurnout) -> None:
    with httpx.Client(http1=False, http2=True, base_url=turnout.url) as client:
        for n in range(20):
            response = client.post(f"/item/{n}", content=pattern_bytes(5000 + n, str(n)))
            assert response.http_version == "HTTP/2"
            assert response.status_code == 200
            assert response.json()["body_sha256"] == pattern_sha256(5000 + n, str(n))
        big = client.get("/fixed", params={"n": 2_000_000})
        assert big.status_code == 200
        assert hashlib.sha256(big.content).hexdigest() == pattern_sha256(2_000_000)


def test_concurrent_streams_on_one_connection(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        ids = [client.request(f"/slow?ms=200&n={n}") for n in range(MAX_STREAMS)]
        answers = {sid: client.response(sid) for sid in ids}
    assert all(status == 200 for status, _, _ in answers.values())
    paths = {orjson.loads(body)["path"] for _, _, body in answers.values()}
    assert paths == {f"/slow?ms=200&n={n}" for n in range(MAX_STREAMS)}


def test_local_errors_on_a_stream(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        sid = client.request("/none/x")
        status, head, body = client.response(sid)
        assert status == 502
        assert orjson.loads(body)["error"] == "upstream connect failure"
        assert head[b"content-length"] == str(len(body)).encode()
        # The connection goes on.
        sid = client.request("/after")
        assert client.response(sid)[0] == 200


def test_grpc_local_answer_is_trailers_only(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        sid = client.request(
            "/none/pkg.Service/Method",
            method="POST",
            headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
            body=b"\x00\x00\x00\x00\x00",
        )
        event = client.events_until(
            lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid
        )
        assert isinstance(event, h2.events.ResponseReceived)
        # One HEADERS frame that ends the stream, with the status in it.
        assert event.stream_ended is not None
        head = dict(event.headers or [])
    assert head[b":status"] == b"200"
    assert head[b"grpc-status"] == b"14"  # UNAVAILABLE: the endpoint refuses connections
    assert head[b"content-type"] == b"application/grpc"


# -- malformed requests: stream errors, never the connection ------------------------------------


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ([(b":method", b"GET"), (b":authority", b"a"), (b":path", b"/")], "no :scheme"),
        ([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")], "no :path"),
        (
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"X-Up", b"1")],
            "upper case",
        ),
        (
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"connection", b"x")],
            "connection-specific",
        ),
        (
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"te", b"gzip")],
            "te",
        ),
        ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":x", b"1")], "pseudo"),
    ],
)
def test_malformed_request_resets_its_stream_only(
    turnout: InProcessTurnout, fields: list[tuple[bytes, bytes]], why: str
) -> None:
    with RawH2(turnout.port, validate=False) as client:
        good = client.request("/slow?ms=300")
        bad = client.conn.get_next_available_stream_id()
        client.conn.send_headers(bad, fields, end_stream=True)
        client.flush()
        event = client.events_until(
            lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == bad
        )
        assert isinstance(event, h2.events.StreamReset)
        assert event.error_code == ErrorCodes.PROTOCOL_ERROR, why
        assert client.response(good)[0] == 200


def test_extended_connect_is_refused(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port, validate=False) as client:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"http"),
                (b":authority", b"a"),
                (b":path", b"/ws"),
            ],
        )
        client.flush()
        status, _, body = client.response(sid)
    assert status == 501
    assert "WebSocket over HTTP/2" in orjson.loads(body)["error"]


def test_header_limits_answer_431(turnout: InProcessTurnout) -> None:
    many = [(f"x-h{n}".encode(), b"v") for n in range(150)]
    with RawH2(turnout.port) as client:
        sid = client.request("/", headers=many)
        assert client.response(sid)[0] == 431
        assert client.response(client.request("/"))[0] == 200


# -- settings and limits -----------------------------------------------------------------------


def test_settings_say_the_limits(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        event = client.events_until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
        assert isinstance(event, h2.events.RemoteSettingsChanged)
        changed = {code: setting.new_value for code, setting in event.changed_settings.items()}
    codes = h2.settings.SettingCodes
    assert changed[codes.MAX_CONCURRENT_STREAMS] == MAX_STREAMS
    assert changed[codes.MAX_HEADER_LIST_SIZE] == 64 * 1024
    assert changed[codes.INITIAL_WINDOW_SIZE] == STREAM_WINDOW


def test_streams_over_the_limit_are_refused(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        # Sent before the server's SETTINGS are read: the client does not know the limit yet.
        ids = [client.request(f"/slow?ms=500&n={n}") for n in range(MAX_STREAMS + 3)]
        refused = []
        for sid in ids[MAX_STREAMS:]:

            def reset_of(e: h2.events.Event, sid: int = sid) -> bool:
                return isinstance(e, h2.events.StreamReset) and e.stream_id == sid

            event = client.events_until(reset_of)
            assert isinstance(event, h2.events.StreamReset)
            refused.append(event.error_code)
        assert refused == [ErrorCodes.REFUSED_STREAM] * 3
        assert all(client.response(sid)[0] == 200 for sid in ids[:MAX_STREAMS])


# -- flow control and backpressure ------------------------------------------------------------


def held_streams(turnout: InProcessTurnout) -> int:
    return turnout.call_soon(
        lambda: sum(
            len(conn.streams)
            for conn in turnout.ctx.acceptor.connections
            if isinstance(conn, Http2Connection)
        )
    )


def held_bytes(turnout: InProcessTurnout) -> list[int]:
    def read() -> list[int]:
        return [
            stream.out_size
            for conn in turnout.ctx.acceptor.connections
            if isinstance(conn, Http2Connection)
            for stream in conn.streams.values()
        ]

    return turnout.call_soon(read)


def test_slow_reader_stalls_only_its_stream(turnout: InProcessTurnout) -> None:
    size = 8_000_000
    with RawH2(turnout.port) as client:
        # The connection's window is wide open: only the slow stream's own window is shut.
        client.conn.increment_flow_control_window(100_000_000)
        slow = client.request(f"/fixed?n={size}")
        # The slow stream gets its first window's worth, then nothing while it does not read.
        client.events_until(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == slow)
        other = client.request("/fixed?n=500000")
        status, _, body = client.response(other)
        assert status == 200
        assert len(body) == 500_000
        # What the proxy holds for the stalled stream is bounded: its upstream is not read.
        wait_until(lambda: held_bytes(turnout) != [], what="a stream held")
        assert max(held_bytes(turnout)) <= STREAM_BUFFER + 256 * 1024
        received = sum(
            len(e.data or b"")
            for e in client.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == slow
        )
        assert received <= 65535
        # Reading again, the whole body arrives intact.
        client.ack(slow, received)
        status, _, body = client.response(slow)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)


def test_stalled_upload_does_not_stall_others(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        # An upload the upstream reads slowly, and one that completes meanwhile.
        slow = client.request("/slowupload?pause_ms=300", method="POST", end=False)
        client.send_body(slow, pattern_bytes(60_000), end=False)
        other = client.request("/upload", method="POST", end=False)
        client.send_body(other, pattern_bytes(1_000_000))
        status, _, body = client.response(other)
        assert status == 200
        assert orjson.loads(body)["body_len"] == 1_000_000
        client.send_body(slow, pattern_bytes(60_000))
        assert client.response(slow)[0] == 200


# -- TLS and ALPN ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_turnout(
    blue: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InProcessTurnout, Path]]:
    folder = tmp_path_factory.mktemp("h2tls")
    ca = trustme.CA()
    pair = write_pair(ca, folder, "app", "app.test")
    ca_file = write_ca(ca, folder / "ca.pem")
    cfg = config(blue)
    with start_inprocess(cfg) as plain:
        port = plain.port
    cfg["listen"] = [{"address": f"127.0.0.1:{port}", "tls": {"certificates": [pair.config()]}}]
    with start_inprocess(cfg) as process:
        yield process, ca_file


def test_curl_http2_over_tls(tls_turnout: tuple[InProcessTurnout, Path]) -> None:
    turnout, ca_file = tls_turnout
    done = curl(
        "--http2",
        "--cacert",
        str(ca_file),
        "--resolve",
        f"app.test:{turnout.port}:127.0.0.1",
        "-w",
        "\n%{http_version}",
        f"https://app.test:{turnout.port}/tls",
    )
    assert done.returncode == 0, done.stderr
    body, _, version = done.stdout.rpartition(b"\n")
    assert version == b"2"
    headers = seen_headers(body)
    assert ("x-forwarded-proto", "https") in headers
    assert ("host", f"app.test:{turnout.port}") in headers


def test_http1_still_served_over_tls(tls_turnout: tuple[InProcessTurnout, Path]) -> None:
    turnout, ca_file = tls_turnout
    done = curl(
        "--http1.1",
        "--cacert",
        str(ca_file),
        "--resolve",
        f"app.test:{turnout.port}:127.0.0.1",
        "-w",
        "\n%{http_version}",
        f"https://app.test:{turnout.port}/tls",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rpartition(b"\n")[2] == b"1.1"


# -- drain ------------------------------------------------------------------------------------


def test_drain_sends_goaway_and_lets_streams_finish(blue: EchoUpstream) -> None:
    with start_inprocess(config(blue)) as turnout:
        client = RawH2(turnout.port)
        sid = client.request("/slow?ms=800")
        wait_until(lambda: held_streams(turnout) == 1, what="the stream open in the worker")
        stopping = threading.Thread(target=turnout.stop, daemon=True)
        stopping.start()
        event = client.goaway()
        assert event.error_code == ErrorCodes.NO_ERROR
        assert event.last_stream_id == sid
        assert goaways(turnout) == {"drain": 1}
        status, _, body = client.response(sid)
        assert status == 200
        assert orjson.loads(body)["path"] == "/slow?ms=800"
        stopping.join(30)
        assert not stopping.is_alive()
        client.close()


def test_a_clients_graceful_goaway_lets_its_open_stream_finish(blue: EchoUpstream) -> None:
    # RFC 9113 section 6.8: the streams a GOAWAY leaves open still complete. The client's
    # GOAWAY is hand-built: h2's own client would refuse the response after sending one.
    with start_inprocess(config(blue)) as turnout, RawH2(turnout.port) as client:
        sid = client.request("/slow?ms=300")
        wait_until(lambda: held_streams(turnout) == 1, what="the stream open in the worker")
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = 0
        goaway.error_code = ErrorCodes.NO_ERROR
        client.send_raw(goaway.serialize())
        status, _, body = client.response(sid)
        assert status == 200
        assert orjson.loads(body)["path"] == "/slow?ms=300"
        # Nothing is open any more and the client said goodbye: Turnout closes.
        until = time.monotonic() + 10
        while client.read_once():
            assert time.monotonic() < until, "the connection stayed open"
        assert client.error is None, client.error


# -- abuse, as the worker counts it (the full set runs against a subprocess: system tests) ----


def test_rapid_reset_is_counted(blue: EchoUpstream) -> None:
    with start_inprocess(config(blue)) as turnout, RawH2(turnout.port) as client:
        client.reset_burst("/reset-me", 300)
        goaway = client.goaway()
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        wait_until(lambda: goaways(turnout) == {"rapid_reset": 1}, what="the GOAWAY counted")
        assert "resets streams faster than it lets them finish" in turnout.stderr_text()


def test_idle_connection_is_closed_with_goaway(blue: EchoUpstream) -> None:
    with (
        start_inprocess(config(blue, timeouts={"client_keepalive": "1s"})) as turnout,
        RawH2(turnout.port) as client,
    ):
        assert client.response(client.request("/once"))[0] == 200
        goaway = client.goaway(deadline=10)
        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert goaway.additional_data == b"idle"
        # A connection closed for being idle is no one's fault: not counted.
        assert goaways(turnout) == {}


def test_data_of_answered_streams_does_not_shrink_the_connection_window(
    turnout: InProcessTurnout,
) -> None:
    many = [(f"x-h{n}".encode(), b"v") for n in range(150)]
    with RawH2(turnout.port) as client:
        client.events_until(lambda e: isinstance(e, h2.events.WindowUpdated))
        for _ in range(30):
            # Refused (431) at once and reset: DATA already on its way arrives after the
            # stream is over (no event for it), and still counts against the connection's
            # window, which must not shrink for good.
            sid = client.request("/", method="POST", headers=many, end=False)

            def over(e: h2.events.Event, sid: int = sid) -> bool:
                return isinstance(e, h2.events.StreamReset) and e.stream_id == sid

            client.events_until(over)
            client.send_raw(DataFrame(sid, b"x" * 16384).serialize() * 12)
        sid = client.request("/upload", method="POST", end=False)
        client.send_body(sid, pattern_bytes(1_000_000))
        status, _, body = client.response(sid)
    assert status == 200
    assert orjson.loads(body)["body_len"] == 1_000_000


@pytest.fixture(scope="module")
def h2_turnout(upstream_host: UpstreamHost, blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    """Turnout in front of an HTTP/2 upstream (h2c): HTTP/2 end to end, as gRPC needs."""
    upstream = H2Upstream("h2")
    upstream_host.call(upstream.start())
    cfg = config(blue)
    cfg["upstreams"]["h2"] = {"endpoints": [upstream.address], "protocol": "h2c"}
    cfg["routes"].insert(0, {"name": "h2", "match": {"path_prefix": "/h2"}, "split": {"h2": 100}})
    try:
        with start_inprocess(cfg, access_log=True) as process:
            yield process
    finally:
        upstream_host.call(upstream.stop())


def test_trailers_pass_end_to_end(h2_turnout: InProcessTurnout) -> None:
    with RawH2(h2_turnout.port) as client:
        sid = client.request("/h2/trailers", headers=[(b"te", b"trailers")])
        status, _, body = client.response(sid)
        trailers = next(
            e
            for e in client.events
            if isinstance(e, h2.events.TrailersReceived) and e.stream_id == sid
        )
    assert status == 200
    assert body
    assert isinstance(trailers, h2.events.TrailersReceived)
    fields = dict(trailers.headers or [])
    assert fields[b"grpc-status"] == b"0"
    assert b"x-checksum" in fields


def test_request_trailers_reach_an_http2_upstream(h2_turnout: InProcessTurnout) -> None:
    # Trailers pass both ways: the client's, after its body, end the upstream's stream too;
    # framing fields among them never pass.
    with RawH2(h2_turnout.port) as client:
        sid = client.request("/h2/upload", method="POST", body=b"hello", end=False)
        client.conn.send_headers(
            sid, [(b"x-checksum", b"abc"), (b"content-length", b"99")], end_stream=True
        )
        client.flush()
        status, _, body = client.response(sid)
    assert status == 200
    seen = orjson.loads(body)
    assert seen["body_length"] == 5
    assert seen["trailers"] == [["x-checksum", "abc"]]


def test_an_http1_clients_trailers_reach_an_http2_upstream(h2_turnout: InProcessTurnout) -> None:
    raw = build_request("POST", "/h2/upload", [("Transfer-Encoding", "chunked")]) + (
        b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nKeep-Alive: 5\r\n\r\n"
    )
    with RawConnection(h2_turnout.port) as conn:
        conn.send(raw)
        response = conn.read_final_response("POST")[1]
    assert response.status == 200
    seen = orjson.loads(response.body)
    assert seen["body_length"] == 5
    assert seen["trailers"] == [["x-checksum", "abc"]]


def test_a_request_without_trailers_reaches_an_http2_upstream_without_any(
    h2_turnout: InProcessTurnout,
) -> None:
    with RawH2(h2_turnout.port) as client:
        sid = client.request("/h2/upload", method="POST", body=b"hello")
        status, _, body = client.response(sid)
    assert status == 200
    assert orjson.loads(body)["trailers"] == []


def test_trailers_only_answer_stays_one_headers_frame(h2_turnout: InProcessTurnout) -> None:
    with RawH2(h2_turnout.port) as client:
        sid = client.request(
            "/h2/trailers-only",
            method="POST",
            headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
            body=b"\x00\x00\x00\x00\x00",
        )
        head = client.events_until(
            lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid
        )
        assert isinstance(head, h2.events.ResponseReceived)
        # A gRPC client reads the status of a body-less answer only from a HEADERS frame that
        # ends the stream.
        assert head.stream_ended is not None
        assert dict(head.headers or [])[b"grpc-status"] == b"5"


def test_head_request_is_one_headers_frame(turnout: InProcessTurnout) -> None:
    with RawH2(turnout.port) as client:
        sid = client.request("/head", method="HEAD")
        head = client.events_until(
            lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid
        )
        assert isinstance(head, h2.events.ResponseReceived)
        assert head.stream_ended is not None
        assert dict(head.headers or [])[b":status"] == b"200"


def test_early_hints_pass_as_interim_headers(h2_turnout: InProcessTurnout) -> None:
    with RawH2(h2_turnout.port) as client:
        sid = client.request("/h2/early-hints")
        status, _, _ = client.response(sid)
        interim = [
            e
            for e in client.events
            if isinstance(e, h2.events.InformationalResponseReceived) and e.stream_id == sid
        ]
    assert status == 200
    assert [dict(e.headers or [])[b":status"] for e in interim] == [b"103"]


def test_grpc_deadline_mid_response_ends_with_trailers(h2_turnout: InProcessTurnout) -> None:
    with RawH2(h2_turnout.port) as client:
        client.conn.increment_flow_control_window(100_000_000)
        sid = client.request(
            "/h2/stream?n=4000000&chunk=16384",
            method="POST",
            headers=[
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"grpc-timeout", b"300m"),
            ],
            body=b"\x00\x00\x00\x00\x00",
        )
        # Not reading: the response stops at the stream's window while the deadline passes.
        client.events_until(
            lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid
        )
        wait_until(
            lambda: "grpc_deadline" in str(h2_turnout.access_log()), what="the deadline logged"
        )
        # Reading again: what was held comes, then the call's status in trailers.
        status, _, body = client.response(sid)
        trailers = next(
            e
            for e in client.events
            if isinstance(e, h2.events.TrailersReceived) and e.stream_id == sid
        )
        assert isinstance(trailers, h2.events.TrailersReceived)
        fields = dict(trailers.headers or [])
    assert status == 200
    assert 0 < len(body) < 4_000_000
    assert fields[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED
    assert trailers.stream_ended is not None


def backpressured(turnout: InProcessTurnout) -> bool:
    """A stream of the worker takes no more body: its upstream does not take it."""

    def read() -> bool:
        return any(
            stream.paused & PAUSE_BACKPRESSURE
            for conn in turnout.ctx.acceptor.connections
            if isinstance(conn, Http2Connection)
            for stream in conn.streams.values()
        )

    return turnout.call_soon(read)


def test_upload_to_an_upstream_that_does_not_read_shuts_its_window(blue: EchoUpstream) -> None:
    # An endpoint whose kernel takes the connection but which never reads a byte.
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    cfg = config(blue)
    cfg["upstreams"]["sink"] = {"endpoints": [f"127.0.0.1:{sink.getsockname()[1]}"]}
    cfg["routes"].insert(
        0, {"name": "sink", "match": {"path_prefix": "/sink"}, "split": {"sink": 100}}
    )

    with sink, start_inprocess(cfg) as turnout, RawH2(turnout.port) as client:
        client.sock.settimeout(0.2)
        sid = client.request("/sink/upload", method="POST", end=False)
        sent = 0
        limit = 200_000_000
        # Send while the window allows; a shut window is waited on (reading what comes).
        while sent < limit and not (
            client.conn.local_flow_control_window(sid) == 0 and backpressured(turnout)
        ):
            window = min(client.conn.local_flow_control_window(sid), 16384)
            if window > 0:
                client.conn.send_data(sid, b"x" * window)
                client.flush()
                sent += window
                continue
            with contextlib.suppress(TimeoutError):
                client.read_once()
        client.sock.settimeout(10)
        # The proxy stopped taking the body long before the end: the client holds the rest.
        assert sent < limit
        assert client.conn.local_flow_control_window(sid) == 0
        # The connection itself is not held: another stream is served.
        assert client.response(client.request("/other"))[0] == 200


# -- a real gRPC client and server (grpcio) through Turnout ---------------------------------


def _reverse(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request[::-1]


def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for n in range(int(request)):
        yield b"%d" % n


@pytest.fixture(scope="module")
def grpc_turnout(blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Reverse": grpc.unary_unary_rpc_method_handler(_reverse),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Svc", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cfg = config(blue)
    cfg["upstreams"]["grpc"] = {"endpoints": [f"127.0.0.1:{port}"], "protocol": "h2c"}
    cfg["routes"].insert(
        0, {"name": "grpc", "match": {"path_prefix": "/test.Svc"}, "split": {"grpc": 100}}
    )
    try:
        with start_inprocess(cfg, access_log=True) as process:
            yield process
    finally:
        server.stop(0)


def test_grpc_client_through_h2c(grpc_turnout: InProcessTurnout) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_turnout.port}") as channel:
        assert channel.unary_unary("/test.Svc/Reverse")(b"turnout", timeout=10) == b"tuonrut"
        counted = list(channel.unary_stream("/test.Svc/Count")(b"500", timeout=10))
        assert counted == [b"%d" % n for n in range(500)]
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Svc/Missing")(b"", timeout=10)
        # A trailers-only answer reaches the stub as the status it carries.
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
