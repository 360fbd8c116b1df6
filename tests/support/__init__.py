"""Test support: fake upstream servers, a Turnout subprocess runner, one worker's data plane
in-process (`inprocess`) and a raw HTTP/1.1 client.

Everything here talks to real sockets on 127.0.0.1 only; nothing is mocked. Waiting is always
"poll a condition until a deadline", never a sleep that hopes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(
    condition: Callable[[], bool], *, seconds: float = 10.0, what: str = "condition"
) -> None:
    """`wait_until` for coroutines: yields to the event loop between polls."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.01)
