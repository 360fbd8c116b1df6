"""gRPC through a real Turnout (contract section 11): grpcio clients on h2c (and TLS with ALPN
h2) to Turnout, Turnout to grpcio servers over h2c (`protocol: h2c` upstreams).

Every call shape streams through (unary, server-, client-streaming, bidi); trailing metadata and
status details pass unchanged; a call's deadline (grpc-timeout) ends it long before the proxy's
own response timeout; a proxy-made failure is a gRPC status with a grpc-message, never an HTTP
error page; a 90/10 split and a metadata override choose per call; a canary answering INTERNAL
is rolled back; `turnout_grpc_responses_total` counts the statuses by name; an open bidi stream
outlives a reload.

The servers are tests/support/grpcrig.py's (the .proto is compiled at test time).
"""

from __future__ import annotations

import math
import os
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until
from tests.support.certs import write_pair
from tests.support.grpcrig import (
    BINARY_TRAILER,
    RigClient,
    RigServer,
    grpc_frame,
    grpc_request_headers,
    h2_request,
    protos,
)
from tests.support.load import admin_call, admin_text, wait_generation
from tests.support.turnout import PROJECT_ROOT, TurnoutFactory, TurnoutProcess, free_port

# benchmarks/ is not a package: its directory goes on the path, and h2lib is imported by the
# name mypy knows it by (as tests/unit/test_rollout_simulation.py does).
sys.path.append(str(PROJECT_ROOT / "benchmarks"))
import h2lib

DEADLINE = 20.0
SPLIT_CALLS = 400
# A split's count is checked against the binomial quantiles of this tail probability (each
# side): a correct proxy fails it about once in a billion runs.
SPLIT_TAIL = 1e-9
ROLLOUT_RATE = 40.0  # calls per second while a rollout runs
MAX_LOAD_S = 60.0


@pytest.fixture
def servers() -> Iterator[dict[str, RigServer]]:
    """Two healthy gRPC servers, v1 and v2; a test changes their mode as it needs."""
    made = {"v1": RigServer("v1"), "v2": RigServer("v2")}
    for server in made.values():
        server.start()
    yield made
    for server in made.values():
        server.stop()


def rig_config(
    endpoints: dict[str, list[str]],
    split: dict[str, int],
    *,
    overrides: list[dict[str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One route `rig` over h2c upstreams named as `endpoints`' keys."""
    route: dict[str, Any] = {"name": "rig", "split": split}
    if overrides:
        route["overrides"] = overrides
    return {
        "upstreams": {
            name: {"endpoints": addresses, "protocol": "h2c"}
            for name, addresses in endpoints.items()
        },
        "routes": [route],
        **extra,
    }


def endpoints_of(servers: dict[str, RigServer]) -> dict[str, list[str]]:
    return {name: [server.address] for name, server in servers.items()}


def target(turnout: TurnoutProcess) -> str:
    return f"127.0.0.1:{turnout.port}"


def unary_body(text: str) -> bytes:
    return grpc_frame(protos().pb2.EchoRequest(text=text).SerializeToString())


def grpc_counts(turnout: TurnoutProcess) -> dict[tuple[str, str, str], float]:
    """turnout_grpc_responses_total by (route, upstream, grpc_status)."""
    status, text = admin_text(turnout.admin_url, "/metrics")
    assert status == 200
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "turnout_grpc_responses_total":
                labels = sample.labels
                key = (labels["route"], labels["upstream"], labels["grpc_status"])
                counts[key] = sample.value
    return counts


def binomial_bounds(n: int, p: float, tail: float) -> tuple[int, int]:
    """The smallest lo and largest hi with P(X < lo) <= tail and P(X > hi) <= tail."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, below = 0, 0.0
    while below + pmf[lo] <= tail:
        below += pmf[lo]
        lo += 1
    hi, above = n, 0.0
    while above + pmf[hi] <= tail:
        above += pmf[hi]
        hi -= 1
    return lo, hi


# --- the rig alone (no proxy): what every test below takes for granted -------------------------


def test_the_rig_answers_every_call_shape_and_mode_directly(servers: dict[str, RigServer]) -> None:
    v1 = servers["v1"]
    with RigClient(v1.address) as client:
        reply, call = client.unary("direct", metadata=[("x-canary", "1")])
        assert (reply.version, reply.text, call.code()) == ("v1", "direct", grpc.StatusCode.OK)
        assert v1.last_metadata["x-canary"] == "1"
        assert [r.index for r in client.server_stream("s", 3)] == [0, 1, 2]
        assert client.client_stream([2, 3]).total == 5
        bidi = client.bidi()
        assert bidi.exchange("b").text == "b"
        assert bidi.close() == grpc.StatusCode.OK
        v1.mode = "trailers"
        assert dict(client.unary("t")[1].trailing_metadata())["x-rig-bin"] == BINARY_TRAILER
        v1.mode = "internal"
        with pytest.raises(grpc.RpcError) as failed:
            client.unary("i")
        assert failed.value.code() == grpc.StatusCode.INTERNAL
    # A slow call with a deadline ends DEADLINE_EXCEEDED, whoever keeps the deadline; without a
    # client timer the server itself ends it (grpcio servers honour grpc-timeout).
    v1.mode = "slow"
    answer = h2_request(
        v1.port,
        grpc_request_headers(v1.address, "Unary", extra=[("grpc-timeout", "200m")]),
        unary_body("slow"),
    )
    assert answer.grpc_status() == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], answer
    assert v1.calls == 7


# --- the four call shapes ---------------------------------------------------------------------


def test_unary_reaches_the_upstream_with_forwarding_metadata_and_comes_back(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100, "v2": 0}))
    with RigClient(target(turnout)) as client:
        reply, call = client.unary("hello", metadata=[("x-trace", "abc")])
    assert (reply.version, reply.text) == ("v1", "hello")
    assert call.code() == grpc.StatusCode.OK
    seen = servers["v1"].last_metadata
    assert seen["x-trace"] == "abc"
    assert str(seen["x-forwarded-for"]).endswith("127.0.0.1")
    assert seen["x-forwarded-proto"] == "http"
    # The request id the upstream saw is the one the client gets back.
    assert dict(call.initial_metadata())["x-request-id"] == seen["x-request-id"]
    assert servers["v2"].calls == 0


def test_calls_are_mirrored_to_a_grpc_shadow(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    # Shadow traffic for a gRPC service: every call reaches v1 (the caller's answer) and a copy
    # reaches v2 over HTTP/2, marked as a copy, streaming calls included.
    config = rig_config({"v1": [servers["v1"].address]}, {"v1": 100})
    config["upstreams"]["v2"] = {"endpoints": [servers["v2"].address], "protocol": "h2c"}
    config["routes"][0]["mirror"] = {"to": "v2", "percent": 100}
    turnout = turnout_factory(config)
    with RigClient(target(turnout)) as client:
        reply, call = client.unary("shadowed")
        total = client.client_stream([1, 2, 3])
    assert (reply.version, reply.text) == ("v1", "shadowed")
    assert call.code() == grpc.StatusCode.OK
    assert total.total == 6
    wait_until(lambda: servers["v2"].calls == 2, what="both copies at the shadow")
    assert servers["v1"].calls == 2
    assert servers["v2"].last_metadata["x-turnout-mirror"] == "1"

    def sent() -> float:
        status, text = admin_text(turnout.admin_url, "/metrics")
        assert status == 200
        line = 'turnout_mirror_requests_total{outcome="sent",route="rig",upstream="v2"} '
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    wait_until(lambda: sent() == 2.0, what="both copies counted as sent")


def test_a_grpc_shadow_that_fails_is_a_status_mismatch(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    # For gRPC the outcome is grpc-status (HTTP 200 either way): a shadow answering INTERNAL
    # where the primary answered OK is what shadow traffic is there to show.
    servers["v2"].mode = "internal"
    config = rig_config({"v1": [servers["v1"].address]}, {"v1": 100})
    config["upstreams"]["v2"] = {"endpoints": [servers["v2"].address], "protocol": "h2c"}
    config["routes"][0]["mirror"] = {"to": "v2", "percent": 100}
    turnout = turnout_factory(config)
    with RigClient(target(turnout)) as client:
        for text in ("one", "two"):
            reply, call = client.unary(text)
            assert (reply.version, call.code()) == ("v1", grpc.StatusCode.OK)

    def metric(name: str) -> float:
        status, text = admin_text(turnout.admin_url, "/metrics")
        assert status == 200
        line = f'{name}{{route="rig",upstream="v2"}} '
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    wait_until(
        lambda: metric("turnout_mirror_status_mismatch_total") == 2.0,
        what="both copies counted as status mismatches",
    )
    assert servers["v2"].calls == 2


def test_a_call_with_a_content_length_passes_as_one_without(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    # grpcio sends no content-length; other clients (h2load, some gateways) do. Both are framed
    # by the stream's end on HTTP/2 and must reach the server alike.
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100}))
    body = unary_body("sized")
    for extra in ([], [("content-length", str(len(body)))]):
        answer = h2_request(
            turnout.port, grpc_request_headers(target(turnout), "Unary", extra=extra), body
        )
        assert (answer.status, answer.grpc_status()) == (200, 0), (extra, answer)
        reply = protos().pb2.EchoReply.FromString(answer.body[5:])
        assert (reply.version, reply.text) == ("v1", "sized")
    assert servers["v1"].calls == 2


def test_server_streaming_sends_every_message_in_order(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100}))
    with RigClient(target(turnout)) as client:
        replies = client.server_stream("tick", 200)
    assert [(r.index, r.version, r.text) for r in replies] == [
        (index, "v1", "tick") for index in range(200)
    ]


def test_client_streaming_sums_every_message(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100}))
    with RigClient(target(turnout)) as client:
        total = client.client_stream(range(1, 1001))
    assert (total.version, total.count, total.total) == ("v1", 1000, 500500)


def test_bidi_echoes_each_message_as_it_comes(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100}))
    with RigClient(target(turnout)) as client:
        bidi = client.bidi()
        # Each reply is read before the next message is sent: nothing may wait for the end of
        # the request stream.
        for index in range(25):
            reply = bidi.exchange(f"m{index}")
            assert (reply.version, reply.text, reply.index) == ("v1", f"m{index}", index)
        assert bidi.close() == grpc.StatusCode.OK


# --- trailers, statuses, deadlines ------------------------------------------------------------


def test_trailing_metadata_and_status_details_pass_unchanged(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100}))
    servers["v1"].mode = "trailers"
    with RigClient(target(turnout)) as client:
        _, call = client.unary("t")
        trailers = dict(call.trailing_metadata())
        assert trailers["x-rig-version"] == "v1"
        assert trailers["x-rig-bin"] == BINARY_TRAILER
        servers["v1"].mode = "internal"
        with pytest.raises(grpc.RpcError) as failed:
            client.unary("t")
    error: Any = failed.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "v1 fails on purpose: naïve 100%"
    assert dict(error.trailing_metadata())["x-rig-bin"] == BINARY_TRAILER


def test_a_calls_deadline_ends_it_long_before_the_proxys_response_timeout(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    # The proxy would wait 120 s for response headers; the call allows 500 ms. A plain h2
    # client has no timer of its own: only the deadline (honoured by the proxy, or forwarded to
    # the server, which ends the call itself) can end the call before the slow server answers,
    # SLOW_S later. The read deadline only stops a hang.
    turnout = turnout_factory(
        rig_config(
            endpoints_of(servers), {"v1": 100}, timeouts={"response": "120s", "idle": "120s"}
        )
    )
    servers["v1"].mode = "slow"
    answer = h2_request(
        turnout.port,
        grpc_request_headers(target(turnout), "Unary", extra=[("grpc-timeout", "500m")]),
        unary_body("late"),
        read_timeout=DEADLINE,
    )
    assert answer.status == 200
    assert answer.grpc_status() == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    # And through a grpcio stub, as an application sees it.
    with RigClient(target(turnout)) as client, pytest.raises(grpc.RpcError) as failed:
        client.unary("late", timeout=0.5)
    error: Any = failed.value
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_refused_connect_and_no_route_are_grpc_statuses_not_error_pages(
    turnout_factory: TurnoutFactory,
) -> None:
    # An endpoint nobody listens on (every config needs one: an upstream without endpoints is
    # refused at load), and a route only for Unary: ServerStream matches no route.
    refused = f"127.0.0.1:{free_port()}"
    config = rig_config({"v1": [refused]}, {"v1": 100})
    config["routes"][0]["match"] = {"path_prefix": "/turnout.test.Rig/Unary"}
    turnout = turnout_factory(config)
    expected = {"Unary": grpc.StatusCode.UNAVAILABLE, "ServerStream": grpc.StatusCode.UNIMPLEMENTED}
    for method, status in expected.items():
        answer = h2_request(
            turnout.port, grpc_request_headers(target(turnout), method), unary_body("x")
        )
        # Trailers-only: HTTP 200, gRPC's content type, the status and a message; no body.
        assert answer.status == 200, (method, answer)
        assert answer.headers["content-type"].startswith("application/grpc"), answer
        assert answer.grpc_status() == status.value[0], answer
        assert answer.grpc_message(), answer
        assert answer.body == b"", answer
    with RigClient(target(turnout)) as client, pytest.raises(grpc.RpcError) as failed:
        client.unary("x")
    error: Any = failed.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # The proxy's own message, not grpcio's "Received http2 header with status: 502".
    assert error.details()
    assert "http2 header" not in error.details()


def test_a_call_routed_to_an_http1_upstream_is_unavailable_never_downgraded(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    # The same gRPC server, but the upstream says http1: gRPC needs HTTP/2 end to end, so the
    # call is answered by the proxy, naming the upstream, and the server never sees it.
    config = rig_config(endpoints_of(servers), {"v1": 100})
    config["upstreams"]["v1"]["protocol"] = "http1"
    turnout = turnout_factory(config)
    with RigClient(target(turnout)) as client, pytest.raises(grpc.RpcError) as failed:
        client.unary("x")
    error: Any = failed.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "'v1' is reached over HTTP/1.1" in error.details()
    counts = grpc_counts(turnout)
    assert counts.get(("rig", "v1", "UNAVAILABLE")) == 1, counts


# --- choosing the upstream per call -----------------------------------------------------------


def test_a_90_10_split_holds_per_call_on_one_connection(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 90, "v2": 10}))
    seen: Counter[str] = Counter()
    # One grpcio channel: one HTTP/2 connection carrying every call as its own stream.
    with RigClient(target(turnout)) as client:
        for index in range(SPLIT_CALLS):
            reply, _ = client.unary(f"c{index}")
            seen[reply.version] += 1
    lo, hi = binomial_bounds(SPLIT_CALLS, 0.10, SPLIT_TAIL)
    assert seen["v1"] + seen["v2"] == SPLIT_CALLS
    assert lo <= seen["v2"] <= hi, (seen, (lo, hi))
    assert (servers["v1"].calls, servers["v2"].calls) == (seen["v1"], seen["v2"])


def test_a_metadata_override_pins_calls_to_the_canary(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    config = rig_config(
        endpoints_of(servers),
        {"v1": 100, "v2": 0},
        overrides=[{"header": "x-canary", "value": "1", "to": "v2"}],
    )
    turnout = turnout_factory(config)
    with RigClient(target(turnout)) as client:
        pinned = Counter(
            client.unary("p", metadata=[("x-canary", "1")])[0].version for _ in range(20)
        )
        plain = Counter(client.unary("p")[0].version for _ in range(20))
        other = Counter(
            client.unary("p", metadata=[("x-canary", "0")])[0].version for _ in range(20)
        )
    assert pinned == {"v2": 20}
    assert plain == {"v1": 20}
    assert other == {"v1": 20}


# --- rollout and metrics ----------------------------------------------------------------------


class PacedCalls:
    """Unary calls through Turnout at ROLLOUT_RATE per second on one channel, until stopped
    (bounded by MAX_LOAD_S); counts (version or "?", status name)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PacedCalls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        started = time.monotonic()
        sent = 0
        with RigClient(self.address) as client:
            while not self._stop.is_set() and time.monotonic() - started < MAX_LOAD_S:
                # On a schedule: the rate the rollout's figures are tuned for.
                self._stop.wait(max(0.0, started + sent / ROLLOUT_RATE - time.monotonic()))
                sent += 1
                try:
                    reply, _ = client.unary("r", timeout=5)
                    self.seen[(reply.version, "OK")] += 1
                except grpc.RpcError as exc:
                    error: Any = exc
                    self.seen[("?", error.code().name)] += 1


def route_state(turnout: TurnoutProcess) -> dict[str, Any]:
    status, body = admin_call(turnout.admin_url, "GET", "/admin/routes")
    assert status == 200, body
    (route,) = [r for r in body["routes"] if r["name"] == "rig"]
    return dict(route)


@pytest.mark.timeout(120)
def test_a_canary_answering_internal_is_rolled_back(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer], tmp_path: Path
) -> None:
    config = rig_config(
        endpoints_of(servers), {"v1": 100, "v2": 0}, state_file=str(tmp_path / "st.json")
    )
    config["routes"][0]["rollout"] = {
        "baseline": "v1",
        "canary": "v2",
        "steps": [50, 100],
        "interval": "30s",
        "check": "2s",
        "min_requests": 30,
        "max_error_rate": 0.1,
        "max_p99": "2s",
    }
    turnout = turnout_factory(config)
    servers["v2"].mode = "internal"
    with PacedCalls(target(turnout)) as load:
        status, body = admin_call(turnout.admin_url, "POST", "/admin/routes/rig/rollout/start")
        assert status == 200, body
        wait_until(
            lambda: (route_state(turnout)["rollout"] or {}).get("state") == "failed",
            timeout=60,
            what="the rollback of the INTERNAL canary",
        )
        route = route_state(turnout)
        assert route["effective_split"] == {"v1": 100, "v2": 0}
        fail = route["rollout"]["history"][-1]
        assert fail["verdict"] == "fail", fail
        assert fail["canary"]["errors"] == fail["canary"]["requests"] > 0, fail
    # After the rollback no new call reaches the canary. Counted once the paced load stopped:
    # a call of it routed just before the rollback may still have been on its way to v2.
    reached = servers["v2"].calls
    with RigClient(target(turnout)) as client:
        after = Counter(client.unary("after")[0].version for _ in range(50))
    assert after == {"v1": 50}
    assert servers["v2"].calls == reached
    assert load.seen[("?", "INTERNAL")] > 0, load.seen
    assert load.seen[("v1", "OK")] > 0, load.seen


def test_grpc_responses_are_counted_by_status_name(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100}))
    with RigClient(target(turnout)) as client:
        for _ in range(7):
            client.unary("ok")
        servers["v1"].mode = "internal"
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                client.unary("bad")
    wanted = {("rig", "v1", "OK"): 7.0, ("rig", "v1", "INTERNAL"): 3.0}
    wait_until(
        lambda: all(grpc_counts(turnout).get(key) == value for key, value in wanted.items()),
        timeout=DEADLINE,
        what=f"turnout_grpc_responses_total {wanted}",
    )


# --- reload and TLS ---------------------------------------------------------------------------


def test_an_open_bidi_stream_outlives_a_reload(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer]
) -> None:
    turnout = turnout_factory(rig_config(endpoints_of(servers), {"v1": 100, "v2": 0}))
    with RigClient(target(turnout)) as client:
        bidi = client.bidi(timeout=60)
        assert bidi.exchange("before").version == "v1"
        # Flip the route to v2; v1 stays in the config (its connections are not drained).
        flipped = dict(turnout.config, routes=[{"name": "rig", "split": {"v1": 0, "v2": 100}}])
        # Atomically: the file watch may read it too, and must never see half a file.
        staged = turnout.config_path.with_name("next.yaml")
        staged.write_text(yaml.safe_dump(flipped, sort_keys=False))
        os.replace(staged, turnout.config_path)
        status, body = admin_call(turnout.admin_url, "POST", "/admin/reload")
        assert status == 200, body
        wait_generation(turnout.admin_url, 2, timeout=DEADLINE)
        # New calls follow the new table; the open stream stays where it began and goes on.
        assert client.unary("new")[0].version == "v2"
        for index in range(1, 6):
            reply = bidi.exchange(f"after{index}")
            assert (reply.version, reply.text, reply.index) == ("v1", f"after{index}", index)
        assert bidi.close() == grpc.StatusCode.OK


def test_tls_listener_speaks_h2_by_alpn_to_a_secure_channel(
    turnout_factory: TurnoutFactory, servers: dict[str, RigServer], tmp_path: Path
) -> None:
    ca = trustme.CA()
    pair = write_pair(ca, tmp_path, "grpc", "grpc.test")
    secure = free_port()
    config = rig_config(endpoints_of(servers), {"v1": 100})
    config["listen"] = [
        {"address": f"127.0.0.1:{free_port()}"},
        {"address": f"127.0.0.1:{secure}", "tls": {"certificates": [pair.config()]}},
    ]
    turnout = turnout_factory(config)
    root = ca.cert_pem.bytes()
    with RigClient(f"127.0.0.1:{secure}", root_pem=root, server_name="grpc.test") as client:
        reply, _ = client.unary("secure")
        streamed = client.server_stream("s", 5)
    assert reply.version == "v1"
    assert [r.index for r in streamed] == list(range(5))
    assert servers["v1"].last_metadata["x-forwarded-proto"] == "https"
    # The same listener chosen as h2 by ALPN by a plain HTTP/2 client.
    context = ssl.create_default_context()
    ca.configure_trust(context)
    answer = h2_request(
        secure,
        grpc_request_headers("grpc.test", "Unary", scheme="https"),
        unary_body("alpn"),
        tls=context,
        server_name="grpc.test",
    )
    assert (answer.status, answer.grpc_status()) == (200, 0), answer
    assert turnout.proc.poll() is None


def test_the_benchmarks_hand_made_grpc_messages_are_the_protos() -> None:
    # benchmarks/h2lib.py encodes its request and the backend's reply by hand (it must not need
    # the test tree); they must be what the .proto says.
    pb2 = protos().pb2
    assert pb2.EchoRequest.FromString(h2lib.REQUEST_MESSAGE) == pb2.EchoRequest(text="bench")
    reply = pb2.EchoReply(version="backend", text="bench")
    assert pb2.EchoReply.FromString(h2lib.REPLY_MESSAGE) == reply
    assert h2lib.grpc_frame(h2lib.REQUEST_MESSAGE) == unary_body("bench")
