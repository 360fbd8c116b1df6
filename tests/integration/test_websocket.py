"""WebSocket upgrades through a real Turnout with aiohttp's client against an aiohttp upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support import async_wait_until
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.upstreams import EchoUpstream, pattern_bytes

RECEIVE_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def turnout(blue: EchoUpstream) -> Iterator[InProcessTurnout]:
    config: dict[str, Any] = {
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "main", "split": {"blue": 100}}],
    }
    with start_inprocess(config) as process:
        yield process


async def test_websocket_echoes_text_and_binary(
    turnout: InProcessTurnout, blue: EchoUpstream
) -> None:
    sessions_before = blue.ws_sessions
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{turnout.url}/ws") as ws:
        for index in range(100):
            await ws.send_str(f"text message {index} ✓")
            message = await ws.receive(timeout=RECEIVE_TIMEOUT)
            assert message.type == aiohttp.WSMsgType.TEXT
            assert message.data == f"text message {index} ✓"
        for index in range(100):
            payload = pattern_bytes(index * 97 + 1, f"ws{index}")
            await ws.send_bytes(payload)
            message = await ws.receive(timeout=RECEIVE_TIMEOUT)
            assert message.type == aiohttp.WSMsgType.BINARY
            assert message.data == payload
        big = pattern_bytes(1024 * 1024, "ws-big")
        await ws.send_bytes(big)
        message = await ws.receive(timeout=RECEIVE_TIMEOUT)
        assert message.data == big
    assert blue.ws_sessions == sessions_before + 1


async def test_client_close_reaches_the_upstream(
    turnout: InProcessTurnout, blue: EchoUpstream
) -> None:
    # The upstream records a close after answering it: a session of an earlier test may still
    # be on its way to the list. Start once every session so far has its close recorded.
    await async_wait_until(
        lambda: len(blue.ws_close_codes) == blue.ws_sessions, what="earlier sessions recorded"
    )
    closes_before = len(blue.ws_close_codes)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{turnout.url}/ws")
        await ws.send_str("ping")
        assert (await ws.receive(timeout=RECEIVE_TIMEOUT)).data == "ping"
        await ws.close(code=4001, message=b"client done")
        # aiohttp's upstream answers a close with 1000; 1006 would mean no answer came back.
        assert ws.close_code == 1000
    await async_wait_until(
        lambda: len(blue.ws_close_codes) > closes_before, what="upstream to see the close"
    )
    assert blue.ws_close_codes[closes_before] == 4001


async def test_upstream_close_reaches_the_client(turnout: InProcessTurnout) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{turnout.url}/ws") as ws:
        await ws.send_str("close-me:4000")
        message = await ws.receive(timeout=RECEIVE_TIMEOUT)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert message.data == 4000
        assert message.extra == "bye"
        await ws.close()


async def test_concurrent_websockets_stay_separate(turnout: InProcessTurnout) -> None:
    async def converse(session: aiohttp.ClientSession, tag: str) -> list[str]:
        received = []
        async with session.ws_connect(f"{turnout.url}/{tag}/ws") as ws:
            for index in range(20):
                await ws.send_str(f"{tag}-{index}")
                received.append((await ws.receive(timeout=RECEIVE_TIMEOUT)).data)
        return received

    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as group:
        tasks = {tag: group.create_task(converse(session, tag)) for tag in "abcdef"}
    for tag, task in tasks.items():
        assert task.result() == [f"{tag}-{index}" for index in range(20)]
