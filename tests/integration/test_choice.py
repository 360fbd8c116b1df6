"""Choosing the upstream (contract section 2) through a real Turnout: split, overrides, sticky.

The echo upstreams answer with their name, so every response says who served it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import rawhttp
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import Headers, RawConnection, RawResponse
from tests.support.turnout import TurnoutFactory
from tests.support.upstreams import EchoUpstream


def upstreams(blue: EchoUpstream, green: EchoUpstream) -> dict[str, Any]:
    return {
        "blue": {"endpoints": [blue.address]},
        "green": {"endpoints": [green.address]},
    }


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream, green: EchoUpstream) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        "upstreams": upstreams(blue, green),
        "routes": [
            {"name": "all", "match": {"path_prefix": "/all"}, "split": {"blue": 100, "green": 0}},
            {"name": "half", "match": {"path_prefix": "/half"}, "split": {"blue": 50, "green": 50}},
            {
                "name": "ovr",
                "match": {"path_prefix": "/ovr"},
                "split": {"blue": 100, "green": 0},
                "overrides": [
                    {"header": "x-canary", "value": "true", "to": "green"},
                    {"cookie": "release", "value": "canary", "to": "green"},
                    {"header": "X-Beta", "to": "green"},
                ],
            },
            {
                "name": "stickyh",
                "match": {"path_prefix": "/stickyh"},
                "split": {"blue": 50, "green": 50},
                "sticky": {"header": "x-user-id"},
            },
            {
                "name": "stickyc",
                "match": {"path_prefix": "/stickyc"},
                "split": {"blue": 50, "green": 50},
                "sticky": {"cookie": "sid", "set": True},
            },
        ],
    }
    with start_inprocess(config) as process:
        yield process


def served_by(response: RawResponse) -> str:
    assert response.status == 200, response
    name = response.json()["upstream"]
    assert isinstance(name, str)
    return name


def tally(
    turnout: InProcessTurnout, path: str, count: int, headers: Headers | None = None
) -> Counter[str]:
    with RawConnection(turnout.port) as conn:
        return Counter(served_by(conn.request("GET", path, headers)) for _ in range(count))


def test_split_100_0_sends_everything_to_one_upstream(turnout: InProcessTurnout) -> None:
    assert tally(turnout, "/all/x", 100) == Counter({"blue": 100})


def test_split_50_50_is_roughly_even(turnout: InProcessTurnout) -> None:
    counts = tally(turnout, "/half/x", 400)
    assert set(counts) == {"blue", "green"}
    # Binomial(400, 0.5): 140..260 is more than 12 standard deviations wide.
    assert 140 <= counts["blue"] <= 260, counts


def test_override_by_header_value(turnout: InProcessTurnout) -> None:
    assert tally(turnout, "/ovr/h", 20, [("X-Canary", "true")]) == Counter({"green": 20})
    assert tally(turnout, "/ovr/h", 20, [("x-canary", "false")]) == Counter({"blue": 20})


def test_override_by_header_presence(turnout: InProcessTurnout) -> None:
    assert tally(turnout, "/ovr/p", 10, [("x-beta", "")]) == Counter({"green": 10})
    assert tally(turnout, "/ovr/p", 10, [("X-BETA", "anything")]) == Counter({"green": 10})


def test_override_by_cookie(turnout: InProcessTurnout) -> None:
    cookie = [("Cookie", "theme=dark; release=canary; lang=en")]
    assert tally(turnout, "/ovr/c", 20, cookie) == Counter({"green": 20})
    other = [("Cookie", "release=stable")]
    assert tally(turnout, "/ovr/c", 20, other) == Counter({"blue": 20})


def test_sticky_header_same_key_same_upstream(turnout: InProcessTurnout) -> None:
    first: dict[str, str] = {}
    with RawConnection(turnout.port) as conn:
        for round_ in range(2):
            for key in range(200):
                headers = [("X-User-Id", f"user-{key}")]
                name = served_by(conn.request("GET", f"/stickyh/{round_}", headers))
                assert first.setdefault(f"user-{key}", name) == name, f"user-{key} moved"
    # 200 keys over a 50/50 split: both upstreams get some (else the key is being ignored).
    shares = Counter(first.values())
    assert set(shares) == {"blue", "green"}, shares


def sid_cookie(response: RawResponse) -> str | None:
    for value in response.header_values("set-cookie"):
        name, _, rest = value.partition("=")
        if name.strip() == "sid":
            return rest.split(";", 1)[0].strip()
    return None


def test_sticky_cookie_is_minted_once_and_honoured(turnout: InProcessTurnout) -> None:
    seen: Counter[str] = Counter()
    for client in range(20):
        first = rawhttp.get(turnout.port, f"/stickyc/{client}")
        minted = sid_cookie(first)
        assert minted, f"no sid Set-Cookie on a cookie-less request: {first.headers}"
        upstream = served_by(first)
        seen[upstream] += 1
        with RawConnection(turnout.port) as conn:
            for again in range(5):
                headers = [("Cookie", f"a=b; sid={minted}; c=d")]
                response = conn.request("GET", f"/stickyc/{client}/{again}", headers)
                assert served_by(response) == upstream, "the minted id did not keep the client"
                assert sid_cookie(response) is None, "the cookie was minted again"
    assert set(seen) == {"blue", "green"}, seen


def test_sticky_key_is_the_same_in_every_worker(
    blue: EchoUpstream, green: EchoUpstream, turnout_factory: TurnoutFactory
) -> None:
    config: dict[str, Any] = {
        "workers": 2,
        "upstreams": upstreams(blue, green),
        "routes": [
            {
                "name": "sticky",
                "split": {"blue": 50, "green": 50},
                "sticky": {"header": "x-user-id"},
            }
        ],
    }
    turnout = turnout_factory(config)
    before = {pid: read_syscalls(pid) for pid in turnout.pids()}
    first: dict[str, str] = {}
    for attempt in range(5):
        for key in range(40):
            # A fresh connection each time: SO_REUSEPORT spreads them over the workers.
            response = rawhttp.get(turnout.port, f"/k/{attempt}", [("X-User-Id", f"k{key}")])
            name = served_by(response)
            assert first.setdefault(f"k{key}", name) == name, f"k{key} moved between requests"
    assert set(first.values()) == {"blue", "green"}
    busy = [pid for pid, count in before.items() if read_syscalls(pid) - count >= 50]
    assert len(busy) >= 2, f"only {busy} of {sorted(before)} served the 200 connections"


def read_syscalls(pid: int) -> int:
    """Read syscalls made by `pid` so far (/proc/PID/io), 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as io:
            for line in io:
                if line.startswith("syscr:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
