"""SIGTERM under keep-alive load loses no request.

Clients keep sending on their keep-alive connections while Turnout drains. A request sent on a
connection Turnout had accepted must get its response (with `Connection: close` once the drain
began); only a new connection may be refused, after the listener closed. Before, idle-looking
connections were closed the instant the drain began, racing requests already on the wire.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.load import BackgroundLoad, Load, Outcome, describe
from tests.support.turnout import start_turnout
from tests.support.upstreams import EchoUpstream


def lost(outcome: Outcome) -> bool:
    """A request that went out on an accepted connection and got no response."""
    if outcome.ok:
        return False
    # Refused (the listener is closed) or never connected: the request was never sent.
    return "ConnectionRefusedError" not in outcome.error and "Connect call failed" not in (
        outcome.error
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_keepalive_load_fails_no_request(
    blue: EchoUpstream, tmp_path: Path, workers: int
) -> None:
    config: dict[str, Any] = {
        "workers": workers,
        "drain": {"delay": "300ms", "shutdown": "10s"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}, "retries": 0}],
    }
    for round_ in range(3):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        with start_turnout(config, folder) as turnout:
            load = Load(turnout.port, clients=30, count=200_000, timeout=10.0)
            with BackgroundLoad(load) as background:
                background.wait_for_more(500, what="load before SIGTERM")
                turnout.proc.send_signal(signal.SIGTERM)
                assert turnout.proc.wait(30) == 0
                outcomes = background.stop()
            wait_until(lambda: not _listening(turnout.port), timeout=5, what="listener closed")
        served = [o for o in outcomes if o.ok]
        failed = [o for o in outcomes if lost(o)]
        assert len(served) >= 500
        assert not failed, describe(failed)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False
