"""A second Turnout, or any other program, on an address a Turnout holds (contract section 6).

The workers of one Turnout share `listen` with SO_REUSEPORT, which would let a second Turnout of
the same user share it too and silently take half the traffic. A Turnout started on a `listen`
or `admin` address that is taken must instead exit 1 at start with one line naming the address,
without a traceback and without ever binding: real subprocesses, real ports on 127.0.0.1.
`claim_addresses` itself is also exercised in process, where the test can hold what it claims.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.control.addresses import StartError, claim_addresses
from proxy.core.config import parse_config
from proxy.core.spec import ConfigSpec
from tests.support.load import BackgroundLoad, Load
from tests.support.rawhttp import get
from tests.support.turnout import PROJECT_ROOT, TurnoutFactory, TurnoutProcess, free_port
from tests.support.upstreams import EchoUpstream

# A refused start binds nothing and spawns nothing; the bound only catches a hang (a Turnout
# that does not refuse runs until killed).
QUICK_EXIT = 30.0
REQUESTS = 200


def config(upstream: EchoUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "workers": 2,
        "drain": {"delay": "0s", "shutdown": "2s"},
        "upstreams": {upstream.name: {"endpoints": [upstream.address]}},
        "routes": [{"name": "all", "split": {upstream.name: 100}}],
        **extra,
    }


def run_second(cfg: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    """`python -m proxy run` on `cfg`; its exit status and output once it ends."""
    folder.mkdir(exist_ok=True)
    path = folder / "second.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    env = dict(os.environ)
    env.pop("TURNOUT_ADMIN_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "proxy", "run", str(path), "--no-access-log"],
        capture_output=True,
        text=True,
        timeout=QUICK_EXIT,
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit 1 and exactly one line on stderr, the expected one: no traceback, no other log."""
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [expected], result.stderr
    assert "Traceback" not in result.stderr


def assert_only_first_serves(first: TurnoutProcess) -> None:
    """REQUESTS requests, each on a fresh connection (so the kernel would spread them over
    every listener on the port): all answered by the first Turnout's upstream."""
    upstream = next(iter(first.config["upstreams"]))
    load = Load(first.port, clients=4, count=REQUESTS, path="/x", headers=[("Connection", "close")])
    with BackgroundLoad(load) as running:
        running.wait_for_total(REQUESTS)
        outcomes = running.stop()
    assert len(outcomes) == REQUESTS
    assert {(o.status, o.upstream) for o in outcomes} == {(200, upstream)}
    assert max(o.connection for o in outcomes) > 1


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def first(turnout_factory: TurnoutFactory, blue: EchoUpstream) -> TurnoutProcess:
    return turnout_factory(config(blue))


def test_second_turnout_on_the_same_listen_exits_1(
    first: TurnoutProcess, green: EchoUpstream, tmp_path: Path
) -> None:
    second = config(green, listen=first.config["listen"], admin=f"127.0.0.1:{free_port()}")
    result = run_second(second, tmp_path / "second")
    assert_refused(
        result,
        f"turnout: cannot start: listen address {first.config['listen']} is already in use by "
        f"another Turnout (pid {first.proc.pid})",
    )
    assert not listening(int(second["admin"].rsplit(":", 1)[1]))
    assert_only_first_serves(first)


def test_second_turnout_on_an_overlapping_listen_exits_1(
    first: TurnoutProcess, green: EchoUpstream, tmp_path: Path
) -> None:
    # `localhost` is the same socket address as 127.0.0.1 under another name: not the same
    # lock, so the bind check must see the first Turnout's workers.
    second = config(green, listen=f"localhost:{first.port}", admin=f"127.0.0.1:{free_port()}")
    result = run_second(second, tmp_path / "second")
    assert_refused(
        result,
        f"turnout: cannot start: listen address localhost:{first.port} is already in use by "
        "another process",
    )
    assert_only_first_serves(first)


def test_second_turnout_on_the_same_admin_exits_1(
    first: TurnoutProcess, green: EchoUpstream, tmp_path: Path
) -> None:
    listen_port = free_port()
    second = config(green, listen=f"127.0.0.1:{listen_port}", admin=first.config["admin"])
    result = run_second(second, tmp_path / "second")
    assert_refused(
        result,
        f"turnout: cannot start: admin address {first.config['admin']} is already in use by "
        "another process",
    )
    assert not listening(listen_port)
    assert_only_first_serves(first)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 held by a plain listening socket (another program)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        yield int(blocker.getsockname()[1])


@pytest.mark.parametrize("setting", ["listen", "admin"])
def test_address_held_by_another_program(
    setting: str, held_port: int, blue: EchoUpstream, tmp_path: Path
) -> None:
    cfg = config(blue, listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{free_port()}")
    cfg[setting] = f"127.0.0.1:{held_port}"
    result = run_second(cfg, tmp_path / "turnout")
    assert_refused(
        result,
        f"turnout: cannot start: {setting} address 127.0.0.1:{held_port} is already in use by "
        "another process",
    )


def test_a_stopped_turnout_leaves_the_addresses_free(
    turnout_factory: TurnoutFactory, blue: EchoUpstream
) -> None:
    # Connections the first one closed sit in TIME_WAIT on its port: they must not count as
    # "in use" for the next Turnout on the same addresses (a restart).
    first = turnout_factory(config(blue))
    for _ in range(20):
        assert get(first.port, "/x", [("Connection", "close")]).status == 200
    assert first.stop() == 0
    again = turnout_factory(
        config(blue, listen=first.config["listen"], admin=first.config["admin"])
    )
    assert get(again.port, "/x").header("x-upstream") == blue.name


# --- claim_addresses in process ------------------------------------------------------------


def spec(listen: str, admin: str) -> ConfigSpec:
    text = (
        f"listen: {listen}\nadmin: {admin}\n"
        "upstreams:\n  blue: {endpoints: [127.0.0.1:9]}\n"
        "routes:\n  - {name: all, split: {blue: 100}}\n"
    )
    return parse_config(text, "turnout.yaml")


def test_claims_keep_other_programs_off_until_the_workers_listen() -> None:
    port = free_port()
    claims = claim_addresses(spec(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    try:
        # No worker listens yet, and still nothing else can bind the port...
        with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
            other.bind(("127.0.0.1", port))
        # ...nor can a second Turnout claim it, under its name or another...
        with pytest.raises(StartError, match=rf"another Turnout \(pid {os.getpid()}\)"):
            claim_addresses(spec(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
        with pytest.raises(StartError, match="another process"):
            claim_addresses(spec(f"localhost:{port}", f"127.0.0.1:{free_port()}"))
        # ...while this Turnout's workers can join (same user, SO_REUSEPORT, as the workers do).
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        claims.close()
    # Released: the next claim succeeds.
    claim_addresses(spec(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")).close()


def test_an_address_that_is_not_local_is_one_clear_error() -> None:
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    with pytest.raises(StartError, match=r"cannot listen on 192\.0\.2\.1:\d+ \(admin\): "):
        claim_addresses(spec(f"127.0.0.1:{free_port()}", f"192.0.2.1:{free_port()}"))


def test_time_wait_left_by_another_program_does_not_block_the_start() -> None:
    # A server that set SO_REUSEADDR (as most do) closed a connection first: its side waits in
    # TIME_WAIT. Turnout's workers could bind, so Turnout must start (without its hold socket,
    # whose bind, lacking SO_REUSEADDR, the kernel refuses here).
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()
            assert client.recv(1) == b""
    claims = claim_addresses(spec(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    try:
        assert claims.hold is None
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        claims.close()
