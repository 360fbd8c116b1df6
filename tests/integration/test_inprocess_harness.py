"""The in-process data plane the integration tests use (tests.support.inprocess) starts on a
port of its own, reloads as a worker does, and leaves nothing behind when it is closed."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.support.inprocess import start_inprocess
from tests.support.rawhttp import RawConnection, get
from tests.support.upstreams import EchoUpstream


def config_for(upstream: str, blue: EchoUpstream, green: EchoUpstream) -> dict[str, Any]:
    return {
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [{"name": "all", "split": {upstream: 100}}],
    }


def test_a_reload_applies_the_next_generation_to_the_next_request(
    blue: EchoUpstream, green: EchoUpstream
) -> None:
    with start_inprocess(config_for("blue", blue, green)) as turnout:
        with RawConnection(turnout.port) as conn:
            assert conn.request("GET", "/a").header("x-upstream") == "blue"
            assert turnout.reload(config_for("green", blue, green)) == 2
            # The same keep-alive connection: the next request takes the new table.
            assert conn.request("GET", "/b").header("x-upstream") == "green"
        assert turnout.stats()["generation"] == 2


def test_closing_leaves_no_thread_listener_or_loop(blue: EchoUpstream, green: EchoUpstream) -> None:
    before = set(threading.enumerate())
    turnout = start_inprocess(config_for("blue", blue, green))
    idle = RawConnection(turnout.port)
    with turnout:
        assert get(turnout.port, "/x").status == 200
        assert idle.request("GET", "/y").status == 200
    # An open keep-alive client did not hold the close up, and was cut.
    assert idle.wait_closed(2.0)
    idle.close()
    assert set(threading.enumerate()) <= before
    assert turnout.loop.is_closed()
    with pytest.raises(ConnectionRefusedError):
        get(turnout.port, "/after")
