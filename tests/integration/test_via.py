"""Via (RFC 9110 section 7.6.3): added both ways, and a request that comes back is a loop.

An upstream endpoint that is Turnout itself must cost two hops and a 508, not every file
descriptor of the worker.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.core.config import ConfigError, parse_config
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import get
from tests.support.turnout import free_port
from tests.support.upstreams import EchoUpstream

VIA = re.compile(r"1\.1 turnout-[0-9a-f]{12}\Z")


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    port = free_port()
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "itself": {"endpoints": [f"127.0.0.1:{port}"]},
        },
        "routes": [
            {"name": "loop", "match": {"path_prefix": "/loop"}, "split": {"itself": 100}},
            {"name": "all", "split": {"blue": 100}},
        ],
    }
    with start_inprocess(config, access_log=True) as process:
        yield process


def test_via_is_added_to_request_and_response(turnout: InProcessTurnout) -> None:
    response = get(turnout.port, "/x", [("Via", "1.0 fred, 1.1 p.example.net")])
    assert response.status == 200
    seen = [value for name, value in response.json()["headers"] if name.lower() == "via"]
    assert seen[0] == "1.0 fred, 1.1 p.example.net"
    assert VIA.match(seen[-1])
    assert VIA.match(response.header("via") or "")


def test_a_request_looping_back_is_refused_with_508(turnout: InProcessTurnout) -> None:
    response = get(turnout.port, "/loop/x", [("X-Request-Id", "loop-1")])
    assert response.status == 508
    assert "loop" in response.json()["error"]
    turnout.wait_for_log({"loop-1"})
    # Two hops: the request as sent, and the same request come back (refused).
    entries = [e for e in turnout.access_log() if e.get("request_id") == "loop-1"]
    assert sorted(e["status"] for e in entries) == [508, 508]
    metrics = turnout.metrics_text()
    assert re.search(r'turnout_requests_total\{code="508",route="",upstream=""\} 1\.0', metrics)


def test_a_configured_pseudonym_is_used(blue: EchoUpstream) -> None:
    config: dict[str, Any] = {
        "via": "edge-1",
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    with start_inprocess(config) as turnout:
        response = get(turnout.port, "/x")
        assert response.header("via") == "1.1 edge-1"
        assert get(turnout.port, "/x", [("Via", "1.1 other, 1.1 edge-1")]).status == 508


def test_a_bad_pseudonym_is_a_located_error() -> None:
    text = "via: 'two words'\nupstreams: {b: {endpoints: ['127.0.0.1:1']}}\n"
    text += "routes: [{name: r, split: {b: 1}}]\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml")
    assert str(caught.value.issues[0]).startswith("t.yaml:1:6: via: bad pseudonym")
