"""An upstream that breaks HTTP on purpose hurts only its own requests.

Endless response heads (many lines, or one endless value), too many header fields, a head sent
a line at a time, and a 101 nobody asked for: each answered with a 502 (or 504) JSON error,
counted as an upstream error of that version, and cut short on the upstream side so the worker
never buffers more than one head's worth.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request, get
from tests.support.scripted import Connection, ScriptedUpstream
from tests.support.upstreams import EchoUpstream

# What a script may send at most; an endless head that Turnout did not cut would reach it.
CAP = 64 * 1024 * 1024
# Well above one head (64 KiB) plus one read and the loopback socket buffers.
CUT_BELOW = 16 * 1024 * 1024


def endless_lines(conn: Connection) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\n")
    conn.stream((b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in itertools.count()), CAP)


def endless_value(conn: Connection) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\nX-Big: ")
    conn.stream(itertools.repeat(b"a" * 65536), CAP)


def many_fields(conn: Connection) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\n" + b"X-Field: 1\r\n" * 150 + b"Content-Length: 2\r\n\r\nok")
    conn.sock.recv(1)  # hold the connection until Turnout closes it


def slow_head(conn: Connection) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\n")
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline and conn.send(b"X-Drip: 1\r\n"):
        time.sleep(0.05)


def unsolicited_101(conn: Connection) -> None:
    conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"TUNNELLED-BYTES"
    )
    conn.sock.recv(1)


@dataclass
class Hostile:
    lines: ScriptedUpstream
    value: ScriptedUpstream
    fields: ScriptedUpstream
    slow: ScriptedUpstream
    switch: ScriptedUpstream


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    started = Hostile(
        lines=ScriptedUpstream(endless_lines),
        value=ScriptedUpstream(endless_value),
        fields=ScriptedUpstream(many_fields),
        slow=ScriptedUpstream(slow_head),
        switch=ScriptedUpstream(unsolicited_101),
    )
    yield started
    for upstream in vars(started).values():
        upstream.close()


@pytest.fixture(scope="module")
def turnout(hostile: Hostile, blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    names = list(vars(hostile))
    config: dict[str, Any] = {
        "timeouts": {"response": "1s"},
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            **{name: {"endpoints": [getattr(hostile, name).address]} for name in names},
        },
        "routes": [
            *(
                {"name": name, "match": {"path_prefix": f"/{name}"}, "split": {name: 100}}
                for name in names
            ),
            {"name": "good", "split": {"blue": 100}},
        ],
    }
    with start_inprocess(config) as process:
        yield process


def protocol_errors(turnout: InProcessTurnout, route: str) -> float:
    text = turnout.metrics_text()
    for line in text.splitlines():
        if (
            line.startswith("turnout_upstream_errors_total{")
            and 'kind="protocol"' in line
            and f'route="{route}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("name", ["lines", "value"])
def test_endless_response_head_is_cut_with_502(
    turnout: InProcessTurnout, hostile: Hostile, name: str
) -> None:
    upstream: ScriptedUpstream = getattr(hostile, name)
    before = protocol_errors(turnout, name)
    response = get(turnout.port, f"/{name}")
    assert response.status == 502
    assert "larger than limits.max_header_size" in response.json()["error"]
    conn = upstream.connections[-1]
    wait_until(lambda: conn.cut, timeout=10, what="Turnout to hang up on the endless head")
    assert conn.sent < CUT_BELOW
    assert protocol_errors(turnout, name) == before + 1
    # The worker is fine: the next request elsewhere is answered.
    assert get(turnout.port, "/anything").status == 200


def test_too_many_response_fields_is_502(turnout: InProcessTurnout) -> None:
    response = get(turnout.port, "/fields")
    assert response.status == 502
    assert "too many response header fields" in response.json()["error"]


def test_response_timeout_covers_a_head_sent_line_by_line(
    turnout: InProcessTurnout, hostile: Hostile
) -> None:
    response = get(turnout.port, "/slow")
    assert response.status == 504
    conn = hostile.slow.connections[-1]
    wait_until(lambda: conn.cut, timeout=10, what="Turnout to drop the dripping upstream")


def test_unsolicited_101_is_502_and_no_tunnel(turnout: InProcessTurnout) -> None:
    with RawConnection(turnout.port) as conn:
        conn.send(build_request("GET", "/switch"))
        _, response = conn.read_final_response("GET")
        assert response.status == 502
        assert "unsolicited 101" in response.json()["error"]
        conn.wait_closed(5.0)
        assert b"TUNNELLED-BYTES" not in conn.buffered
    assert protocol_errors(turnout, "switch") >= 1
