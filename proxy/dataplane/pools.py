"""A worker's upstream connection pools, built from each table and kept warm across tables,
and the health that decides which endpoints get requests: active (the supervisor's health
checks send the down set) and passive (an endpoint that keeps failing is ejected a while).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from proxy.core.health import EjectionRule, after_expiry, after_failure, after_success
from proxy.core.spec import UpstreamTls
from proxy.core.table import Table
from proxy.dataplane.h2upstream import H2EndpointPool
from proxy.dataplane.upstream import EndpointPool, UpstreamPool
from proxy.dataplane.writes import WriteBatcher
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import TlsFileError, client_context

log = logging.getLogger("turnout.worker")

# Passive ejection: this many consecutive failures (connect/reset or 5xx) take an endpoint out
# for EJECT_BASE seconds, doubling on each ejection in a row up to EJECT_MAX. After an
# ejection, a full run of failures again; a success during one does not end it (see
# health.EjectionRule).
PASSIVE_FAILURES = 5
EJECT_BASE = 5.0
EJECT_MAX = 60.0
PASSIVE_EJECTION = EjectionRule(
    after=PASSIVE_FAILURES,
    base=EJECT_BASE,
    cap=EJECT_MAX,
    again_after=PASSIVE_FAILURES,
    success_ends=False,
)


class Pools:
    """Every endpoint's pool, by (upstream, address), for the table in force."""

    def __init__(self, index: int, batcher: WriteBatcher, tasks: TaskSet) -> None:
        self._index = index
        self._batcher = batcher
        self._tasks = tasks
        self.endpoints: dict[tuple[str, str], EndpointPool] = {}
        self._client_contexts: dict[tuple[UpstreamTls, str], ssl.SSLContext] = {}
        # Endpoints failing active health checks, from the supervisor.
        self.down: set[tuple[str, str]] = set()

    def build(self, table: Table, now: float) -> dict[str, UpstreamPool]:
        """The upstream pools of `table`: an endpoint that stays keeps its pool (warm
        connections, health); one that goes is drained and closed after drain.reload."""
        endpoints: dict[tuple[str, str], EndpointPool] = {}
        pools: dict[str, UpstreamPool] = {}
        # Client contexts by settings and protocol (ALPN differs): one per distinct pair,
        # kept across tables.
        contexts: dict[tuple[UpstreamTls, str], ssl.SSLContext] = {}
        header_limit = table.spec.limits.max_header_size
        connect_timeout = table.spec.timeouts.connect
        for name, upstream in table.upstreams.items():
            tls = upstream.effective_tls
            protocol = upstream.protocol
            h2 = protocol != "http1"
            context = None
            if tls is not None:
                key = (tls, protocol)
                context = contexts.get(key) or self._client_contexts.get(key)
                if context is None:
                    context = self._client_context(name, tls)
                    # ALPN says which protocol the connection speaks: an `h2` upstream must
                    # select h2, an HTTP/1.1 one is offered nothing else.
                    context.set_alpn_protocols(["h2"] if h2 else ["http/1.1"])
                contexts[key] = context
            members = []
            for endpoint in upstream.endpoints:
                key2 = (name, endpoint.address)
                pool = self.endpoints.get(key2)
                if (
                    pool is None
                    or pool.draining
                    or pool.tls != tls
                    or isinstance(pool, H2EndpointPool) != h2
                ):
                    # A changed `tls` or protocol makes a new pool: no connection of the old
                    # kind is reused.
                    if h2:
                        pool = H2EndpointPool(
                            name,
                            endpoint,
                            self._batcher,
                            tls,
                            context,
                            header_limit,
                            connect_timeout,
                            self._tasks,
                        )
                    else:
                        pool = EndpointPool(name, endpoint, self._batcher, tls, context)
                    pool.active_up = key2 not in self.down
                    pool.refresh(now)
                elif isinstance(pool, H2EndpointPool):
                    # New connections advertise the new table's header list limit.
                    pool.header_limit = header_limit
                    pool.connect_timeout = connect_timeout
                endpoints[key2] = pool
                members.append(pool)
            pools[name] = UpstreamPool(upstream, tuple(members))
        self._client_contexts = contexts
        removed = [pool for key, pool in self.endpoints.items() if endpoints.get(key) is not pool]
        self.endpoints = endpoints
        for pool in removed:
            # Requests already on these endpoints finish; nothing new is sent there.
            pool.drain()
            self._tasks.spawn(
                self._close_later(pool, table.spec.drain.reload), name="drain-endpoint"
            )
        return pools

    def _client_context(self, upstream: str, tls: UpstreamTls) -> ssl.SSLContext:
        try:
            return client_context(tls)
        except TlsFileError as exc:
            # The supervisor checked the files before sending the table; they changed since.
            # Fail closed: only the system's trust store, so nothing goes out unverified.
            log.error("worker %d: upstream %s: %s", self._index, upstream, exc)
            return ssl.create_default_context()

    async def _close_later(self, pool: EndpointPool, seconds: float) -> None:
        await asyncio.sleep(seconds)
        pool.close_all()

    def set_down(self, down: set[tuple[str, str]], now: float) -> None:
        """Endpoints failing active health checks, from the supervisor."""
        self.down = down
        for key, pool in self.endpoints.items():
            pool.active_up = key not in down
            pool.refresh(now)

    def passive_result(self, endpoint: EndpointPool, status: int, now: float) -> None:
        """Outcome of one attempt: 0 for a connect/reset/timeout failure, else the status."""
        state = endpoint.ejection
        if 0 < status < 500:
            endpoint.ejection = after_success(state, PASSIVE_EJECTION)
            return
        endpoint.ejection = after = after_failure(state, now, PASSIVE_EJECTION)
        if after.until != state.until:
            endpoint.refresh(now)
            log.warning(
                "endpoint %s of %s ejected for %.0fs after %d consecutive failures",
                endpoint.address,
                endpoint.upstream,
                after.backoff,
                PASSIVE_FAILURES,
            )

    def sweep(self, now: float) -> None:
        """Close idle upstream connections past their time; end ejections that are over."""
        for pool in self.endpoints.values():
            pool.sweep(now)
            ejection = pool.ejection
            if ejection.until and now >= ejection.until:
                pool.ejection = after_expiry(ejection, now)
                pool.refresh(now)

    def close_all(self) -> None:
        """Close every upstream connection (the worker is exiting)."""
        for pool in self.endpoints.values():
            pool.close_all()
