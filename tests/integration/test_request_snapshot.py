"""A request keeps the generation it began with, whatever a reload does meanwhile (issue #10).

Contract: a reload swaps the worker's compiled table by one reference and each request takes
that reference once, when it begins. Its head rules, its route, its Via name and every limit and
timeout it meets come from that one generation, even when it runs (or waits, pipelined behind a
slow request) across a reload; only the requests that begin after the reload see the new one.

Every test runs one worker's data plane in-process (tests.support.inprocess) and hands it the
next table while a request is in flight, as the supervisor's `table` message does after a
reload; the worker has applied it when `reload` returns (the file -> `POST /admin/reload` ->
worker path is tested end to end in tests/system). A `held` upstream answers only when the
test lets it, so "while a request is in flight" never depends on timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.scripted import Connection, ScriptedUpstream
from tests.support.upstreams import EchoUpstream

DEADLINE = 15.0


class HeldUpstream:
    """Answers each request (200, its own head as the body) only once `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.server = ScriptedUpstream(self._answer)

    @property
    def address(self) -> str:
        return self.server.address

    def _answer(self, conn: Connection) -> None:
        if not self.release.wait(DEADLINE):
            return
        conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (len(conn.head), conn.head)
        )

    def wait_for_requests(self, count: int) -> None:
        wait_until(
            lambda: len(self.server.heads) >= count,
            timeout=DEADLINE,
            what=f"{count} request(s) at the held upstream",
        )

    def close(self) -> None:
        self.release.set()
        self.server.close()


class Reloadable:
    """A running data plane the test reloads with new configs."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.proc: InProcessTurnout = start_inprocess(config)
        self.generation = 1

    @property
    def port(self) -> int:
        return self.proc.port

    def reload(self, config: dict[str, Any]) -> None:
        """Put `config` in force; return once the worker applied it."""
        self.generation += 1
        assert self.proc.reload(config) == self.generation


@pytest.fixture
def held() -> Iterator[HeldUpstream]:
    upstream = HeldUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def start() -> Iterator[Any]:
    """`start(config) -> Reloadable`; every data plane started is closed at teardown."""
    started: list[Reloadable] = []

    def factory(config: dict[str, Any]) -> Reloadable:
        started.append(Reloadable(config))
        return started[-1]

    yield factory
    for turnout in started:
        turnout.proc.close()


def config_with(
    held: HeldUpstream,
    blue: EchoUpstream,
    green: EchoUpstream,
    all_route: dict[str, Any],
    **top: Any,
) -> dict[str, Any]:
    """`/held/...` goes to the held upstream; every other request to the route `all_route`."""
    return {
        **top,
        "upstreams": {
            "held": {"endpoints": [held.address]},
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [
            {"name": "held", "match": {"path_prefix": "/held"}, "split": {"held": 1}},
            {"name": "all", **all_route},
        ],
    }


def header(headers: list[list[str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


# -- a pipelined request waiting behind a slow one across a reload ---------------------------


def test_pipelined_request_is_routed_by_the_generation_it_began_in(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    turnout = start(config_with(held, blue, green, {"split": {"blue": 1}}))
    with RawConnection(turnout.port, deadline=DEADLINE) as conn:
        # One write: the second head is parsed (under generation 1) while the first request is
        # held at its upstream, and waits its turn.
        conn.send(build_request("GET", "/held/first") + build_request("GET", "/second"))
        held.wait_for_requests(1)
        turnout.reload(config_with(held, blue, green, {"split": {"green": 1}}))
        held.release.set()
        assert conn.read_final_response()[1].status == 200
        second = conn.read_final_response()[1]
        assert second.status == 200
        assert (second.header("x-upstream"), second.json()["path"]) == ("blue", "/second")
        # A request that begins after the reload gets the new table.
        assert conn.request("GET", "/third").header("x-upstream") == "green"


def test_pipelined_request_is_filtered_and_routed_by_one_generation(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    # Both generations send this request to green, each by its own header: the head must not
    # be read for generation 1's headers and then routed by generation 2's rules (which would
    # find none of the headers it reads, and fall back to the split: blue).
    first = {"overrides": [{"header": "x-canary", "value": "yes", "to": "green"}]}
    second = {"overrides": [{"header": "x-beta", "value": "yes", "to": "green"}]}
    turnout = start(config_with(held, blue, green, {**first, "split": {"blue": 1}}))
    request = build_request("GET", "/both", [("X-Canary", "yes"), ("X-Beta", "yes")])
    with RawConnection(turnout.port, deadline=DEADLINE) as conn:
        conn.send(build_request("GET", "/held/first") + request)
        held.wait_for_requests(1)
        turnout.reload(config_with(held, blue, green, {**second, "split": {"blue": 1}}))
        held.release.set()
        assert conn.read_final_response()[1].status == 200
        answer = conn.read_final_response()[1]
        assert answer.status == 200
        assert answer.header("x-upstream") == "green"
        # Generation 2's rule is in force for a request that begins now.
        assert conn.request("GET", "/beta", [("X-Beta", "yes")]).header("x-upstream") == "green"


def test_via_name_is_the_one_of_the_generation_the_request_began_in(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    route = {"split": {"blue": 1}}
    turnout = start(config_with(held, blue, green, route, via="snap-one"))
    with RawConnection(turnout.port, deadline=DEADLINE) as conn:
        conn.send(build_request("GET", "/held/first") + build_request("GET", "/second"))
        held.wait_for_requests(1)
        turnout.reload(config_with(held, blue, green, route, via="snap-two"))
        held.release.set()
        first = conn.read_final_response()[1]
        second = conn.read_final_response()[1]
        after = conn.request("GET", "/after")
    assert b"\r\nVia: 1.1 snap-one\r\n" in held.server.heads[0]
    # The response of a request in flight across the reload...
    assert first.header_values("via") == ["1.1 snap-one"]
    # ... and a pipelined request begun before it, both ways.
    assert header(second.json()["headers"], "via") == ["1.1 snap-one"]
    assert second.header_values("via") == ["1.1 snap-one"]
    assert header(after.json()["headers"], "via") == ["1.1 snap-two"]
    assert after.header_values("via") == ["1.1 snap-two"]


def test_pipelined_request_keeps_the_response_timeout_it_began_with(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    route = {"split": {"blue": 1}}
    turnout = start(config_with(held, blue, green, route, timeouts={"response": "10s"}))
    with RawConnection(turnout.port, deadline=DEADLINE) as conn:
        conn.send(build_request("GET", "/held/first") + build_request("GET", "/slow?ms=1500"))
        held.wait_for_requests(1)
        turnout.reload(config_with(held, blue, green, route, timeouts={"response": "300ms"}))
        held.release.set()
        assert conn.read_final_response()[1].status == 200
        slow = conn.read_final_response()[1]
        assert slow.status == 200, slow.body
        assert slow.json()["path"] == "/slow?ms=1500"
        # The new timeout is in force for a request that begins now.
        assert conn.request("GET", "/slow?ms=1500").status == 504


# -- one request whose body is still streaming across a reload -------------------------------


def start_upload(turnout: Reloadable, blue: EchoUpstream, body: bytes, sent: int) -> RawConnection:
    """A POST of `body` with only its head and `sent` bytes sent, once blue has the head."""
    before = blue.requests
    conn = RawConnection(turnout.port, deadline=DEADLINE)
    conn.send(build_request("POST", "/upload", body=body)[: -len(body) + sent])
    wait_until(lambda: blue.requests > before, timeout=DEADLINE, what="the upload at blue")
    return conn


def test_request_body_limit_is_the_one_in_force_when_the_request_began(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    route = {"split": {"blue": 1}}
    turnout = start(config_with(held, blue, green, route, limits={"max_request_body": "1MiB"}))
    body = b"b" * (256 * 1024)
    with start_upload(turnout, blue, body, 16 * 1024) as conn:
        turnout.reload(config_with(held, blue, green, route, limits={"max_request_body": "64KiB"}))
        conn.send(body[16 * 1024 :])
        answer = conn.read_final_response("POST")[1]
        assert answer.status == 200, answer.body
        assert answer.json()["body_len"] == len(body)
        # A request that begins now meets the new limit (refused on its Content-Length).
        conn.send(build_request("POST", "/upload", [("Content-Length", str(len(body)))]))
        assert conn.read_final_response("POST")[1].status == 413


def test_idle_timeout_is_the_one_in_force_when_the_request_began(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    route = {"split": {"blue": 1}}
    turnout = start(config_with(held, blue, green, route, timeouts={"idle": "10s"}))
    body = b"i" * 1000
    with start_upload(turnout, blue, body, 500) as conn:
        turnout.reload(config_with(held, blue, green, route, timeouts={"idle": "300ms"}))
        # Longer than the new idle timeout (checked every 0.1 s), well within the old one.
        time.sleep(1.2)
        conn.send(body[500:])
        answer = conn.read_final_response("POST")[1]
        assert answer.status == 200, answer.body
        assert answer.json()["body_len"] == len(body)


def test_response_timeout_after_a_body_streamed_across_a_reload_is_the_old_one(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    # The response timeout starts when the whole request is out: here, after the reload.
    route = {"split": {"blue": 1}}
    turnout = start(config_with(held, blue, green, route, timeouts={"response": "10s"}))
    body = b"r" * 1000
    before = blue.requests
    with RawConnection(turnout.port, deadline=DEADLINE) as conn:
        conn.send(build_request("POST", "/slow?ms=1500", body=body)[:-500])
        wait_until(lambda: blue.requests > before, timeout=DEADLINE, what="the POST at blue")
        turnout.reload(config_with(held, blue, green, route, timeouts={"response": "300ms"}))
        conn.send(body[500:])
        answer = conn.read_final_response("POST")[1]
        assert answer.status == 200, answer.body
        assert answer.json()["body_len"] == len(body)


# -- a head that arrives in pieces across a reload -------------------------------------------


def test_head_split_across_a_reload_is_bounded_by_the_limits_it_began_with(
    start: Any, held: HeldUpstream, blue: EchoUpstream, green: EchoUpstream
) -> None:
    route = {"split": {"blue": 1}}
    turnout = start(config_with(held, blue, green, route, limits={"max_headers": 50}))
    extra = [(f"X-Extra-{i}", "x") for i in range(10)]
    request = build_request("GET", "/many", extra)
    cut = request.index(b"X-Extra-5")
    with RawConnection(turnout.port, deadline=DEADLINE) as conn:
        conn.send(request[:cut])
        # The worker reads the first half at once; the reload takes longer than that anyway.
        time.sleep(0.2)
        turnout.reload(config_with(held, blue, green, route, limits={"max_headers": 4}))
        conn.send(request[cut:])
        answer = conn.read_final_response()[1]
        assert answer.status == 200, answer.body
        assert len([h for h in answer.json()["headers"] if h[0].startswith("X-Extra-")]) == 10
        # A head that begins now meets the new limit.
        assert conn.request("GET", "/many", extra).status == 431
