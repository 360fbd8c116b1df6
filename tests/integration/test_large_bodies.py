"""Large bodies stream through Turnout intact, and with bounded memory.

Integrity: 10 MiB up and down, chunked and with Content-Length, compared by sha256.

Backpressure: a client that reads slowly, and an upstream that reads slowly, move 64 MiB /
48 MiB through a fresh Turnout while the resident memory of its whole process tree is sampled
(and its peak, VmHWM, compared). The transfers are larger than the brief's 10 MiB on purpose: a
proxy that buffered a 10 MiB body whole would still stay under the 30 MiB bound, so the test
could not fail; with 48-64 MiB it can. The bound is on memory, not on time.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import build_request
from tests.support.turnout import TurnoutFactory, TurnoutProcess
from tests.support.upstreams import EchoUpstream, pattern_chunks, pattern_sha256

MIB = 1024 * 1024
SIZE = 10 * MIB
SLOW_DOWNLOAD = 64 * MIB
SLOW_UPLOAD = 48 * MIB
RSS_GROWTH_BOUND_KIB = 30 * 1024
# The slow client pauses 8 ms per 256 KiB it reads (~30 MiB/s at most): an order of magnitude
# slower than the upstream can send, so without backpressure the proxy would have to buffer.
SLOW_STEP = 256 * 1024
SLOW_PAUSE_S = 0.008


def config_for(blue: EchoUpstream) -> dict[str, Any]:
    return {
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "main", "split": {"blue": 100}}],
    }


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    # Integrity needs no process of its own: the data plane runs in-process. The memory tests
    # below measure a Turnout process tree, so they start one each.
    with start_inprocess(config_for(blue)) as process:
        yield process


async def pattern_stream(n: int, seed: str) -> AsyncIterator[bytes]:
    for chunk in pattern_chunks(n, seed):
        yield chunk


# -- integrity --------------------------------------------------------------------------------


async def test_upload_10mib_chunked(turnout: InProcessTurnout) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{turnout.url}/upload", data=pattern_stream(SIZE, "up-chunked")) as resp,
    ):
        assert resp.status == 200
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        described = await resp.json()
    assert described["body_len"] == SIZE
    assert described["body_sha256"] == pattern_sha256(SIZE, "up-chunked")


async def test_upload_10mib_content_length(turnout: InProcessTurnout) -> None:
    body = b"".join(pattern_chunks(SIZE, "up-fixed"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{turnout.url}/upload", data=body) as resp,
    ):
        assert resp.status == 200
        described = await resp.json()
    assert described["body_len"] == SIZE
    assert described["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ["Content-Length", str(SIZE)] in described["headers"]


@pytest.mark.parametrize("mode", ["chunked", "fixed"])
async def test_download_10mib(turnout: InProcessTurnout, mode: str) -> None:
    digest = hashlib.sha256()
    length = 0
    url = f"{turnout.url}/sha?n={SIZE}&seed=down-{mode}&mode={mode}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        if mode == "fixed":
            assert resp.headers.get("Content-Length") == str(SIZE)
        async for chunk in resp.content.iter_chunked(1 << 16):
            digest.update(chunk)
            length += len(chunk)
    assert length == SIZE
    assert digest.hexdigest() == pattern_sha256(SIZE, f"down-{mode}")


# -- backpressure -----------------------------------------------------------------------------


class MemoryWatch:
    """Samples the summed RSS of a Turnout process tree and compares peaks (VmHWM)."""

    def __init__(self, turnout: TurnoutProcess) -> None:
        self.turnout = turnout
        self.baseline_rss = turnout.rss_kib()
        self.baseline_hwm = turnout.hwm_kib()
        self.max_rss = self.baseline_rss

    def sample(self) -> None:
        self.max_rss = max(self.max_rss, self.turnout.rss_kib())

    def assert_bounded(self) -> None:
        self.sample()
        rss_growth = self.max_rss - self.baseline_rss
        hwm_now = self.turnout.hwm_kib()
        hwm_growth = sum(
            max(0, hwm_now.get(pid, 0) - before) for pid, before in self.baseline_hwm.items()
        )
        assert rss_growth < RSS_GROWTH_BOUND_KIB, f"RSS grew by {rss_growth} KiB"
        assert hwm_growth < RSS_GROWTH_BOUND_KIB, f"peak RSS grew by {hwm_growth} KiB"


async def slow_download(
    port: int, path: str, watch: MemoryWatch | None = None
) -> tuple[int, str, dict[str, str]]:
    """GET `path` reading slowly with a small receive buffer; (length, sha256, headers)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect: window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    try:
        writer.write(build_request("GET", path))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split(" ")[1] == "200", lines[0]
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        digest = hashlib.sha256()
        state = {"length": 0, "unpaused": 0, "since_sample": 0}

        async def consume(data: bytes) -> None:
            digest.update(data)
            state["length"] += len(data)
            state["unpaused"] += len(data)
            state["since_sample"] += len(data)
            if state["since_sample"] >= MIB and watch is not None:
                state["since_sample"] = 0
                watch.sample()
            if state["unpaused"] >= SLOW_STEP:
                state["unpaused"] = 0
                await asyncio.sleep(SLOW_PAUSE_S)

        async def read(count: int) -> bytes:
            return await asyncio.wait_for(reader.readexactly(count), 20)

        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)
                    break
                while size:
                    piece = await read(min(size, 64 * 1024))
                    size -= len(piece)
                    await consume(piece)
                assert await read(2) == b"\r\n"
        else:
            remaining = int(headers["content-length"])
            while remaining:
                piece = await read(min(remaining, 64 * 1024))
                remaining -= len(piece)
                await consume(piece)
        return state["length"], digest.hexdigest(), headers
    finally:
        writer.close()


async def test_slow_client_download_keeps_memory_bounded(
    blue: EchoUpstream, turnout_factory: TurnoutFactory
) -> None:
    turnout = turnout_factory(config_for(blue))
    # Warm up the same path (pools, buffers, allocator arenas) before the baseline.
    await slow_download(turnout.port, f"/sha?n={4 * MIB}&seed=warm&mode=fixed")
    watch = MemoryWatch(turnout)
    length, sha, _ = await slow_download(
        turnout.port, f"/sha?n={SLOW_DOWNLOAD}&seed=slow-client&mode=fixed", watch
    )
    assert length == SLOW_DOWNLOAD
    assert sha == pattern_sha256(SLOW_DOWNLOAD, "slow-client")
    watch.assert_bounded()


async def test_slow_client_chunked_download_keeps_memory_bounded(
    blue: EchoUpstream, turnout_factory: TurnoutFactory
) -> None:
    turnout = turnout_factory(config_for(blue))
    await slow_download(turnout.port, f"/sha?n={4 * MIB}&seed=warm&mode=chunked")
    watch = MemoryWatch(turnout)
    length, sha, _ = await slow_download(
        turnout.port, f"/sha?n={SLOW_DOWNLOAD}&seed=slow-chunked&mode=chunked", watch
    )
    assert length == SLOW_DOWNLOAD
    assert sha == pattern_sha256(SLOW_DOWNLOAD, "slow-chunked")
    watch.assert_bounded()


async def test_slow_upstream_upload_keeps_memory_bounded(
    blue: EchoUpstream, turnout_factory: TurnoutFactory
) -> None:
    turnout = turnout_factory(config_for(blue))
    async with aiohttp.ClientSession() as session:
        warm = pattern_stream(4 * MIB, "warm")
        async with session.post(f"{turnout.url}/slowupload", data=warm) as resp:
            assert resp.status == 200
        watch = MemoryWatch(turnout)
        done = asyncio.Event()

        async def upload() -> dict[str, Any]:
            try:
                body = pattern_stream(SLOW_UPLOAD, "slow-upstream")
                async with session.post(f"{turnout.url}/slowupload", data=body) as resp:
                    assert resp.status == 200
                    result: dict[str, Any] = await resp.json()
                    return result
            finally:
                done.set()

        async def sample() -> None:
            while not done.is_set():
                watch.sample()
                await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as group:
            uploaded = group.create_task(upload())
            group.create_task(sample())
    described = uploaded.result()
    assert described["body_len"] == SLOW_UPLOAD
    assert described["body_sha256"] == pattern_sha256(SLOW_UPLOAD, "slow-upstream")
    watch.assert_bounded()
