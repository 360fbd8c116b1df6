"""Fleet mode through Redis Sentinel: a real primary, a real replica and a real Sentinel.

Turnout asks the Sentinel for the primary of `turnout` (`redis+sentinel://.../turnout/0`); a
runtime split is stored there and replicated; the primary is killed, the Sentinel promotes the
replica, and Turnout follows it at its next reconnect: the split it stored is still in force and
a new change is accepted on the new primary.
"""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import wait_until
from tests.support.redis import RedisServer, redis_server_binary
from tests.support.turnout import free_port
from tests.support.upstreams import EchoUpstream

SERVICE = "turnout"


class SentinelProcess:
    """`redis-server --sentinel` watching one primary; it rewrites its own config file."""

    def __init__(self, folder: Path, binary: str, primary_port: int) -> None:
        self.port = free_port()
        config = folder / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n",
            encoding="utf-8",
        )
        self.process = subprocess.Popen(
            [binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def primary_port(self) -> int | None:
        """The port of the primary the Sentinel names now (None: it names none yet)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                conn.sendall(f"SENTINEL get-master-addr-by-name {SERVICE}\r\n".encode())
                reply = b""
                # *2, then $len and the host, then $len and the port: five CRLF in all.
                while reply.count(b"\r\n") < 5 and not reply.startswith(b"*-1"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return None
                    reply += chunk
        except OSError:
            return None
        if not reply.startswith(b"*2"):
            return None
        return int(reply.split(b"\r\n")[4])

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelProcess]]:
    binary = redis_server_binary()
    assert binary is not None
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    (tmp_path / "sentinel").mkdir()
    primary = RedisServer(tmp_path / "primary", binary)
    replica = RedisServer(tmp_path / "replica", binary)
    primary.start()
    replica.start()
    assert replica.command("REPLICAOF", "127.0.0.1", str(primary.port)) == b"+OK"
    sentinel = SentinelProcess(tmp_path / "sentinel", binary, primary.port)
    try:
        wait_until(lambda: sentinel.primary_port() == primary.port, what="the Sentinel")
        yield primary, replica, sentinel
    finally:
        sentinel.close()
        replica.stop()
        primary.stop()


def _admin(turnout_url: str, method: str, path: str, body: object = None) -> tuple[int, Any]:
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(turnout_url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def _effective(admin_url: str) -> dict[str, float]:
    _, view = _admin(admin_url, "GET", "/admin/routes")
    split: dict[str, float] = view["routes"][0]["effective_split"]
    return split


def test_a_sentinel_failover_keeps_the_fleet_state(
    sentinel_setup: tuple[RedisServer, RedisServer, SentinelProcess],
    turnout_factory: Any,
    blue: EchoUpstream,
    green: EchoUpstream,
) -> None:
    primary, replica, sentinel = sentinel_setup
    turnout = turnout_factory(
        {
            "fleet": {
                "name": "sentinel-test",
                "redis": f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0",
                "instance": "one",
                "lease": "2s",
            },
            "upstreams": {
                "blue": {"endpoints": [f"127.0.0.1:{blue.port}"]},
                "green": {"endpoints": [f"127.0.0.1:{green.port}"]},
            },
            "routes": [{"name": "api", "split": {"blue": 100, "green": 0}}],
        }
    )
    admin = turnout.admin_url
    wait_until(lambda: _admin(admin, "GET", "/admin/fleet")[1]["connected"], what="connected")
    status, _ = _admin(admin, "PUT", "/admin/routes/api/split", {"green": 100})
    assert status == 200
    # Stored in the primary, and replicated before the primary goes.
    assert primary.command("GET", "turnout:{sentinel-test}:rev") not in (None, b"$-1")
    wait_until(
        lambda: replica.command("EXISTS", "turnout:{sentinel-test}:doc") == b":1",
        what="the replica to have the shared state",
    )

    primary.stop()
    wait_until(
        lambda: sentinel.primary_port() == replica.port,
        timeout=20,
        what="the Sentinel to promote the replica",
    )

    def accepted() -> bool:
        return _admin(admin, "PUT", "/admin/routes/api/split", {"blue": 1, "green": 1})[0] == 200

    wait_until(accepted, timeout=20, what="a change accepted through the new primary")
    assert _effective(admin) == {"blue": 50.0, "green": 50.0}
    fleet = _admin(admin, "GET", "/admin/fleet")[1]
    assert fleet["connected"] is True
    assert fleet["leader"] == "one"
