"""What a reload does to long-lived things: WebSockets, streaming bodies, pooled connections.

Contract section 6: in-flight work finishes on the config it started with; connections to
upstreams the new config no longer has are closed when idle, or after `drain.reload`; unchanged
upstreams keep their pooled connections; a file that fails validation never replaces the config
in force, and the failure is logged, counted and shown in `/admin/config`.

Every test runs a real `turnout run` and changes its config file the way an operator would
(atomically, then `POST /admin/reload`). The file is a symlink into a folder the file watch does
not look at (`ConfigLayout`), so each reload here has exactly one trigger and the counts are
exact.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from proxy.dataplane.upstream import POOL_IDLE_TIMEOUT
from tests.support import async_wait_until, wait_until
from tests.support.load import (
    ConfigLayout,
    HttpClient,
    admin_call,
    admin_config,
    admin_text,
    wait_generation,
)
from tests.support.turnout import TurnoutProcess, free_port, launch
from tests.support.upstreams import EchoUpstream, UpstreamHost, pattern_sha256

DEADLINE = 15.0
RELOADS = 10


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


class Reloadable:
    """A running Turnout whose config file the test rewrites and reloads with POST."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        config = dict(config)
        config.setdefault("listen", f"127.0.0.1:{free_port()}")
        config.setdefault("admin", f"127.0.0.1:{free_port()}")
        self.config = config
        self.layout = ConfigLayout(tmp_path, dump(config))
        self.proc: TurnoutProcess = launch(config, self.layout.link)
        self.generation = 1

    def reload(self, config: dict[str, Any]) -> float:
        """Write `config`, POST /admin/reload, wait for every worker; monotonic time of the POST."""
        self.config = dict(config, listen=self.config["listen"], admin=self.config["admin"])
        self.layout.write_unwatched(dump(self.config))
        started = time.monotonic()
        status, body = admin_call(self.proc.admin_url, "POST", "/admin/reload")
        self.generation += 1
        assert (status, body) == (200, {"generation": self.generation, "changed": True})
        wait_generation(self.proc.admin_url, self.generation, timeout=DEADLINE)
        return started

    def close(self) -> None:
        self.proc.close()


@pytest.fixture
def reloadable(tmp_path: Path) -> Iterator[list[Reloadable]]:
    started: list[Reloadable] = []
    yield started
    for item in started:
        item.close()


@pytest.fixture(scope="module")
def echoes(upstream_host: UpstreamHost) -> Iterator[dict[str, EchoUpstream]]:
    """Echo upstreams (they answer with `X-Upstream: <name>`; `.../ws` is a WebSocket echo)."""
    names = ("blue", "green", "sock", "bulk", "old", "new")
    started = {name: upstream_host.echo(name) for name in names}
    yield started
    for upstream in started.values():
        upstream_host.stop(upstream)


def flip_table(
    echoes: dict[str, EchoUpstream], colour: str, *, side: str, workers: int = 2
) -> dict[str, Any]:
    """`/<side>` goes to upstream `side`, untouched by reloads; `/` flips between blue/green."""
    split = {"blue": 100, "green": 0} if colour == "blue" else {"blue": 0, "green": 100}
    return {
        "workers": workers,
        "drain": {"reload": "1s", "shutdown": "5s"},
        "upstreams": {
            name: {"endpoints": [echoes[name].address]} for name in ("blue", "green", side)
        },
        "routes": [
            {"name": "side", "match": {"path_prefix": f"/{side}"}, "split": {side: 100}},
            {"name": "main", "split": split},
        ],
    }


async def upstream_of(port: int, path: str) -> str:
    client = HttpClient(port)
    try:
        response = await client.request("GET", path)
    finally:
        client.close()
    assert response.status == 200, response
    return response.header("x-upstream") or ""


# --- streams on upstreams a reload does not touch ----------------------------------------------


@pytest.mark.timeout(60)
async def test_websocket_on_an_untouched_upstream_survives_reloads(
    tmp_path: Path, echoes: dict[str, EchoUpstream], reloadable: list[Reloadable]
) -> None:
    sock = echoes["sock"]
    turnout = Reloadable(tmp_path, flip_table(echoes, "blue", side="sock"))
    reloadable.append(turnout)
    sessions, closes = sock.ws_sessions, len(sock.ws_close_codes)

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{turnout.proc.url}/sock/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=DEADLINE)).data == "hello"
            colour = "blue"
            for index in range(RELOADS):
                colour = "green" if colour == "blue" else "blue"
                await asyncio.to_thread(turnout.reload, flip_table(echoes, colour, side="sock"))
                # The reload took effect for new requests ...
                assert await upstream_of(turnout.proc.port, "/x") == colour
                # ... and the WebSocket, on the same connection, carries on.
                await ws.send_str(f"after reload {index}")
                message = await ws.receive(timeout=DEADLINE)
                assert (message.type, message.data) == (
                    aiohttp.WSMsgType.TEXT,
                    f"after reload {index}",
                )
            assert not ws.closed
        # Closed by us, with our code: the proxy never interfered.
        assert ws.close_code == 1000

    assert sock.ws_sessions == sessions + 1
    await async_wait_until(lambda: len(sock.ws_close_codes) > closes, what="upstream close")
    assert sock.ws_close_codes[closes:] == [1000]


@pytest.mark.timeout(60)
async def test_streaming_download_on_an_untouched_upstream_survives_reloads(
    tmp_path: Path, echoes: dict[str, EchoUpstream], reloadable: list[Reloadable]
) -> None:
    # Far more than every socket buffer on the way holds: while the client reads slowly, the
    # upstream is still writing, held back by backpressure through the proxy.
    size = 64 * 1024 * 1024
    step = 1024 * 1024
    turnout = Reloadable(tmp_path, flip_table(echoes, "blue", side="bulk"))
    reloadable.append(turnout)

    client = HttpClient(turnout.proc.port, timeout=DEADLINE)
    digest = hashlib.sha256()
    received = 0

    async def read(count: int) -> None:
        nonlocal received
        goal = received + count
        while received < goal:
            piece = await client.read_body(goal - received)
            assert piece, f"the body ended after {received} of {size} bytes"
            digest.update(piece)
            received += len(piece)

    try:
        await client.send("GET", f"/bulk/sha?n={size}&seed=reload-stream")
        status, headers = await client.read_head()
        assert status == 200
        assert ("x-upstream", "bulk") in headers
        colour = "blue"
        for _ in range(RELOADS // 2):
            await read(step)
            colour = "green" if colour == "blue" else "blue"
            await asyncio.to_thread(turnout.reload, flip_table(echoes, colour, side="bulk"))
            assert await upstream_of(turnout.proc.port, "/x") == colour
        assert received < size
        while piece := await client.read_body():
            digest.update(piece)
            received += len(piece)
    finally:
        client.close()

    assert received == size
    assert digest.hexdigest() == pattern_sha256(size, "reload-stream")


# --- an upstream a reload removes --------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_websocket_on_a_removed_upstream_goes_away_after_drain_reload(
    tmp_path: Path, echoes: dict[str, EchoUpstream], reloadable: list[Reloadable]
) -> None:
    old, new = echoes["old"], echoes["new"]
    drain_reload = 1.0

    def table(upstream: str) -> dict[str, Any]:
        return {
            "workers": 1,
            "drain": {"reload": "1s", "shutdown": "5s"},
            "upstreams": {upstream: {"endpoints": [echoes[upstream].address]}},
            "routes": [{"name": "main", "split": {upstream: 100}}],
        }

    turnout = Reloadable(tmp_path, table("old"))
    reloadable.append(turnout)
    port = turnout.proc.port
    closes = len(old.ws_close_codes)
    seen = old.requests

    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{turnout.proc.url}/ws")
        await ws.send_str("hello")
        assert (await ws.receive(timeout=DEADLINE)).data == "hello"
        # A plain request in flight on the removed upstream finishes within drain.reload.
        slow_client = HttpClient(port)
        await slow_client.send("GET", "/slow?ms=100")
        await async_wait_until(lambda: old.requests >= seen + 2, what="the slow request")

        reloaded_at = await asyncio.to_thread(turnout.reload, table("new"))

        status, _ = await slow_client.read_head()
        body = b""
        while piece := await slow_client.read_body():
            body += piece
        slow_client.close()
        assert status == 200
        assert orjson.loads(body)["upstream"] == "old"
        # New requests and WebSockets go to the new upstream at once.
        assert await upstream_of(port, "/x") == "new"
        async with session.ws_connect(f"{turnout.proc.url}/ws") as fresh:
            await fresh.send_str("fresh")
            assert (await fresh.receive(timeout=DEADLINE)).data == "fresh"
        # The old WebSocket is told to go away once drain.reload has passed, not before.
        message = await ws.receive(timeout=DEADLINE)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1001), message
        assert time.monotonic() - reloaded_at >= drain_reload
        await ws.close()

    await async_wait_until(lambda: len(old.ws_close_codes) > closes, what="upstream close")
    assert old.ws_close_codes[closes:] == [1001]
    assert new.ws_sessions >= 1


# --- pooled connections ------------------------------------------------------------------------


class CountingUpstream:
    """A keep-alive HTTP/1.1 upstream (GETs only) that counts connections accepted and open."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.accepted = 0
        self.closed = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def open(self) -> int:
        """Connections accepted and not yet closed (by either side)."""
        return self.accepted - self.closed

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        body = f"hello from {self.name}\n".encode()
        head = f"HTTP/1.1 200 OK\r\nX-Upstream: {self.name}\r\nContent-Length: {len(body)}\r\n\r\n"
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head.encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self.closed += 1


@pytest.fixture
def counting(upstream_host: UpstreamHost) -> Iterator[tuple[CountingUpstream, CountingUpstream]]:
    pair = (CountingUpstream("keep"), CountingUpstream("gone"))
    for upstream in pair:
        upstream_host.call(upstream.start())
    yield pair
    for upstream in pair:
        upstream_host.call(upstream.stop())


@pytest.mark.timeout(60)
async def test_reload_keeps_warm_pools_of_unchanged_upstreams_and_closes_removed_ones(
    tmp_path: Path,
    counting: tuple[CountingUpstream, CountingUpstream],
    reloadable: list[Reloadable],
) -> None:
    keep, gone = counting

    def table(*, with_gone: bool, retries: int) -> dict[str, Any]:
        upstreams = {"keep": {"endpoints": [keep.address]}}
        route: dict[str, Any] = {"name": "main", "split": {"keep": 100}, "retries": retries}
        if with_gone:
            upstreams["gone"] = {"endpoints": [gone.address]}
            route["overrides"] = [{"header": "x-to", "value": "gone", "to": "gone"}]
        return {
            "workers": 1,
            # Long, so that only "closed when idle" can close a removed upstream's connection
            # promptly; the drain deadline and the pool's idle timeout are both far away.
            "drain": {"reload": "30s", "shutdown": "5s"},
            "upstreams": upstreams,
            "routes": [route],
        }

    turnout = Reloadable(tmp_path, table(with_gone=True, retries=2))
    reloadable.append(turnout)
    client = HttpClient(turnout.proc.port)

    async def send(count: int, headers: tuple[tuple[str, str], ...] = ()) -> set[str]:
        seen = set()
        for _ in range(count):
            response = await client.request("GET", "/pooled", headers)
            assert response.status == 200, response
            seen.add(response.header("x-upstream") or "")
        return seen

    try:
        # One client, one request at a time: each upstream needs exactly one pooled connection.
        assert await send(5, (("x-to", "gone"),)) == {"gone"}
        assert await send(20) == {"keep"}
        assert (keep.accepted, keep.open, gone.accepted, gone.open) == (1, 1, 1, 1)

        # Reload: `gone` is removed, `keep` is not touched.
        await asyncio.to_thread(turnout.reload, table(with_gone=False, retries=1))
        assert await send(20) == {"keep"}
        # The removed upstream's idle pooled connection is closed at once (its upstream sees
        # the close), well before the pool's own idle timeout could have done it.
        await async_wait_until(
            lambda: gone.open == 0, seconds=POOL_IDLE_TIMEOUT / 2, what="gone's connection closed"
        )
        # Two more reloads that leave `keep` alone; its warm connection carries on each time.
        for retries in (0, 2):
            await asyncio.to_thread(turnout.reload, table(with_gone=False, retries=retries))
            assert await send(20) == {"keep"}
    finally:
        client.close()

    assert (keep.accepted, keep.open) == (1, 1), "a reload forced new connections to `keep`"
    assert gone.accepted == 1
    assert client.connections == 1


# --- files that fail validation ----------------------------------------------------------------


def reloads_metric(admin_url: str, result: str) -> int:
    """`turnout_config_reloads_total{result=...}` from /metrics."""
    status, text = admin_text(admin_url, "/metrics")
    assert status == 200, text
    pattern = rf'^turnout_config_reloads_total\{{result="{result}"\}} (\S+)$'
    match = re.search(pattern, text, re.M)
    assert match, f"no turnout_config_reloads_total{{result={result!r}}} in:\n{text[:3000]}"
    return int(float(match.group(1)))


@pytest.mark.timeout(60)
def test_files_that_fail_validation_never_replace_the_config_in_force(
    tmp_path: Path, echoes: dict[str, EchoUpstream], reloadable: list[Reloadable]
) -> None:
    good = flip_table(echoes, "green", side="sock", workers=1)
    turnout = Reloadable(tmp_path, good)
    reloadable.append(turnout)
    proc = turnout.proc
    good_text = (turnout.layout.versions / turnout.layout.target).read_text()
    before = admin_config(proc.admin_url)
    assert before["last_error"] is None

    broken = dict(good, routes=[*good["routes"][:1], dict(good["routes"][1], split={"gren": 1})])
    duplicate = good_text.replace("upstreams:", "upstreams: {}\nupstreams:", 1)
    variants = {
        "invalid": (dump(broken), r"routes\[1\]\.split\.gren: unknown upstream 'gren'"),
        # Cut mid-file, as a non-atomic writer caught half-way would leave it.
        "truncated": (good_text[: good_text.index("routes:") + 3], r"turnout\.yaml:\d+:\d+: "),
        "empty": ("", r"the file is empty"),
        "duplicate keys": (duplicate, r"duplicate key 'upstreams'"),
    }

    failures = before["reloads"]["failure"]
    assert reloads_metric(proc.admin_url, "failure") == failures == 0
    for name, (text, expected) in variants.items():
        turnout.layout.write_unwatched(text)
        status, body = admin_call(proc.admin_url, "POST", "/admin/reload")
        assert status == 400, (name, body)
        assert any(re.search(expected, line) for line in body["errors"]), (name, body)
        failures += 1

        view = admin_config(proc.admin_url)
        # The old config stays in force ...
        assert (view["generation"], view["sha256"]) == (1, before["sha256"]), name
        assert all(worker["generation"] == 1 for worker in view["workers"]), name
        # ... the error is shown ...
        assert view["last_error"], (name, view)
        assert re.search(expected, view["last_error"]), (name, view["last_error"])
        # ... and counted.
        assert view["reloads"]["failure"] == failures, (name, view["reloads"])
        assert reloads_metric(proc.admin_url, "failure") == failures, name
        assert reloads_metric(proc.admin_url, "success") == 0, name
        # Traffic is still routed by the old table.
        assert asyncio.run(upstream_of(proc.port, "/x")) == "green", name
        assert admin_call(proc.admin_url, "GET", "/readyz")[0] == 200

    # A good file again: a new generation, and the error is cleared.
    turnout.reload(flip_table(echoes, "blue", side="sock", workers=1))
    view = admin_config(proc.admin_url)
    assert view["last_error"] is None
    assert view["reloads"]["failure"] == failures
    assert reloads_metric(proc.admin_url, "failure") == failures
    assert reloads_metric(proc.admin_url, "success") == 1
    wait_until(lambda: asyncio.run(upstream_of(proc.port, "/x")) == "blue", what="blue")
