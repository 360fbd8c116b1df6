"""A full file-descriptor table is Turnout's problem, never the upstream's.

Under `ulimit -n 256`, 400 idle client connections must not make live clients fail, must not
eject a healthy endpoint, and must not flood the log: a worker takes only as many clients as
its fd limit leaves room for (each may need an upstream connection too), and the rest wait in
the kernel's backlog.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.load import HttpClient, admin_text
from tests.support.turnout import TurnoutProcess, free_port, launch
from tests.support.upstreams import UpstreamHost

NOFILE = 256


def start_limited(config: dict[str, Any], folder: Path) -> TurnoutProcess:
    config_path = folder / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return launch(config, config_path, prefix=("prlimit", f"--nofile={NOFILE}:{NOFILE}"))


async def live_requests(clients: list[HttpClient], rounds: int) -> list[int]:
    statuses = []
    for _ in range(rounds):
        answers = await asyncio.gather(*(c.request("GET", "/x") for c in clients))
        statuses += [a.status for a in answers]
    return statuses


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@pytest.mark.timeout(90)
def test_idle_connections_beyond_the_fd_limit_hurt_nobody(
    upstream_host: UpstreamHost, tmp_path: Path
) -> None:
    # Every response closes its upstream connection: each request needs a new descriptor.
    closer = upstream_host.raw("closer", "connection_close")
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "upstreams": {"blue": {"endpoints": [closer.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    with start_limited(config, tmp_path) as turnout, ExitStack() as idle:

        async def scenario() -> tuple[list[int], list[int]]:
            clients = [HttpClient(turnout.port) for _ in range(5)]
            try:
                before = await live_requests(clients, 1)
                for _ in range(400):
                    sock = idle.enter_context(socket.socket())
                    sock.setblocking(False)
                    # Completes in the kernel's backlog whether or not Turnout accepts it.
                    sock.connect_ex(("127.0.0.1", turnout.port))
                await asyncio.sleep(0)
                after = await live_requests(clients, 20)
                return before, after
            finally:
                for client in clients:
                    client.close()

        before, after = asyncio.run(scenario())
        assert before == [200] * 5
        assert after == [200] * 100
        _, metrics = admin_text(turnout.admin_url, "/metrics")
        stderr = turnout.stderr_text()
    assert "ejected" not in stderr
    assert "taking at most 96 client connections" in stderr
    for line in metrics.splitlines():
        if line.startswith("turnout_upstream_errors_total{"):
            assert line.endswith(" 0.0"), line
        if line.startswith("turnout_endpoint_ejected{"):
            assert line.endswith(" 0.0"), line
