"""Zero downtime, measured: reloads under steady load fail no request and route by the right table.

Fifty keep-alive clients send GETs (each resting 2 ms between two; thousands per second in all)
while the routing table changes under them: twenty blue/green flips (half by `POST /admin/reload`,
half seen by the file watch), one reload that removes an endpoint from a hot upstream, and five
SIGHUP flips; with one worker and with two. Afterwards every request is checked:

- it succeeded: a complete 2xx, no connection error, no reconnect (keep-alive survives reloads);
- the upstream that answered was allowed by a table that could have served it. Each generation
  has a window: it may be in force from just before its trigger (the write, the POST, the
  signal) until every worker has reported the next generation (`GET /admin/config`). A request
  may be served by any generation whose window overlaps the request's own [start, end]: it
  finishes on the table it started with, which may be the old one;
- every generation served requests that fell wholly inside it, so the check is not vacuous.

The fake upstreams answer with `X-Upstream: <endpoint label>` (`blue-a`, `blue-b`, `green`), so a
response names the endpoint, not only the upstream: after the removal, `blue-b` must not answer.

Then an endpoint that dies under load (its process SIGKILLed with ~25 requests on it) must fail
no GET either: requests in flight on it are retried on the other endpoint, connect failures are
retried, and the endpoint is ejected. An endpoint that comes straight back (a restart) must be
ejected once and serve again when that ejection ends.
"""

from __future__ import annotations

import math
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.dataplane.pools import EJECT_BASE
from tests.support import wait_until
from tests.support.load import (
    BackgroundLoad,
    ConfigLayout,
    Load,
    Outcome,
    admin_call,
    describe,
    failures,
    wait_generation,
)
from tests.support.turnout import (
    PROJECT_ROOT,
    TurnoutProcess,
    free_port,
    launch,
    start_turnout,
)
from tests.support.upstreams import RawUpstream, UpstreamHost

CLIENTS = 50
# Each client's rest between requests: keeps ~50 requests in flight without saturating a
# shared 2-core machine for the whole run.
PAUSE = 0.002
FLIPS = 20
SIGHUPS = 5
# Requests that must start after a generation is in force everywhere and end before the next
# reload begins: proof that each generation really served, and what it served.
PER_GENERATION = 40
# Bounds a hang only; the 2 s promise of the file watch is checked in test_supervisor.
RELOAD_DEADLINE = 15.0


@pytest.fixture(scope="module")
def upstreams(
    upstream_host: UpstreamHost,
) -> Iterator[tuple[RawUpstream, RawUpstream, RawUpstream]]:
    """blue-a and blue-b (the two endpoints of `blue`) and green, each naming itself."""
    started = (
        upstream_host.raw("blue-a", "ok"),
        upstream_host.raw("blue-b", "ok"),
        upstream_host.raw("green", "ok"),
    )
    yield started
    for upstream in started:
        upstream_host.stop(upstream)


# --- the config file and its generations -----------------------------------------------------


@dataclass
class Window:
    """When generation `generation` may have served requests, and which endpoints it allows."""

    generation: int
    allowed: frozenset[str]
    start: float  # just before its trigger: no worker can have it earlier
    confirmed: float  # every worker reported it
    end: float = math.inf  # every worker reported the next one: no request starts on it later
    next_start: float = math.inf  # the next generation's trigger


def serving(windows: list[Window], outcome: Outcome) -> list[Window]:
    """The generations that may have served `outcome` (their window overlaps the request)."""
    return [w for w in windows if w.start <= outcome.finished and outcome.started <= w.end]


def misrouted(outcomes: list[Outcome], windows: list[Window]) -> list[str]:
    """Requests answered by an endpoint that no generation in force during them allowed."""
    wrong = []
    for outcome in outcomes:
        candidates = serving(windows, outcome)
        if not any(outcome.upstream in w.allowed for w in candidates):
            wrong.append(
                f"{outcome} could only be served by generations "
                f"{[(w.generation, sorted(w.allowed)) for w in candidates]}"
            )
    return wrong


def inside(outcomes: list[Outcome], window: Window) -> list[Outcome]:
    """Requests that started after `window` was in force everywhere and ended before the next."""
    return [o for o in outcomes if o.started > window.confirmed and o.finished < window.next_start]


def started_after(load: BackgroundLoad, mark: float) -> int:
    """Finished requests that started after `mark` (outcomes are appended in finishing order)."""
    count = 0
    for outcome in reversed(load.load.outcomes):
        if outcome.finished <= mark:
            break
        if outcome.started > mark:
            count += 1
    return count


def wait_served(load: BackgroundLoad, mark: float, count: int) -> None:
    wait_until(
        lambda: started_after(load, mark) >= count,
        timeout=RELOAD_DEADLINE,
        what=f"{count} requests started after the generation was in force",
    )


def routing_table(
    listen: str, admin: str, workers: int, colour: str, blue: list[RawUpstream], green: RawUpstream
) -> dict[str, Any]:
    split = {"blue": 100, "green": 0} if colour == "blue" else {"blue": 0, "green": 100}
    return {
        "listen": listen,
        "admin": admin,
        "workers": workers,
        "drain": {"reload": "5s", "shutdown": "5s"},
        "upstreams": {
            "blue": {"endpoints": [upstream.address for upstream in blue]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [{"name": "all", "split": split, "retries": 2}],
    }


def allowed(colour: str, blue: list[RawUpstream], green: RawUpstream) -> frozenset[str]:
    if colour == "blue":
        return frozenset(upstream.name for upstream in blue)
    return frozenset({green.name})


def reload_lines(proc: TurnoutProcess, trigger: str) -> int:
    """How many reloads by `trigger` made a new generation, from the supervisor's log."""
    return len(re.findall(rf"reload \({trigger}\): generation \d+ in force", proc.stderr_text()))


# --- reloads under load ----------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_under_load_fail_no_request_and_route_by_the_table_in_force(
    tmp_path: Path, upstreams: tuple[RawUpstream, RawUpstream, RawUpstream], workers: int
) -> None:
    blue_a, blue_b, green = upstreams
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    both = [blue_a, blue_b]
    first = routing_table(listen, admin, workers, "blue", both, green)
    layout = ConfigLayout(tmp_path, yaml.safe_dump(first, sort_keys=False))
    before_b = len(blue_b.requests)

    windows = [Window(1, allowed("blue", both, green), -math.inf, -math.inf)]

    with launch(first, layout.link) as proc:
        load = BackgroundLoad(Load(proc.port, clients=CLIENTS, path="/zero-downtime", pause=PAUSE))
        with load:
            wait_served(load, time.monotonic(), PER_GENERATION)

            def reload(colour: str, blue: list[RawUpstream], trigger: str) -> None:
                text = yaml.safe_dump(
                    routing_table(listen, admin, workers, colour, blue, green), sort_keys=False
                )
                generation = windows[-1].generation + 1
                start = time.monotonic()
                if trigger == "watch":
                    layout.write_watched(text)
                else:
                    layout.write_unwatched(text)
                    if trigger == "admin":
                        status, body = admin_call(proc.admin_url, "POST", "/admin/reload")
                        assert (status, body) == (
                            200,
                            {"generation": generation, "changed": True},
                        )
                    else:
                        proc.proc.send_signal(signal.SIGHUP)
                confirmed = wait_generation(proc.admin_url, generation, timeout=RELOAD_DEADLINE)
                windows[-1].end = confirmed
                windows[-1].next_start = start
                windows.append(Window(generation, allowed(colour, blue, green), start, confirmed))
                wait_served(load, confirmed, PER_GENERATION)

            colour = "blue"
            for flip in range(FLIPS):
                colour = "green" if colour == "blue" else "blue"
                reload(colour, both, "admin" if flip % 2 == 0 else "watch")
            # An even number of flips: blue, with both endpoints busy, loses blue-b.
            assert colour == "blue"
            reload("blue", [blue_a], "admin")
            for _ in range(SIGHUPS):
                colour = "green" if colour == "blue" else "blue"
                reload(colour, [blue_a], "SIGHUP")
            outcomes = load.stop()

        assert reload_lines(proc, "admin") == FLIPS // 2 + 1
        assert reload_lines(proc, "watch") == FLIPS - FLIPS // 2
        assert reload_lines(proc, "SIGHUP") == SIGHUPS
        assert proc.proc.poll() is None, proc.stderr_text()

    # Zero failed requests: no non-2xx, no connection error, no timeout.
    assert outcomes
    assert not failures(outcomes), describe(outcomes)
    # Client connections are not touched by reloads: every client kept its first connection.
    assert {o.connection for o in outcomes} == {1}, describe(outcomes)
    # Every response came from an endpoint some table in force during the request allowed.
    wrong = misrouted(outcomes, windows)
    assert not wrong, f"{len(wrong)} misrouted:\n" + "\n".join(wrong[:10])
    # Each generation served, and the requests wholly inside it went where it said.
    for window in windows:
        served = inside(outcomes, window)
        assert len(served) >= PER_GENERATION, (window, len(served))
        assert {o.upstream for o in served} <= window.allowed, window
    assert len(windows) == 1 + FLIPS + 1 + SIGHUPS
    # blue-b really was hot until its removal, and nothing reached it afterwards.
    removal = windows[FLIPS + 1]
    assert "blue-b" not in removal.allowed
    assert any(o.upstream == "blue-b" for o in inside(outcomes, windows[FLIPS]))
    assert not [o for o in outcomes if o.upstream == "blue-b" and o.started > removal.confirmed]
    assert len(blue_b.requests) > before_b


# --- an endpoint that dies -------------------------------------------------------------------

# A plain HTTP/1.1 upstream in a process of its own (GETs only: no request bodies), so that it can
# die the hard way and come back on the same port. It answers each request after DELAY seconds.
UPSTREAM_PROCESS = """
import asyncio, sys

NAME, PORT, DELAY = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
BODY = f"hello from {NAME}\\n".encode()
HEAD = f"HTTP/1.1 200 OK\\r\\nX-Upstream: {NAME}\\r\\nContent-Length: {len(BODY)}\\r\\n\\r\\n"

async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\\r\\n\\r\\n")
            await asyncio.sleep(DELAY)
            writer.write(HEAD.encode() + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", PORT)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""
# Each answer takes this long, so that about half of the clients' requests are always in flight
# on each endpoint: killing one breaks ~25 requests at once, mid-exchange.
ANSWER_DELAY = 0.05


class UpstreamProcess:
    """An upstream answering `X-Upstream: name` from a process of its own (SIGKILL-able)."""

    def __init__(self, name: str, port: int = 0, delay: float = ANSWER_DELAY) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM_PROCESS, name, str(port), str(delay)],
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.kill()
            raise RuntimeError(f"upstream process {name} did not start (said {line!r})")
        self.port = int(line)
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the kernel closes its sockets, mid-request or not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def two_endpoints(first: str, second: str) -> dict[str, Any]:
    return {
        "workers": 1,
        "drain": {"shutdown": "5s"},
        "upstreams": {"blue": {"endpoints": [first, second]}},
        "routes": [{"name": "all", "split": {"blue": 100}, "retries": 2}],
    }


def wait_both_serving(load: BackgroundLoad, names: set[str]) -> None:
    wait_until(
        lambda: names <= {o.upstream for o in load.load.outcomes[-1000:]},
        timeout=RELOAD_DEADLINE,
        what=f"{sorted(names)} serving",
    )


def ejections(proc: TurnoutProcess, address: str) -> list[str]:
    return re.findall(
        rf"endpoint {re.escape(address)} of blue ejected for \d+s", proc.stderr_text()
    )


@pytest.mark.timeout(60)
def test_endpoint_killed_under_load_fails_no_get(
    tmp_path: Path,
) -> None:
    doomed = UpstreamProcess("blue-a")
    survivor = UpstreamProcess("blue-b")
    try:
        with start_turnout(two_endpoints(doomed.address, survivor.address), tmp_path) as proc:
            load = BackgroundLoad(Load(proc.port, clients=CLIENTS, path="/dies", pause=PAUSE))
            with load:
                wait_both_serving(load, {"blue-a", "blue-b"})
                killed_at = time.monotonic()
                doomed.kill()
                # Requests in flight on it broke; new ones found it refusing connections; after
                # consecutive failures the proxy ejects it.
                wait_until(
                    lambda: bool(ejections(proc, doomed.address)), timeout=20, what="ejection"
                )
                # Enough requests that *started* after the kill (wait_for_more would also count
                # ones that started before it and finished after).
                wait_until(
                    lambda: sum(o.started > killed_at for o in load.load.outcomes) >= CLIENTS * 10,
                    timeout=15,
                    what="requests started after the kill",
                )
                outcomes = load.stop()
    finally:
        doomed.kill()
        survivor.kill()

    assert not failures(outcomes), describe(outcomes)
    assert any(o.upstream == "blue-a" and o.finished < killed_at for o in outcomes)
    after = [o for o in outcomes if o.started > killed_at]
    assert len(after) >= CLIENTS * 10
    assert {o.upstream for o in after} == {"blue-b"}


@pytest.mark.timeout(60)
def test_endpoint_back_after_a_crash_is_ejected_once_and_serves_again(
    tmp_path: Path,
) -> None:
    doomed = UpstreamProcess("blue-a")
    survivor = UpstreamProcess("blue-b")
    revived: UpstreamProcess | None = None
    try:
        with start_turnout(two_endpoints(doomed.address, survivor.address), tmp_path) as proc:
            load = BackgroundLoad(Load(proc.port, clients=CLIENTS, path="/blip", pause=PAUSE))
            with load:
                wait_both_serving(load, {"blue-a", "blue-b"})
                doomed.kill()
                wait_until(
                    lambda: bool(ejections(proc, doomed.address)), timeout=20, what="ejection"
                )
                # The endpoint comes back at once (a restart): after its ejection (5 s, see
                # proxy.dataplane.pools.EJECT_BASE) it is tried again and serves.
                revived = UpstreamProcess("blue-a-again", doomed.port)
                wait_until(
                    lambda: any(o.upstream == "blue-a-again" for o in load.load.outcomes[-1000:]),
                    timeout=EJECT_BASE + 15,
                    what="the restarted endpoint to serve again",
                )
                outcomes = load.stop()
            ejected = ejections(proc, doomed.address)
    finally:
        doomed.kill()
        if revived is not None:
            revived.kill()
        survivor.kill()

    assert not failures(outcomes), describe(outcomes)
    # One outage, one ejection: the failures of requests that were already on their way to the
    # dead endpoint are not new evidence against an endpoint that is already out.
    assert ejected == [f"endpoint {doomed.address} of blue ejected for {EJECT_BASE:.0f}s"]
