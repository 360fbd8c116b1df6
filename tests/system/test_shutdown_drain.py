"""Graceful shutdown, end to end: SIGTERM to a real `turnout run` with real work in flight.

The contract (section 6): on SIGTERM `/readyz` turns 503 and new requests are still served for
`drain.delay`; then the listener closes (new connections are refused); in-flight requests get up
to `drain.shutdown` to finish; idle keep-alive clients are closed; WebSockets are told to go away
(close code 1001); exit 0. Requests still running at the deadline are cut and their number is
logged. A second signal exits at once.

Time bounds asserted here are behaviour, not performance: a lower bound where the contract says
"keep serving this long" (nothing may stop earlier than the signal plus the delay), and an upper
bound only where the contract says "at once" (well inside the drain budget it skips).
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from typing import Any

import aiohttp
import pytest

from tests.support import async_wait_until
from tests.support.load import HttpClient, HttpResponse, ResponseBroken, admin_call, admin_config
from tests.support.turnout import TurnoutFactory, TurnoutProcess
from tests.support.upstreams import EchoUpstream

DEADLINE = 15.0
SLOW_REQUESTS = 20


def table(blue: EchoUpstream, *, workers: int, delay: str, shutdown: str) -> dict[str, Any]:
    return {
        "workers": workers,
        "drain": {"delay": delay, "shutdown": shutdown, "reload": "5s"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}, "retries": 0}],
    }


def refuses_connections(port: int) -> bool:
    """True when a TCP connect to 127.0.0.1:`port` is refused (nothing listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


async def get_once(port: int, path: str, deadline: float = DEADLINE) -> HttpResponse:
    """One GET on a fresh connection; every read bounded by `deadline` seconds."""
    client = HttpClient(port, timeout=deadline)
    try:
        return await client.request("GET", path)
    finally:
        client.close()


def readyz_status(proc: TurnoutProcess) -> int:
    status, _ = admin_call(proc.admin_url, "GET", "/readyz", timeout=2.0)
    return status


async def exit_code(proc: TurnoutProcess, seconds: float) -> int:
    """Wait (bounded) for the supervisor to exit; its exit status."""
    return await asyncio.to_thread(proc.proc.wait, seconds)


async def upstream_saw(upstream: EchoUpstream, count: int) -> None:
    await async_wait_until(
        lambda: upstream.requests >= count, seconds=DEADLINE, what=f"{count} upstream requests"
    )


@pytest.mark.timeout(60)
async def test_sigterm_drains_in_flight_work_then_exits_0(
    turnout_factory: TurnoutFactory, blue: EchoUpstream
) -> None:
    delay, shutdown = 2.0, 10.0
    proc = turnout_factory(table(blue, workers=2, delay="2s", shutdown="10s"))
    port = proc.port

    # Work in flight: 20 slow requests (the upstream answers after 6 s, inside delay + shutdown,
    # and long after the listener closes) ...
    seen = blue.requests
    slow = asyncio.gather(
        *(get_once(port, f"/slow?ms=6000&n={i}", deadline=delay + shutdown) for i in range(20)),
        return_exceptions=True,
    )
    await upstream_saw(blue, seen + SLOW_REQUESTS)
    # ... idle keep-alive clients (one request each, then quiet) ...
    idle = [HttpClient(port) for _ in range(5)]
    for client in idle:
        assert (await client.request("GET", "/warm")).status == 200
    # ... and a WebSocket.
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(f"{proc.url}/ws")
        await ws.send_str("before")
        assert (await ws.receive(timeout=DEADLINE)).data == "before"
        closes = len(blue.ws_close_codes)

        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)

        # During drain.delay: not ready, yet new connections and idle clients are served, and
        # the WebSocket still carries messages.
        await async_wait_until(
            lambda: proc.proc.poll() is not None or readyz_status(proc) == 503,
            seconds=DEADLINE,
            what="/readyz 503",
        )
        assert proc.proc.poll() is None
        fresh = await get_once(port, "/during-delay")
        assert fresh.status == 200, fresh
        assert (await idle[0].request("GET", "/during-delay")).status == 200
        await ws.send_str("during")
        assert (await ws.receive(timeout=DEADLINE)).data == "during"

        # Then the listener closes: new connections are refused, never before the delay.
        await async_wait_until(
            lambda: refuses_connections(port), seconds=delay + DEADLINE, what="listener closed"
        )
        assert time.monotonic() - signalled >= delay
        # Idle keep-alive clients are closed (their socket sees EOF) ...
        for client in idle:
            assert await client.wait_closed(DEADLINE), "an idle keep-alive client was left open"
        # ... promptly: while the slow requests are still running, not at the drain deadline.
        assert not slow.done()
        # ... and the WebSocket is told to go away, in both directions.
        message = await ws.receive(timeout=DEADLINE)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1001), message
        await async_wait_until(
            lambda: len(blue.ws_close_codes) > closes, seconds=DEADLINE, what="upstream ws close"
        )
        assert blue.ws_close_codes[closes] == 1001
    finally:
        await session.close()

    # Every slow request finished with 200, and the process exits 0 within its budget.
    results = await slow
    assert [r.status if isinstance(r, HttpResponse) else repr(r) for r in results] == [200] * 20
    assert all(r.header("x-upstream") == "blue" for r in results if isinstance(r, HttpResponse))
    assert await exit_code(proc, delay + shutdown + DEADLINE) == 0
    stderr = proc.stderr_text()
    assert "cutting" not in stderr
    assert "killing" not in stderr


@pytest.mark.timeout(60)
async def test_requests_running_at_the_deadline_are_cut_and_counted(
    turnout_factory: TurnoutFactory, blue: EchoUpstream
) -> None:
    shutdown = 1.0
    proc = turnout_factory(table(blue, workers=1, delay="0s", shutdown="1s"))
    seen = blue.requests
    stuck = asyncio.gather(
        *(get_once(proc.port, f"/slow?ms=20000&n={i}") for i in range(3)),
        return_exceptions=True,
    )
    await upstream_saw(blue, seen + 3)

    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    results = await stuck
    cut_after = time.monotonic() - signalled

    # Cut, not answered: the connection ends before any response byte ...
    assert all(isinstance(r, ResponseBroken) for r in results), results
    # ... but only once drain.shutdown has passed ...
    assert cut_after >= shutdown
    # ... then the process exits 0 and says how many it cut.
    assert await exit_code(proc, DEADLINE) == 0
    assert re.search(r"cutting 3 request\(s\) still running at the deadline", proc.stderr_text())


@pytest.mark.timeout(60)
async def test_second_sigterm_exits_at_once_with_requests_in_flight(
    turnout_factory: TurnoutFactory, blue: EchoUpstream
) -> None:
    budget = 30.0
    proc = turnout_factory(table(blue, workers=2, delay="0s", shutdown="30s"))
    workers = [worker["pid"] for worker in admin_config(proc.admin_url)["workers"]]
    assert len(workers) == 2
    seen = blue.requests
    stuck = asyncio.gather(
        *(get_once(proc.port, f"/slow?ms=20000&n={i}", deadline=budget) for i in range(4)),
        return_exceptions=True,
    )
    await upstream_saw(blue, seen + 4)

    proc.proc.send_signal(signal.SIGTERM)
    # Draining for real: the listeners are closed and the requests still run.
    await async_wait_until(
        lambda: refuses_connections(proc.port), seconds=DEADLINE, what="listener closed"
    )
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code = await exit_code(proc, budget)
    exited_after = time.monotonic() - signalled

    # Exits at once (any status), far inside the 30 s it would otherwise give the requests.
    assert exited_after < budget / 3, exited_after
    assert code != 0
    results = await stuck
    assert all(isinstance(r, ResponseBroken | ConnectionError) for r in results), results
    await async_wait_until(
        lambda: not any(alive(pid) for pid in workers), seconds=DEADLINE, what="workers gone"
    )


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="latin-1") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
