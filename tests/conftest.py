"""Shared fixtures: the fake-upstream thread and a factory for Turnout subprocesses.

Integration modules build their own module-scoped upstreams and Turnout. Request handling is
tested against one worker's data plane in this process (tests.support.inprocess: no process to
start, and coverage sees it); `turnout_factory` is for what needs a real process tree: several
workers, signals, the supervisor's access-log pipe, memory of the process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.build import describe, stale_modules
from tests.support.redis import RedisServer, redis_server_binary
from tests.support.turnout import TurnoutFactory, TurnoutProcess, start_turnout
from tests.support.upstreams import EchoUpstream, UpstreamHost


def pytest_report_header() -> str:
    return describe()


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_modules()
    if stale:
        pytest.exit(
            f"compiled modules are older than {', '.join(stale)}: run ./dev compile (or "
            "./dev pure to test the pure-Python build)",
            returncode=4,
        )


@pytest.fixture(scope="session")
def upstream_host() -> Iterator[UpstreamHost]:
    """The event-loop thread that runs every fake upstream of the session."""
    host = UpstreamHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def blue(upstream_host: UpstreamHost) -> Iterator[EchoUpstream]:
    """An echo upstream named blue, one per test module."""
    upstream = upstream_host.echo("blue")
    yield upstream
    upstream_host.stop(upstream)


@pytest.fixture(scope="module")
def green(upstream_host: UpstreamHost) -> Iterator[EchoUpstream]:
    """An echo upstream named green, one per test module."""
    upstream = upstream_host.echo("green")
    yield upstream
    upstream_host.stop(upstream)


@pytest.fixture
def turnout_factory(tmp_path: Path) -> Iterator[TurnoutFactory]:
    """`factory(config, access_log=False)` starts a Turnout; all are killed at teardown."""
    started: list[TurnoutProcess] = []

    def factory(config: dict[str, Any], *, access_log: bool = False) -> TurnoutProcess:
        folder = tmp_path / f"turnout{len(started)}"
        folder.mkdir()
        turnout = start_turnout(config, folder, access_log=access_log)
        started.append(turnout)
        return turnout

    yield factory
    for turnout in started:
        turnout.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of its own for each test (started empty on a free port)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("redis-server is not installed: ./dev test installs it")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder, binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
