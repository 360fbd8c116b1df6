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
from hypothesis import HealthCheck, settings

from tests.support.build import describe, stale_modules
from tests.support.redis import RedisServer, redis_server_binary
from tests.support.turnout import TurnoutFactory, TurnoutProcess, start_turnout
from tests.support.upstreams import EchoUpstream, UpstreamHost

# Hypothesis's timing checks (a 200 ms deadline per example, "too slow" data generation) measure
# the machine, not the code: the suite runs on parallel workers on a 2-core machine, where an
# example that takes 30 ms alone can take 400 ms. pytest-timeout still bounds a test that hangs.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


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


# --- order: the longest first --------------------------------------------------------------------

# Modules whose tests wait longest (rollouts, leases, timeouts) or burn the most CPU, longest
# first. `./dev test` runs the suite under pytest-xdist (--dist loadfile --no-loadscope-reorder),
# which hands whole modules to workers in this order: long ones started first overlap with
# everything else instead of ending the run alone. Then the rest of the system tests
# (subprocesses), integration, unit: short modules last fill the gaps.
FIRST = (
    "system/test_rollout_e2e.py",
    "system/test_fleet_failures.py",
    "system/test_webhooks.py",
    "system/test_promql.py",
    "system/test_admin_abuse.py",
    "system/test_cli_client.py",
    "system/test_dashboard.py",
    "system/test_fleet_sentinel.py",
    "system/test_shutdown_drain.py",
    "system/test_zero_downtime.py",
    "system/test_drain_keepalive.py",
    "system/test_fleet.py",
    "unit/test_sequential.py",
    "unit/test_rollout_simulation.py",
    "unit/test_sticky.py",
    "unit/test_route_index.py",
)
TIERS = ("system/", "integration/", "unit/")


def _rank(item: pytest.Item) -> tuple[int, int]:
    path = item.path.as_posix()
    for index, module in enumerate(FIRST):
        if path.endswith("/tests/" + module):
            return (0, index)
    for index, tier in enumerate(TIERS, start=1):
        if f"/tests/{tier}" in path:
            return (index, 0)
    return (len(TIERS) + 1, 0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first (FIRST), then system, integration, unit; a stable sort, so each
    module's tests stay together and in the order pytest chose for its fixtures."""
    items.sort(key=_rank)
