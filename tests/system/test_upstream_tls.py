"""TLS from Turnout to upstreams (contract section 10): data plane, health checks, mirror.

The upstreams are aiohttp servers with an ssl context, certificates made by trustme.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until
from tests.support.certs import write_ca, write_pair
from tests.support.rawhttp import get
from tests.support.turnout import TurnoutFactory, TurnoutProcess, free_port
from tests.support.upstreams import EchoUpstream, UpstreamHost, pattern_bytes

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class TlsEchoUpstream(EchoUpstream):
    """The echo upstream, served over TLS with `context`."""

    def __init__(self, name: str, context: ssl.SSLContext) -> None:
        super().__init__(name)
        self.context = context
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_response_prepare.append(self._tag)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def servers(
    upstream_host: UpstreamHost, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, TlsEchoUpstream]]:
    """Two TLS endpoints for `blue` (certificate for blue.internal) and one `shadow`."""
    folder = tmp_path_factory.mktemp("upstream-certs")
    started: dict[str, TlsEchoUpstream] = {}
    for name, host in (("blue1", "blue.internal"), ("blue2", "blue.internal"), ("shadow", "s")):
        pair = write_pair(ca, folder, name, host)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(pair.cert), str(pair.key))
        server = TlsEchoUpstream(name, context)
        upstream_host.call(server.start())
        started[name] = server
    yield started
    for server in started.values():
        upstream_host.call(server.stop())


def scrape(proc: TurnoutProcess) -> Samples:
    with urllib.request.urlopen(f"{proc.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(proc: TurnoutProcess, name: str, **labels: str) -> float:
    return scrape(proc).get((name, frozenset(labels.items())), 0.0)


def config(
    servers: dict[str, TlsEchoUpstream], tls: dict[str, Any], **route: Any
) -> dict[str, Any]:
    return {
        "upstreams": {
            "blue": {
                "endpoints": [servers["blue1"].address, servers["blue2"].address],
                "tls": tls,
            },
        },
        "routes": [{"name": "all", "split": {"blue": 100}, **route}],
    }


def test_upstream_tls_verified_with_the_given_ca_and_name(
    turnout_factory: TurnoutFactory,
    servers: dict[str, TlsEchoUpstream],
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    ca_file = write_ca(ca, tmp_path / "internal-ca.pem")
    tls = {"ca": str(ca_file), "server_name": "blue.internal"}
    settings = config(servers, tls, mirror={"to": "shadow", "percent": 100})
    settings["upstreams"]["blue"]["health"] = {
        "path": "/ready",
        "interval": "200ms",
        "timeout": "2s",
        "unhealthy_after": 1,
        "healthy_after": 1,
    }
    settings["upstreams"]["shadow"] = {
        "endpoints": [servers["shadow"].address],
        "tls": {"ca": str(ca_file), "server_name": "s"},
    }
    turnout = turnout_factory(settings)
    before = servers["shadow"].requests
    response = get(turnout.port, "/over-tls")
    assert response.status == 200
    echo = orjson.loads(response.body)
    assert echo["upstream"] in ("blue1", "blue2")
    assert echo["path"] == "/over-tls"
    # The mirror reached its TLS shadow, and health checks pass over TLS.
    wait_until(lambda: servers["shadow"].requests > before, what="the copy at the TLS shadow")
    wait_until(
        lambda: (
            metric(
                turnout,
                "turnout_mirror_requests_total",
                route="all",
                upstream="shadow",
                outcome="sent",
            )
            == 1
        ),
        what="the copy counted as sent",
    )
    probes = servers["blue1"].requests
    wait_until(lambda: servers["blue1"].requests > probes + 1, what="health checks over TLS")
    for endpoint in ("blue1", "blue2"):
        assert (
            metric(
                turnout,
                "turnout_endpoint_healthy",
                upstream="blue",
                endpoint=servers[endpoint].address,
            )
            == 1
        )
    assert (
        metric(turnout, "turnout_upstream_errors_total", route="all", upstream="blue", kind="tls")
        == 0
    )


def test_wrong_ca_is_a_tls_failure_retried_then_502(
    turnout_factory: TurnoutFactory,
    servers: dict[str, TlsEchoUpstream],
    tmp_path: Path,
) -> None:
    other = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    settings = config(servers, {"ca": str(other), "server_name": "blue.internal"})
    settings["upstreams"]["blue"]["health"] = {
        "path": "/ready",
        "interval": "200ms",
        "timeout": "2s",
        "unhealthy_after": 1,
        "healthy_after": 1,
    }
    turnout = turnout_factory(settings, access_log=True)
    response = get(turnout.port, "/refused")
    assert response.status == 502
    body = orjson.loads(response.body)
    assert body["error"] == "upstream tls failure"
    entry = turnout.wait_for_log({body["request_id"]})[body["request_id"]]
    assert entry["flags"] == "upstream_tls"
    assert entry["attempts"] >= 2  # the other endpoint was tried too
    wait_until(
        lambda: (
            metric(
                turnout, "turnout_upstream_errors_total", route="all", upstream="blue", kind="tls"
            )
            == entry["attempts"]
        ),
        what="each failed handshake counted as kind tls",
    )
    assert (
        metric(
            turnout, "turnout_upstream_errors_total", route="all", upstream="blue", kind="connect"
        )
        == 0
    )
    # Health checks fail the same handshake.
    wait_until(
        lambda: (
            metric(
                turnout,
                "turnout_endpoint_healthy",
                upstream="blue",
                endpoint=servers["blue1"].address,
            )
            == 0
        ),
        what="blue1 down: its certificate is not trusted",
    )


def test_wrong_server_name_is_refused(
    turnout_factory: TurnoutFactory,
    servers: dict[str, TlsEchoUpstream],
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    ca_file = write_ca(ca, tmp_path / "internal-ca.pem")
    turnout = turnout_factory(
        config(servers, {"ca": str(ca_file), "server_name": "green.internal"})
    )
    assert get(turnout.port, "/").status == 502


def test_verify_false_accepts_an_untrusted_certificate(
    turnout_factory: TurnoutFactory, servers: dict[str, TlsEchoUpstream]
) -> None:
    # The system trust store does not know the test CA: only `verify: false` gets through.
    turnout = turnout_factory(config(servers, {"verify": False}))
    assert get(turnout.port, "/").status == 200
    trusting = turnout_factory(config(servers, {}))
    assert get(trusting.port, "/").status == 502


async def test_websocket_over_tls_on_both_sides(
    turnout_factory: TurnoutFactory,
    servers: dict[str, TlsEchoUpstream],
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    front = write_pair(ca, tmp_path, "front", "api.example.test")
    settings = config(servers, {"ca": str(ca_file), "server_name": "blue.internal"})
    port = free_port()
    settings["listen"] = [
        {"address": f"127.0.0.1:{port}", "tls": {"certificates": [front.config()]}}
    ]
    turnout_factory(settings)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"wss://127.0.0.1:{port}/ws", ssl=client_ctx, server_hostname="api.example.test"
        ) as ws,
    ):
        for index in range(20):
            await ws.send_str(f"over tls {index}")
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.TEXT
            assert message.data == f"over tls {index}"
        payload = pattern_bytes(1024 * 1024, "wss")
        await ws.send_bytes(payload)
        assert (await ws.receive(timeout=10)).data == payload
