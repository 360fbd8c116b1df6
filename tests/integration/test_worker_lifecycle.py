"""A worker's life around its requests: the supervisor's messages, drain, descriptors, TLS.

The first tests run `proxy.dataplane.worker.serve` itself in the test's event loop, with the
test as the supervisor on the other end of a socketpair (proxy.runtime.channel): the worker
reports ready once it listens, applies tables and health sets in order, answers stats, and exits
on its own when the supervisor goes away or the channel breaks. The others drive one worker's
data plane in-process (tests.support.inprocess) through the drain sequence (contract section 6),
a shortage of file descriptors and certificate renewal on a TLS listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from proxy.core.config import config_sha256, parse_config
from proxy.dataplane.listeners import refuse_new_connections
from proxy.dataplane.worker import DRAIN_IDLE_GRACE, serve
from proxy.runtime.channel import (
    OP_APPLIED,
    OP_READY,
    OP_STATS,
    ControlChannel,
    certs_message,
    health_message,
    open_channel,
    table_message,
)
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import ListenerMaterial, read_material
from tests.support import wait_until
from tests.support.certs import PemPair, write_pair
from tests.support.inprocess import InProcessTurnout, start_inprocess
from tests.support.rawhttp import RawConnection, build_request, get
from tests.support.scripted import Connection, ScriptedUpstream
from tests.support.turnout import free_port
from tests.support.upstreams import EchoUpstream

VIA = re.compile(r"1\.1 turnout-[0-9a-f]{12}\Z")
DEADLINE = 10.0


def routed_to(upstream: str, blue: EchoUpstream, green: EchoUpstream, **top: Any) -> dict[str, Any]:
    return {
        **top,
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [{"name": "all", "split": {upstream: 100}}],
    }


# -- the control channel ----------------------------------------------------------------------


class Supervisor:
    """The test's end of a worker's control channel; the worker runs `serve` in this loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.port = int(str(config["listen"]).rsplit(":", 1)[1])
        self.generation = 0
        self.tasks = TaskSet("test-supervisor")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ours = ours
        self.worker = self.tasks.spawn(serve(theirs.detach(), 0, False), name="worker")
        self.channel: ControlChannel | None = None

    async def open(self) -> ControlChannel:
        self.channel = await open_channel(self._ours)
        return self.channel

    def table(self, config: dict[str, Any]) -> dict[str, object]:
        text = yaml.safe_dump(config, sort_keys=False)
        self.generation += 1
        return table_message(
            generation=self.generation,
            sha256=config_sha256(text),
            path="turnout.yaml",
            spec=parse_config(text, "turnout.yaml"),
            split_overrides={},
        )

    async def recv(self) -> dict[str, Any]:
        assert self.channel is not None
        async with asyncio.timeout(DEADLINE):
            msg = await self.channel.recv()
        assert msg is not None, "the worker closed its channel"
        return msg

    async def exit_code(self) -> int:
        async with asyncio.timeout(DEADLINE):
            return await self.worker


async def fetch(port: int, path: str) -> tuple[int, dict[str, str]]:
    """A GET over a fresh connection from this event loop: (status, headers by lower name)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request("GET", path, [("Connection", "close")]))
        async with asyncio.timeout(DEADLINE):
            raw = await reader.read()
    finally:
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


async def test_worker_follows_the_supervisor_protocol(
    blue: EchoUpstream, green: EchoUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="turnout")
    listen = f"127.0.0.1:{free_port()}"
    sup = Supervisor(routed_to("blue", blue, green, listen=listen))
    channel = await sup.open()
    # Certificates (none: a plain listener) may come before the first table.
    channel.send(certs_message(0, ()))
    channel.send(sup.table(sup.config))
    assert await sup.recv() == {"op": OP_READY, "generation": 1, "pid": os.getpid()}
    status, headers = await fetch(sup.port, "/one")
    assert (status, headers["x-upstream"]) == (200, "blue")
    # The worker's own Via name: one per running Turnout, no host name in it.
    assert VIA.match(headers["via"])

    # Messages are applied in order: the health set before the stats request after it.
    channel.send(health_message([("blue", blue.address)]))
    channel.send({"op": OP_STATS, "id": 7})
    answer = await sup.recv()
    assert (answer["op"], answer["id"]) == (OP_STATS, 7)
    data = answer["data"]
    assert (data["generation"], data["pid"]) == (1, os.getpid())
    endpoints = {e["upstream"]: e for e in data["endpoints"]}
    assert endpoints["blue"]["active_up"] is False
    assert endpoints["green"]["active_up"] is True
    assert [(r["route"], r["upstream"], r["count"]) for r in data["routes"]] == [("all", "blue", 1)]

    # A later table is acknowledged with `applied` and in force for the next request.
    channel.send(sup.table(routed_to("green", blue, green, listen=listen)))
    assert await sup.recv() == {"op": OP_APPLIED, "generation": 2}
    status, headers = await fetch(sup.port, "/two")
    assert (status, headers["x-upstream"]) == (200, "green")
    # Renewed certificates after the first table: nothing to renew on a plain listener.
    channel.send(certs_message(1, ()))

    # The supervisor goes away: nobody will send SIGTERM, so the worker drains by itself.
    channel.close()
    assert await sup.exit_code() == 0
    assert "supervisor went away; shutting down" in caplog.text
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sup.port), timeout=1.0).close()


async def test_a_broken_control_channel_ends_the_worker_with_1(
    blue: EchoUpstream, green: EchoUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(routed_to("blue", blue, green, listen=f"127.0.0.1:{free_port()}"))
    channel = await sup.open()
    channel.send(sup.table(sup.config))
    assert (await sup.recv())["op"] == OP_READY
    channel.send_encoded(b"this is not json\n")
    assert await sup.exit_code() == 1
    assert "control channel failed" in caplog.text
    channel.close()


async def test_sigterm_drains_the_worker_and_exits_0(
    blue: EchoUpstream, green: EchoUpstream
) -> None:
    sup = Supervisor(routed_to("blue", blue, green, listen=f"127.0.0.1:{free_port()}"))
    channel = await sup.open()
    channel.send(sup.table(sup.config))
    # `ready` comes from the control loop, started after the signal handlers are in place.
    assert (await sup.recv())["op"] == OP_READY
    os.kill(os.getpid(), signal.SIGTERM)
    assert await sup.exit_code() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sup.port), timeout=1.0).close()
    channel.close()


# -- drain ------------------------------------------------------------------------------------


def in_flight(turnout: InProcessTurnout) -> int:
    return turnout.call_soon(lambda: sum(not c.is_idle() for c in turnout.ctx.acceptor.connections))


def stop_in_background(turnout: InProcessTurnout) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    stopper = threading.Thread(target=lambda: codes.append(turnout.stop()), daemon=True)
    stopper.start()
    return stopper, codes


@pytest.fixture
def draining(blue: EchoUpstream, green: EchoUpstream) -> Iterator[InProcessTurnout]:
    config = routed_to("blue", blue, green, drain={"shutdown": "5s"})
    with start_inprocess(config) as turnout:
        yield turnout


def test_drain_finishes_a_request_in_flight_and_refuses_new_connections(
    draining: InProcessTurnout,
) -> None:
    with RawConnection(draining.port) as conn:
        conn.send(build_request("GET", "/slow?ms=700"))
        wait_until(lambda: in_flight(draining) == 1, what="the request in flight")
        stopper, codes = stop_in_background(draining)
        # The listener closes first: a new connection is refused while the request runs.
        wait_until(
            lambda: not draining.call_soon(lambda: draining.ctx.acceptor.listeners), what="close"
        )
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", draining.port), timeout=1.0).close()
        _, response = conn.read_final_response()
        assert response.status == 200
        assert response.header("connection") == "close"
        assert conn.wait_closed(5.0)
    stopper.join(DEADLINE)
    assert codes == [0]


def test_drain_serves_a_request_waiting_in_the_backlog(draining: InProcessTurnout) -> None:
    # Not accepting (as when max_connections is reached): the connection completes into the
    # kernel's backlog and its request waits there when the drain closes the listener.
    draining.call_soon(draining.ctx.acceptor.stop_accepting)
    with RawConnection(draining.port) as conn:
        conn.send(build_request("GET", "/queued"))
        stopper, codes = stop_in_background(draining)
        _, response = conn.read_final_response()
        assert response.status == 200
        assert response.header("connection") == "close"
    stopper.join(DEADLINE)
    assert codes == [0]


def test_a_refusing_listener_completes_no_new_connection_but_keeps_its_backlog() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as queued:
            queued.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert refuse_new_connections(listener)
            # The SYN is dropped: the connection never completes, so closing the listener
            # below cannot reset a client that already sent its request.
            with pytest.raises(TimeoutError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            listener.setblocking(False)
            taken, _ = listener.accept()
            with taken:
                assert taken.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
            with pytest.raises(BlockingIOError):
                listener.accept()
    # Closed: a client trying again is refused at once.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()


def test_drain_cuts_what_still_runs_at_the_deadline() -> None:
    release = threading.Event()

    def answer_when_released(conn: Connection) -> None:
        if release.wait(DEADLINE):
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    held = ScriptedUpstream(answer_when_released)
    config: dict[str, Any] = {
        "drain": {"shutdown": "200ms"},
        "upstreams": {"held": {"endpoints": [held.address]}},
        "routes": [{"name": "all", "split": {"held": 100}}],
    }
    try:
        with start_inprocess(config) as turnout, RawConnection(turnout.port) as conn:
            conn.send(build_request("GET", "/held"))
            wait_until(lambda: len(held.heads) == 1, what="the request at the upstream")
            assert turnout.stop() == 0
            assert conn.wait_closed(1.0)
            assert not conn.buffered, "a cut request must not look answered"
            assert "cutting 1 request(s) still running at the deadline" in turnout.stderr_text()
    finally:
        release.set()
        held.close()


def test_drain_closes_idle_keep_alive_clients_after_the_grace(
    draining: InProcessTurnout,
) -> None:
    with RawConnection(draining.port) as conn:
        assert conn.request("GET", "/idle").status == 200
        # Idle for less than the grace: it may be sending a request right now, so it is not
        # closed at once, but once it has been idle that long.
        stopper, codes = stop_in_background(draining)
        assert conn.wait_closed(DRAIN_IDLE_GRACE + 3.0)
        assert not conn.buffered
    stopper.join(DEADLINE)
    assert codes == [0]


async def test_drain_tells_a_websocket_to_go_away(draining: InProcessTurnout) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{draining.url}/ws") as ws,
    ):
        await ws.send_str("before")
        assert (await ws.receive(timeout=DEADLINE)).data == "before"
        stopping = asyncio.get_running_loop().run_in_executor(None, draining.stop)
        message = await ws.receive(timeout=DEADLINE)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert message.data == 1001
        assert await asyncio.wait_for(stopping, DEADLINE) == 0


# -- out of descriptors -----------------------------------------------------------------------


def test_out_of_descriptors_pauses_accepting_for_a_tick_and_logs_once(
    blue: EchoUpstream, green: EchoUpstream
) -> None:
    with start_inprocess(routed_to("blue", blue, green)) as turnout:
        ctx = turnout.ctx
        shortage = OSError(errno.EMFILE, "Too many open files")

        def short() -> bool:
            ctx.resource_shortage(shortage)
            return ctx.acceptor.accepting

        assert turnout.call_soon(short) is False
        # A client connecting meanwhile waits in the backlog and is served after the pause.
        assert get(turnout.port, "/after").status == 200
        assert turnout.call_soon(lambda: ctx.acceptor.accepting) is True
        assert turnout.call_soon(short) is False
        wait_until(
            lambda: turnout.call_soon(lambda: ctx.acceptor.accepting), what="accepting again"
        )
        lines = [
            line for line in turnout.stderr_text().splitlines() if "out of file descriptors" in line
        ]
        # Two shortages within LOG_EVERY: one line (a peer can provoke this at will).
        assert len(lines) == 1, lines
        assert "out of file descriptors (Too many open files)" in lines[0]


# -- TLS listener -----------------------------------------------------------------------------


def tls_get(port: int, ca: trustme.CA, server_name: str) -> tuple[int, dict[str, Any]]:
    """GET / over TLS: the status and the server certificate's fields."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(build_request("GET", "/tls", [("Connection", "close")], host=server_name))
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        cert = tls.getpeercert()
    assert cert is not None
    return int(data.split(b" ", 2)[1]), dict(cert)


def names(cert: dict[str, Any]) -> list[str]:
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


def test_a_tls_listener_serves_renewed_certificates_to_new_handshakes(
    blue: EchoUpstream, green: EchoUpstream, tmp_path: Path
) -> None:
    ca = trustme.CA()
    first = write_pair(ca, tmp_path, "first", "api.example.test")
    address = f"127.0.0.1:{free_port()}"
    tls = {"certificates": [first.config()]}
    config = routed_to("blue", blue, green, listen=[{"address": address, "tls": tls}])
    with start_inprocess(config, access_log=True) as turnout:
        status, cert = tls_get(turnout.port, ca, "api.example.test")
        assert status == 200
        assert names(cert) == ["api.example.test"]

        # A renewal: the same files, new bytes (also valid for a second name).
        renewed = write_pair(ca, tmp_path, "first", "api.example.test", "new.example.test")
        assert renewed == first
        listener = turnout.ctx.generation.table.spec.all_listeners()[0]
        assert listener.tls is not None
        material = read_material(address, listener.tls)
        turnout.call_soon(lambda: turnout.ctx.renew_certificates({address: material}))
        status, cert = tls_get(turnout.port, ca, "api.example.test")
        assert status == 200
        assert names(cert) == ["api.example.test", "new.example.test"]

        # Bytes that do not load are refused with an error; the renewed set stays in force.
        broken = ListenerMaterial(address, ((b"not a certificate", b"not a key"),), None)
        turnout.call_soon(lambda: turnout.ctx.renew_certificates({address: broken}))
        assert "renewed certificates not loaded" in turnout.stderr_text()
        status, cert = tls_get(turnout.port, ca, "api.example.test")
        assert names(cert) == ["api.example.test", "new.example.test"]

        # The access log says how the client connected.
        assert turnout.stop() == 0
        entries = [e for e in turnout.access_log() if e["path"] == "/tls"]
        assert len(entries) == 3
        assert {e["tls_version"] for e in entries} == {"TLSv1.3"}
        assert {e["sni"] for e in entries} == {"api.example.test"}


def test_a_stalled_tls_handshake_takes_no_slot_for_long(
    blue: EchoUpstream, green: EchoUpstream, tmp_path: Path
) -> None:
    ca = trustme.CA()
    pair: PemPair = write_pair(ca, tmp_path, "api", "api.example.test")
    address = f"127.0.0.1:{free_port()}"
    config = routed_to(
        "blue",
        blue,
        green,
        listen=[{"address": address, "tls": {"certificates": [pair.config()]}}],
        timeouts={"client_keepalive": "300ms"},
    )
    with start_inprocess(config) as turnout, RawConnection(turnout.port) as conn:
        # Connected, then silent: no ClientHello. The handshake is bounded by client_keepalive.
        wait_until(
            lambda: turnout.call_soon(lambda: turnout.ctx.acceptor.adopting) == 1, what="adopt"
        )
        assert conn.wait_closed(5.0)
        wait_until(
            lambda: turnout.call_soon(lambda: turnout.ctx.acceptor.adopting) == 0, what="slot"
        )
        status, _ = tls_get(turnout.port, ca, "api.example.test")
        assert status == 200


# -- health sets from the supervisor ------------------------------------------------------------


def served(turnout: InProcessTurnout, count: int) -> Counter[str]:
    with RawConnection(turnout.port) as conn:
        return Counter(
            conn.request("GET", f"/h/{index}").header("x-upstream") or "" for index in range(count)
        )


def test_endpoints_down_by_health_checks_get_no_traffic_across_reloads(
    blue: EchoUpstream, green: EchoUpstream
) -> None:
    def config(route: str) -> dict[str, Any]:
        return {
            "upstreams": {"both": {"endpoints": [blue.address, green.address]}},
            "routes": [{"name": route, "split": {"both": 100}}],
        }

    with start_inprocess(config("all")) as turnout:
        assert set(served(turnout, 40)) == {"blue", "green"}
        turnout.set_down([("both", blue.address)])
        assert served(turnout, 20) == Counter({"green": 20})
        # A new table keeps the health the supervisor last sent.
        turnout.reload(config("renamed"))
        assert served(turnout, 20) == Counter({"green": 20})
        # Every endpoint down: fail open (all are tried anyway), and counted.
        turnout.set_down([("both", blue.address), ("both", green.address)])
        assert served(turnout, 10).total() == 10
        assert turnout.stats()["fail_open"] == {"both": 10}
        turnout.set_down([])
        assert set(served(turnout, 40)) == {"blue", "green"}


# -- what a reload keeps and what it lets go ----------------------------------------------------


def test_an_endpoint_a_reload_removes_finishes_its_requests_within_drain_reload(
    blue: EchoUpstream,
) -> None:
    release = threading.Event()
    cut: list[bool] = []

    def hold_then_answer(conn: Connection) -> None:
        # `/slow` is answered only once released; anything else at once. Then: did the
        # proxy close this connection (EOF) while we held it?
        if b"/slow" in conn.head:
            release.wait(DEADLINE)
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.sock.settimeout(DEADLINE)
        with contextlib.suppress(OSError):
            while conn.sock.recv(65536):
                pass
        cut.append(True)

    old = ScriptedUpstream(hold_then_answer)
    first: dict[str, Any] = {
        "upstreams": {"old": {"endpoints": [old.address]}},
        "routes": [{"name": "all", "split": {"old": 100}}],
    }
    second: dict[str, Any] = {
        "drain": {"reload": "5s"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    try:
        with start_inprocess(first) as turnout, RawConnection(turnout.port) as busy:
            busy.send(build_request("GET", "/slow"))
            wait_until(lambda: len(old.heads) == 1, what="the held request at `old`")
            # A second connection to `old`, idle in the pool once answered.
            assert get(turnout.port, "/a").body == b"ok"
            turnout.reload(second)
            # The idle pooled connection is closed at once; nothing new goes to `old`...
            wait_until(lambda: len(cut) == 1, what="the idle connection to `old` closed")
            assert get(turnout.port, "/b").header("x-upstream") == "blue"
            # ...and the request still on it is answered in full within drain.reload.
            release.set()
            _, response = busy.read_final_response()
            assert (response.status, response.body) == (200, b"ok")
            wait_until(lambda: len(cut) == 2, what="the busy connection closed after its request")
            assert [e["upstream"] for e in turnout.stats()["endpoints"]] == ["blue"]
    finally:
        release.set()
        old.close()


def test_a_request_on_a_removed_endpoint_past_drain_reload_is_cut(blue: EchoUpstream) -> None:
    release = threading.Event()

    def hold(conn: Connection) -> None:
        if release.wait(DEADLINE):
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    old = ScriptedUpstream(hold)
    first: dict[str, Any] = {
        "upstreams": {"old": {"endpoints": [old.address]}},
        "routes": [{"name": "all", "split": {"old": 100}}],
    }
    second: dict[str, Any] = {
        "drain": {"reload": "300ms"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    try:
        with start_inprocess(first) as turnout, RawConnection(turnout.port) as busy:
            busy.send(build_request("GET", "/held"))
            wait_until(lambda: len(old.heads) == 1, what="the held request at `old`")
            turnout.reload(second)
            # drain.reload passes with the request still running: it is cut, and a cut
            # response must look broken (no made-up answer).
            assert busy.wait_closed(5.0)
            assert busy.buffered == b""
            assert get(turnout.port, "/b").header("x-upstream") == "blue"
    finally:
        release.set()
        old.close()


def test_a_reload_keeps_the_mirror_counters_of_a_route_that_stays(
    blue: EchoUpstream, green: EchoUpstream
) -> None:
    def config(via: str) -> dict[str, Any]:
        return {
            "via": via,
            "upstreams": {
                "blue": {"endpoints": [blue.address]},
                "green": {"endpoints": [green.address]},
            },
            "routes": [
                {"name": "all", "split": {"blue": 100}, "mirror": {"to": "green", "percent": 100}}
            ],
        }

    def sent() -> int:
        (mirror,) = turnout.stats()["mirror"]
        return int(mirror["outcomes"].get("sent", 0))

    with start_inprocess(config("one")) as turnout:
        for index in range(3):
            assert get(turnout.port, f"/m/{index}").status == 200
        wait_until(lambda: sent() == 3, what="three copies sent")
        turnout.reload(config("two"))
        assert sent() == 3
        assert get(turnout.port, "/m/after").header("via") == "1.1 two"
        wait_until(lambda: sent() == 4, what="the fourth copy counted with the others")


def test_an_idle_keep_alive_client_is_closed_after_client_keepalive(
    blue: EchoUpstream, green: EchoUpstream
) -> None:
    config = routed_to("blue", blue, green, timeouts={"client_keepalive": "200ms"})
    with start_inprocess(config) as turnout, RawConnection(turnout.port) as conn:
        assert conn.request("GET", "/once").status == 200
        # The sweep runs once a second: closed within about a second of the timeout.
        assert conn.wait_closed(3.0)
        assert conn.buffered == b""
        assert turnout.stats()["connections"] == 0
