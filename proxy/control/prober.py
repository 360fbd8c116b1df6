"""Active health checks, run by the supervisor: one probe loop per checked endpoint.

Every `interval` each endpoint of an upstream with a `health` block gets `GET path` with a
`timeout`; a 2xx or 3xx answer passes, anything else (another status, a refused or reset
connection, the timeout) fails. `proxy.core.health` turns the results into up/down with the
consecutive thresholds. Whenever the set of down endpoints changes, `on_change` is called with
the new set; the supervisor sends it to every worker.

`update` is called with each new table: loops of endpoints that stay keep running (their state
too), loops of removed endpoints stop, new endpoints start up (optimistic) and are checked at
once. A changed `health` block restarts the endpoint's loop with the new settings but keeps its
state. An upstream with `tls` is checked over TLS with the same settings as the data plane
(CA, server name, client certificate, verification); a failed handshake fails the check.

An upstream reached over HTTP/2 (`protocol: h2c | h2`) is checked over HTTP/2 the same way
(`GET path` on a fresh connection, h2c with prior knowledge or TLS with ALPN `h2`): such a
server may not speak HTTP/1.1 at all (a gRPC server does not).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

import aiohttp
import h2.config
import h2.connection
import h2.events
import h2.exceptions

from proxy.core.health import (
    EndpointHealth,
    EndpointKey,
    carry_over,
    checked_endpoints,
    down_set,
    record,
)
from proxy.core.spec import ConfigSpec, HealthCheck, UpstreamTls
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import TlsFileError, client_context

log = logging.getLogger("turnout.prober")

USER_AGENT = "turnout-health-check"


class Prober:
    """Runs the active health checks of the table in force and tracks each endpoint's state."""

    def __init__(self, on_change: Callable[[frozenset[EndpointKey]], None]) -> None:
        self._on_change = on_change
        self._tasks = TaskSet("prober")
        # What each loop was started with: its check, its upstream's `tls` and protocol.
        self._loops: dict[
            EndpointKey, tuple[HealthCheck, UpstreamTls | None, str, asyncio.Task[None]]
        ] = {}
        self._states: dict[EndpointKey, EndpointHealth] = {}
        self._down: frozenset[EndpointKey] = frozenset()
        self._session: aiohttp.ClientSession | None = None

    @property
    def down(self) -> frozenset[EndpointKey]:
        """Endpoints that fail their active checks now."""
        return self._down

    def update(self, spec: ConfigSpec) -> None:
        """Start, keep, restart or stop probe loops for the endpoints `spec` checks."""
        wanted = checked_endpoints(spec)
        tls_of = {upstream.name: upstream.effective_tls for upstream in spec.upstreams}
        protocol_of = {upstream.name: upstream.protocol for upstream in spec.upstreams}
        for key, (check, tls, protocol, task) in list(self._loops.items()):
            if (
                wanted.get(key) != check
                or tls_of.get(key[0]) != tls
                or protocol_of.get(key[0]) != protocol
            ):
                task.cancel()
                del self._loops[key]
        self._states = carry_over(self._states, wanted)
        for key, check in wanted.items():
            if key not in self._loops:
                tls = tls_of.get(key[0])
                protocol = protocol_of.get(key[0], "http1")
                task = self._tasks.spawn(
                    self._probe_loop(key, check, tls, protocol), name=f"probe-{key[1]}"
                )
                self._loops[key] = (check, tls, protocol, task)
        self._publish()

    async def close(self) -> None:
        """Stop every loop and close the HTTP client."""
        self._loops.clear()
        await self._tasks.cancel_all(2.0)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _publish(self) -> None:
        down = down_set(self._states)
        if down != self._down:
            self._down = down
            self._on_change(down)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # One connection per check: a check also proves that the endpoint accepts
            # connections, and no pooled connection can go stale between checks.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                headers={"User-Agent": USER_AGENT},
                auto_decompress=False,
            )
        return self._session

    async def _probe_loop(
        self, key: EndpointKey, check: HealthCheck, tls: UpstreamTls | None, protocol: str
    ) -> None:
        loop = asyncio.get_running_loop()
        url = f"{'https' if tls else 'http'}://{key[1]}{check.path}"
        context: ssl.SSLContext | None = None
        server_name: str | None = None
        broken: str | None = None
        if tls is not None:
            try:
                context = client_context(tls)
            except TlsFileError as exc:
                broken = str(exc)  # the files changed since the config was checked
            host = key[1].rpartition(":")[0].strip("[]")
            server_name = tls.server_name or host
        due = loop.time()
        while True:
            if broken is not None:
                failure: str | None = broken
            else:
                failure = (
                    await self.probe(url, check.timeout, context, server_name)
                    if protocol == "http1"
                    else await self.probe_h2(
                        key[1], check.path, check.timeout, context, server_name
                    )
                )
            before = self._states.get(key)
            if before is None:
                # The endpoint left the table while the check ran.
                return
            after = record(before, failure is None, check)
            self._states[key] = after
            if after.up != before.up:
                if after.up:
                    log.warning(
                        "endpoint %s of %s is up again: GET %s passed %d checks in a row",
                        key[1],
                        key[0],
                        check.path,
                        check.healthy_after,
                    )
                else:
                    log.warning(
                        "endpoint %s of %s is down: GET %s failed %d checks in a row (last: %s)",
                        key[1],
                        key[0],
                        check.path,
                        check.unhealthy_after,
                        failure,
                    )
                self._publish()
            # Keep the cadence from drifting by the checks' own duration.
            due = max(due + check.interval, loop.time())
            await asyncio.sleep(due - loop.time())

    # The check's timeout is configuration, so it is a parameter.
    async def probe(
        self,
        url: str,
        timeout: float,  # noqa: ASYNC109
        context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> str | None:
        """One check: None when it passes (2xx or 3xx within `timeout`), else why it failed.

        `context` and `server_name`: TLS settings for an https `url`.
        """
        try:
            async with self._client().get(
                url,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
                ssl=context if context is not None else True,
                server_hostname=server_name,
            ) as response:
                if 200 <= response.status < 400:
                    return None
                return f"status {response.status}"
        except TimeoutError:
            return f"no answer within {timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return str(exc) or type(exc).__name__

    async def probe_h2(
        self,
        address: str,
        path: str,
        timeout: float,  # noqa: ASYNC109
        context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> str | None:
        """One check over HTTP/2 on a fresh connection: None when `GET path` gets 2xx or 3xx
        within `timeout`, else why it failed. With `context`, TLS whose ALPN must pick h2."""
        host, _, port = address.rpartition(":")
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host.strip("[]"),
                    int(port),
                    ssl=_h2_context(context),
                    server_hostname=server_name if context is not None else None,
                )
                try:
                    return await _h2_exchange(reader, writer, address, path, context is not None)
                finally:
                    writer.close()
        except TimeoutError:
            return f"no answer within {timeout:g}s"
        except (OSError, h2.exceptions.ProtocolError) as exc:
            return str(exc) or type(exc).__name__


def _h2_context(context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    # The shared context offers what client_context gives; an HTTP/2 check must offer h2 only.
    if context is not None:
        context.set_alpn_protocols(["h2"])
    return context


async def _h2_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str, path: str, tls: bool
) -> str | None:
    if tls:
        sslobj = writer.get_extra_info("ssl_object")
        chosen = sslobj.selected_alpn_protocol() if sslobj is not None else None
        if chosen != "h2":
            return f"the endpoint did not select h2 by ALPN (it chose {chosen or 'nothing'})"
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (b":method", b"GET"),
            (b":scheme", b"https" if tls else b"http"),
            (b":authority", authority.encode("latin-1")),
            (b":path", path.encode("latin-1")),
            (b"user-agent", USER_AGENT.encode()),
        ],
        end_stream=True,
    )
    while True:
        writer.write(conn.data_to_send())
        await writer.drain()
        data = await reader.read(65536)
        if not data:
            return "the connection closed before a response"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                status = dict(event.headers or []).get(b":status", b"0")
                code = int(status) if status.isdigit() else 0
                return None if 200 <= code < 400 else f"status {code}"
            if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                return f"stream reset ({event.error_code!s})"
            if isinstance(event, h2.events.ConnectionTerminated):
                return f"GOAWAY before a response ({event.error_code!s})"
