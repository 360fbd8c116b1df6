"""A worker process: the data plane of one process, driven by the supervisor.

Started by the supervisor as `python -m proxy.dataplane.worker --control-fd FD --index I`. It binds
`listen` with SO_REUSEPORT, applies every table the supervisor sends (compiled here, swapped by
one reference), answers stats requests, and on SIGTERM runs the drain sequence. It never reads
the config file itself: the supervisor is the one source of truth.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import itertools
import logging
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import uvloop

from proxy.core.counters import MirrorStats, RouteUpstreamStats, WorkerSnapshot
from proxy.core.health import EjectionRule, after_expiry, after_failure, after_success
from proxy.core.spec import Listener, Timeouts, UpstreamTls
from proxy.core.table import Table, compile_table
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.http1 import ClientConnection, Exchange, Generation, TlsClientConnection
from proxy.dataplane.upstream import EndpointPool, UpstreamPool
from proxy.dataplane.writes import WriteBatcher
from proxy.runtime.channel import (
    OP_APPLIED,
    OP_CERTS,
    OP_HEALTH,
    OP_READY,
    OP_STATS,
    OP_TABLE,
    ControlChannel,
    material_from_message,
    open_channel,
    parse_split_overrides,
    spec_from_message,
)
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import (
    CertificateSet,
    ListenerMaterial,
    TlsFileError,
    client_context,
    load_material,
    read_material,
)

if TYPE_CHECKING:
    from proxy.dataplane.mirror import Mirrorer

log = logging.getLogger("turnout.worker")

TICK = 0.1
ACCEPT_BATCH = 64

# File descriptors kept aside for what is not a client connection: the listener, the control
# channel, stdio, health checks, the mirror's client. Every client connection may need one
# more descriptor for its upstream connection, so a worker takes at most
# (fd limit - FD_RESERVE) / 2 clients.
FD_RESERVE = 64

# Fewer client connections per worker than this, forced by the fd limit, is worth a warning.
LOW_CAPACITY = 1024

# At shutdown, an idle keep-alive connection is closed at once only if it has been idle this
# long; a client that used its connection more recently may be sending a request right now,
# so that connection gets `Connection: close` on its next response instead (or is closed once
# it has been idle this long).
DRAIN_IDLE_GRACE = 1.0

# At most one line per key in this period for log lines a peer can provoke at will.
LOG_EVERY = 5.0

# How often freed memory is handed back to the OS (after bursts of slow clients, say).
TRIM_EVERY = 10.0

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


def default_via_name() -> str:
    """The received-by name of this Turnout in Via (RFC 9110 section 7.6.3).

    Unique per running instance (host, boot, supervisor process and its start time) and the
    same in all its workers, so a request that comes back to this instance is recognised as a
    loop while a chain of different Turnouts (edge, then sidecar) is not. No host name leaks.
    """
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat", encoding="latin-1") as stat:
            started = stat.read().rsplit(")", 1)[1].split()[19]
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            boot_id = boot.read().strip()
    except (OSError, IndexError):
        started, boot_id = "", ""
    seed = f"{socket.gethostname()}|{boot_id}|{parent}|{started}".encode()
    return "turnout-" + hashlib.blake2b(seed, digest_size=6).hexdigest()


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def client_capacity(fd_limit: int) -> int:
    """How many client connections a worker can hold with `fd_limit` descriptors."""
    return max(1, (fd_limit - FD_RESERVE) // 2)


def bind_listener(listener: Listener) -> socket.socket:
    """A listening socket on `listener`'s address, with SO_REUSEPORT (shared by all workers)."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listener.host, listener.port))
    sock.listen(1024)
    return sock


class BoundListener:
    """One listening socket of this worker and, on a TLS listener, its certificates."""

    __slots__ = ("address", "certificates", "sock", "tls")

    def __init__(self, sock: socket.socket, listener: Listener) -> None:
        self.sock = sock
        self.address = listener.address
        self.tls = listener.tls
        # Replaced whole on renewal: a new handshake takes the set in force when it begins.
        self.certificates: CertificateSet | None = None


class WorkerContext:
    """The state of one worker shared by its connections: the current generation and timers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        access_log: bool,
        fd_limit: int = 1 << 20,
        via_name: str = "turnout",
    ) -> None:
        self.loop = loop
        self.index = index
        self.now = loop.time()
        self.fd_limit = fd_limit
        # limits.max_connections, lowered to what the fd limit allows (see apply).
        self.max_clients = client_capacity(fd_limit)
        # The Via name of a config without `via` (see Generation).
        self.default_via = via_name
        self._logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._last_trim = self.now
        self.short_until = 0.0  # out of descriptors: no accepting before this time
        self._trim: Callable[[int], int] | None = _malloc_trim()
        self.tasks = TaskSet(f"worker-{index}")
        self.batcher = WriteBatcher(loop)
        self.access_log = AccessLog() if access_log else None
        self.generation: Generation = None  # type: ignore[assignment]  # set before serving
        # The timeouts of the generation in force, for what is not part of a request: idle
        # keep-alive clients and TLS handshakes. An exchange reads its own generation's.
        self.timeouts = Timeouts()
        self.connections: set[ClientConnection] = set()
        # Exchanges with a deadline or an idle timeout (added by the data plane); see tick().
        self.watched: set[Exchange] = set()
        self.endpoints: dict[tuple[str, str], EndpointPool] = {}
        self.client_contexts: dict[UpstreamTls, ssl.SSLContext] = {}
        self.tls_material: dict[str, ListenerMaterial] = {}
        self.down: set[tuple[str, str]] = set()
        self.fail_open: dict[str, int] = {}
        self.closing = False
        self.listeners: list[BoundListener] = []
        self.accepting = False
        self.adopting = 0  # accepted sockets whose protocol is not connected yet
        self.idle_event = asyncio.Event()
        self._ticks = 0
        # Request ids: a random prefix per worker process and a counter, unique without a
        # system call per request.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()
        self._mirrorer: Mirrorer | None = None

    def new_request_id(self) -> str:
        """A fresh X-Request-Id (32 hex digits)."""
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def mirrorer(self) -> Mirrorer:
        """The shadow-traffic sender, created on first use (it owns an HTTP client session)."""
        if self._mirrorer is None:
            from proxy.dataplane.mirror import Mirrorer

            self._mirrorer = Mirrorer(self.loop)
        return self._mirrorer

    # ---- tables --------------------------------------------------------------------------

    def apply(self, table: Table) -> None:
        """Swap in a new table; keep warm pools, health and counters of what stays."""
        old = self.generation
        endpoints: dict[tuple[str, str], EndpointPool] = {}
        pools: dict[str, UpstreamPool] = {}
        # Client contexts by settings: one per distinct upstream `tls`, kept across tables.
        contexts: dict[UpstreamTls, ssl.SSLContext] = {}
        for name, upstream in table.upstreams.items():
            tls = upstream.tls
            context = None
            if tls is not None:
                context = contexts.get(tls) or self.client_contexts.get(tls)
                if context is None:
                    context = self._client_context(name, tls)
                contexts[tls] = context
            members = []
            for endpoint in upstream.endpoints:
                key = (name, endpoint.address)
                pool = self.endpoints.get(key)
                if pool is None or pool.draining or pool.tls != tls:
                    # A changed `tls` makes a new pool: no connection of the old kind is reused.
                    pool = EndpointPool(name, endpoint, self.batcher, tls, context)
                    pool.active_up = key not in self.down
                    pool.refresh(self.now)
                endpoints[key] = pool
                members.append(pool)
            pools[name] = UpstreamPool(upstream, tuple(members))
        self.client_contexts = contexts
        removed = [pool for key, pool in self.endpoints.items() if endpoints.get(key) is not pool]
        self.endpoints = endpoints
        carried: dict[tuple[str, str], RouteUpstreamStats] = {}
        if old is not None:
            for per_route in old.stats:
                for counters in per_route.values():
                    carried[(counters.route, counters.upstream)] = counters
        stats = tuple(
            {
                upstream: carried.get((route.name, upstream))
                or RouteUpstreamStats(route.name, upstream)
                for upstream in route.upstreams
            }
            for route in table.routes
        )
        no_route = old.no_route if old is not None else RouteUpstreamStats("", "")
        carried_mirror: dict[tuple[str, str], MirrorStats] = {}
        if old is not None:
            for shadow in old.mirror_stats:
                if shadow is not None:
                    carried_mirror[(shadow.route, shadow.upstream)] = shadow
        mirror_stats = tuple(
            (
                carried_mirror.get((route.name, route.mirror.to))
                or MirrorStats(route.name, route.mirror.to)
            )
            if route.mirror is not None
            else None
            for route in table.routes
        )
        spec = table.spec
        self.generation = Generation(
            table, pools, stats, no_route, mirror_stats, spec.via or self.default_via
        )
        if any(route.mirror is not None for route in table.routes):
            # Create the sender (and import aiohttp) now, not on the first mirrored request.
            self.mirrorer()
        self.timeouts = spec.timeouts
        capacity = client_capacity(self.fd_limit)
        wanted = spec.limits.max_connections
        self.max_clients = min(wanted, capacity)
        if wanted > capacity and (old is None or old.table.spec.limits.max_connections != wanted):
            # A warning when the cap really bites; the default 10,000 against a 20,000-fd limit
            # is worth a line, not an alarm.
            log.log(
                logging.WARNING if capacity < min(wanted, LOW_CAPACITY) else logging.INFO,
                "worker %d: limits.max_connections %d needs about %d file descriptors but the "
                "limit is %d: taking at most %d client connections",
                self.index,
                wanted,
                2 * wanted + FD_RESERVE,
                self.fd_limit,
                capacity,
            )
        for pool in removed:
            # Requests already on these endpoints finish; nothing new is sent there.
            pool.drain()
            self.tasks.spawn(self._close_later(pool, spec.drain.reload), name="drain-endpoint")

    def _client_context(self, upstream: str, tls: UpstreamTls) -> ssl.SSLContext:
        try:
            return client_context(tls)
        except TlsFileError as exc:
            # The supervisor checked the files before sending the table; they changed since.
            # Fail closed: only the system's trust store, so nothing goes out unverified.
            log.error("worker %d: upstream %s: %s", self.index, upstream, exc)
            return ssl.create_default_context()

    async def _close_later(self, pool: EndpointPool, seconds: float) -> None:
        await asyncio.sleep(seconds)
        pool.close_all()

    def set_down(self, down: set[tuple[str, str]]) -> None:
        """Endpoints failing active health checks, from the supervisor."""
        self.down = down
        for key, pool in self.endpoints.items():
            pool.active_up = key not in down
            pool.refresh(self.now)

    # ---- hooks the data plane calls ------------------------------------------------------

    def warn_limited(self, key: str, message: str, *args: object) -> None:
        """Log a warning a peer can provoke at will: at most one per LOG_EVERY per key."""
        now = self.loop.time()
        if now - self._logged.get(key, -LOG_EVERY) < LOG_EVERY:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._logged[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" (and {suppressed} more like it in the last {LOG_EVERY:.0f}s)"
        log.warning(message, *args)

    def resource_shortage(self, exc: OSError) -> None:
        """The worker is out of descriptors: stop accepting for a tick, log (rate-limited)."""
        self.warn_limited(
            "fd",
            "worker %d: out of file descriptors (%s) with %d client connections; "
            "accepting paused (limit %d)",
            self.index,
            exc.strerror,
            len(self.connections),
            self.fd_limit,
        )
        self.short_until = self.loop.time() + TICK
        if self.accepting:
            self.stop_accepting()
            self.loop.call_later(TICK, self._shortage_over)

    def _shortage_over(self) -> None:
        # The timer says the tick is over: loop.time() may read a hair below short_until when
        # it fires (uvloop's timers count whole milliseconds, short_until is a float sum), and
        # a worker with no connection left has nothing else that would resume accepting.
        self.short_until = 0.0
        self._resume_accepting()

    def _resume_accepting(self) -> None:
        if (
            not self.closing
            and self.listeners
            and len(self.connections) + self.adopting < self.max_clients
            and self.loop.time() >= self.short_until
        ):
            self.start_accepting()

    def count_fail_open(self, upstream: str) -> None:
        """No endpoint of `upstream` was healthy: all were tried anyway."""
        self.fail_open[upstream] = self.fail_open.get(upstream, 0) + 1

    def passive_result(self, endpoint: EndpointPool, status: int) -> None:
        """Outcome of one attempt: 0 for a connect/reset/timeout failure, else the status."""
        state = endpoint.ejection
        if 0 < status < 500:
            endpoint.ejection = after_success(state, PASSIVE_EJECTION)
            return
        endpoint.ejection = after = after_failure(state, self.now, PASSIVE_EJECTION)
        if after.until != state.until:
            endpoint.refresh(self.now)
            log.warning(
                "endpoint %s of %s ejected for %.0fs after %d consecutive failures",
                endpoint.address,
                endpoint.upstream,
                after.backoff,
                PASSIVE_FAILURES,
            )

    def connection_opened(self, conn: ClientConnection) -> None:
        """A client connected."""
        self.connections.add(conn)
        if self.closing:
            conn.closing = True
        if len(self.connections) >= self.max_clients:
            self.stop_accepting()

    def connection_closed(self, conn: ClientConnection) -> None:
        """A client connection ended."""
        self.connections.discard(conn)
        if not self.accepting:
            self._resume_accepting()
        self._check_idle()

    def _check_idle(self) -> None:
        if self.closing and not self.connections and not self.adopting:
            self.idle_event.set()

    # ---- listening -----------------------------------------------------------------------

    def listen(
        self,
        listeners: tuple[Listener, ...],
        bind: Callable[[Listener], socket.socket] | None = None,
    ) -> None:
        """Bind every listener with SO_REUSEPORT so every worker shares the ports.

        A TLS listener's certificates come from the bytes of the supervisor's `certs` message,
        which precedes the first table. `bind` replaces `bind_listener` (an in-process test
        harness hands over sockets it bound itself).
        """
        for listener in listeners:
            sock = (bind or bind_listener)(listener)
            sock.setblocking(False)
            bound = BoundListener(sock, listener)
            if listener.tls is not None:
                material = self.tls_material.get(listener.address)
                if material is None:
                    # No certs message (a supervisor that sent none): the files themselves.
                    material = read_material(listener.address, listener.tls)
                bound.certificates = CertificateSet(load_material(listener.tls, material))
            self.listeners.append(bound)
        self.start_accepting()

    def renew_certificates(self, material: dict[str, ListenerMaterial]) -> None:
        """Serve new handshakes with renewed certificates; open connections keep theirs."""
        self.tls_material = material
        for bound in self.listeners:
            fresh = material.get(bound.address)
            if bound.tls is None or fresh is None:
                continue
            try:
                bound.certificates = CertificateSet(load_material(bound.tls, fresh))
            except TlsFileError as exc:
                # The supervisor checked these bytes; keep serving the old ones regardless.
                log.error("worker %d: renewed certificates not loaded: %s", self.index, exc)

    def start_accepting(self) -> None:
        """Watch the listening sockets for new connections."""
        if self.listeners and not self.accepting:
            for bound in self.listeners:
                self.loop.add_reader(bound.sock.fileno(), self._accept, bound)
            self.accepting = True

    def stop_accepting(self) -> None:
        """Leave new connections in the kernel's backlog (max_connections reached, or drain)."""
        if self.listeners and self.accepting:
            for bound in self.listeners:
                self.loop.remove_reader(bound.sock.fileno())
            self.accepting = False

    def _accept(self, bound: BoundListener) -> None:
        listener = bound.sock
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: stop for a tick rather than spin on a full table; the
                # connection waits in the backlog.
                self.resource_shortage(exc)
                return
            self._take(sock, bound)
            if len(self.connections) + self.adopting >= self.max_clients:
                self.stop_accepting()
                return

    def _take(self, sock: socket.socket, bound: BoundListener) -> None:
        sock.setblocking(False)
        self.adopting += 1
        certificates = bound.certificates
        if certificates is None:
            self.tasks.spawn(self._adopt(sock), name="adopt")
        else:
            self.tasks.spawn(self._adopt_tls(sock, certificates.default), name="adopt-tls")

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: ClientConnection(self), sock)
        except OSError:
            sock.close()
        finally:
            self._adopted()

    async def _adopt_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        # The handshake is bounded by client_keepalive: a client that stalls it must not hold
        # a connection slot longer than an idle keep-alive client could.
        try:
            await self.loop.connect_accepted_socket(
                lambda: TlsClientConnection(self),
                sock,
                ssl=context,
                ssl_handshake_timeout=self.timeouts.client_keepalive,
            )
        except (OSError, TimeoutError, ConnectionError):
            # A failed or stalled handshake: nothing was requested, nothing to answer.
            sock.close()
        finally:
            self._adopted()

    def _adopted(self) -> None:
        self.adopting -= 1
        # A connection that closed while others were being adopted may have left room.
        if not self.accepting:
            self._resume_accepting()
        self._check_idle()

    def close_listener(self) -> None:
        """Stop accepting and close the listening sockets: new connections are refused.

        Connections the kernel already completed sit in the backlog, and closing a listener
        would reset them although their clients may have sent a request: they are taken in
        first and served (with `Connection: close`).
        """
        self.stop_accepting()
        listeners = self.listeners
        self.listeners = []
        for bound in listeners:
            while True:
                try:
                    sock, _ = bound.sock.accept()
                except OSError:
                    break
                self._take(sock, bound)
            bound.sock.close()

    # ---- timers --------------------------------------------------------------------------

    async def ticker(self) -> None:
        """Coarse clock, deadlines, idle timeouts and the access-log flush, every TICK."""
        while True:
            await asyncio.sleep(TICK)
            self.tick()

    def tick(self) -> None:
        """One pass of the timers (also called directly by tests)."""
        now = self.loop.time()
        self.now = now
        # Each exchange's idle timeout is that of its own generation (a reload does not move it).
        expired = [
            ex
            for ex in self.watched
            if (ex.deadline and now > ex.deadline)
            or (not ex.deadline and now - ex.last_io > ex.gen.timeouts.idle)
        ]
        for ex in expired:
            self.watched.discard(ex)
            ex.timed_out()
        self._ticks += 1
        if self.closing:
            for conn in [c for c in self.connections if c.is_idle()]:
                if now - conn.idle_since >= DRAIN_IDLE_GRACE:
                    conn.close()
        if self._ticks % 10 == 0:
            keepalive = self.timeouts.client_keepalive
            for conn in [c for c in self.connections if c.is_idle()]:
                if now - conn.idle_since > keepalive:
                    conn.close()
            for pool in self.endpoints.values():
                pool.sweep(now)
                ejection = pool.ejection
                if ejection.until and now >= ejection.until:
                    pool.ejection = after_expiry(ejection, now)
                    pool.refresh(now)
            if self._trim is not None and now - self._last_trim >= TRIM_EVERY:
                # Buffers of many slow clients leave free holes in the heap that glibc (tuned
                # not to trim, see _tune_malloc) would keep for good: return them now and then.
                self._last_trim = now
                self._trim(0)
        if self.access_log is not None:
            self.access_log.flush()

    # ---- stats ---------------------------------------------------------------------------

    def stats_snapshot(self) -> WorkerSnapshot:
        """This worker's counters for the supervisor (only series of the current table), which
        reads them back with `proxy.core.counters.read_worker_snapshot`."""
        gen = self.generation
        # Pairs that never saw a request are left out (the supervisor counts them as zero):
        # a 5,000-route table mostly idle costs little to poll every second.
        routes = [
            s.snapshot()
            for per_route in gen.stats
            for s in per_route.values()
            if s.count or s.in_flight or s.retries or any(s.errors.values())
        ]
        return {
            "generation": gen.table.generation,
            "pid": os.getpid(),
            "routes": routes,
            "no_route": gen.no_route.snapshot(),
            "mirror": [m.snapshot() for m in gen.mirror_stats if m is not None],
            "fail_open": dict(self.fail_open),
            "endpoints": [
                {
                    "upstream": pool.upstream,
                    "endpoint": pool.address,
                    "healthy": pool.healthy,
                    "active_up": pool.active_up,
                    "ejected": bool(pool.ejection.until),
                    "in_flight": pool.in_flight,
                }
                for pool in self.endpoints.values()
            ],
            "connections": len(self.connections),
        }

    # ---- shutdown ------------------------------------------------------------------------

    async def drain(self, delay: float, budget: float) -> None:
        """The shutdown sequence of contract section 6, for this worker."""
        # 1. Keep serving for drain.delay: the supervisor already answers /readyz with 503, so
        #    load balancers stop sending new connections here while we still take them.
        if delay > 0:
            await asyncio.sleep(delay)
        # 2. Close the listener: from now on new connections are refused by the kernel.
        self.closing = True
        self.close_listener()
        # 3. Keep-alive clients idle for DRAIN_IDLE_GRACE are closed now (tick() closes the
        #    others once they have been idle that long); every response from now on carries
        #    `Connection: close`, so a request already on its way is answered, not reset.
        #    WebSockets are told to go away (close frame 1001) rather than held to the deadline.
        now = self.loop.time()
        for conn in list(self.connections):
            conn.closing = True
            if conn.tunnel is not None:
                conn.tunnel.go_away()
            elif conn.is_idle() and now - conn.idle_since >= DRAIN_IDLE_GRACE:
                conn.close()
        # 4. In-flight requests get up to drain.shutdown to finish.
        self._check_idle()
        if not self.idle_event.is_set():
            try:
                async with asyncio.timeout(budget):
                    await self.idle_event.wait()
            except TimeoutError:
                pass
        # 5. Whatever is still running at the deadline is cut, and counted in the log.
        left = [c for c in self.connections if c.current is not None]
        if left:
            log.warning(
                "worker %d: cutting %d request(s) still running at the deadline",
                self.index,
                len(left),
            )
        for conn in list(self.connections):
            conn.abort()
        for pool in self.endpoints.values():
            pool.close_all()
        if self._mirrorer is not None:
            await self._mirrorer.close()
        if self.access_log is not None:
            self.access_log.flush()


def table_from_message(msg: Mapping[str, Any]) -> Table:
    """Compile the table of a supervisor's `table` message (see proxy.runtime.channel)."""
    return compile_table(
        spec_from_message(msg),
        generation=int(msg["generation"]),
        sha256=str(msg["sha256"]),
        split_overrides=parse_split_overrides(msg.get("split_overrides")),
    )


async def shutdown(ctx: WorkerContext) -> None:
    """Drain with the drain settings of the table in force (after a stop was asked for)."""
    gen = ctx.generation
    drain = gen.table.spec.drain if gen is not None else None
    await ctx.drain(drain.delay if drain else 0.0, drain.shutdown if drain else 0.0)


async def _control_loop(ctx: WorkerContext, channel: ControlChannel, stop: asyncio.Event) -> None:
    ready = False
    while True:
        msg = await channel.recv()
        if msg is None:
            # The supervisor is gone: nobody will ever send SIGTERM, so drain on our own.
            log.error("worker %d: supervisor went away; shutting down", ctx.index)
            stop.set()
            return
        op = msg.get("op")
        if op == OP_TABLE:
            table = table_from_message(msg)
            ctx.apply(table)
            if not ready:
                ctx.listen(table.spec.all_listeners())
                ready = True
                channel.send({"op": OP_READY, "generation": table.generation, "pid": os.getpid()})
            else:
                channel.send({"op": OP_APPLIED, "generation": table.generation})
        elif op == OP_CERTS:
            material = material_from_message(msg)
            if ready:
                ctx.renew_certificates(material)
            else:
                ctx.tls_material = material
        elif op == OP_HEALTH:
            ctx.set_down({(str(u), str(e)) for u, e in msg.get("down", [])})
        elif op == OP_STATS:
            channel.send({"op": OP_STATS, "id": msg.get("id"), "data": ctx.stats_snapshot()})


async def serve(control_fd: int, index: int, access_log: bool) -> int:
    """Run one worker until it is told to stop; returns the exit code."""
    loop = asyncio.get_running_loop()
    ctx = WorkerContext(loop, index, access_log, raise_fd_limit(), default_via_name())
    sock = socket.socket(fileno=control_fd)
    channel = await open_channel(sock)
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            # A second signal means now.
            os._exit(1)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    control = ctx.tasks.spawn(_control_loop(ctx, channel, stop), name="control")
    ticker = ctx.tasks.spawn(ctx.ticker(), name="ticker")
    stopped = ctx.tasks.spawn(stop.wait(), name="stop")
    await asyncio.wait([control, stopped], return_when=asyncio.FIRST_COMPLETED)
    if control.done() and not stop.is_set():
        exc = control.exception()
        log.error("worker %d: control channel failed: %r", index, exc)
        return 1
    await shutdown(ctx)
    ticker.cancel()
    control.cancel()
    channel.close()
    return 0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def _tune_malloc() -> None:
    """Keep glibc from returning freed body buffers to the OS after every request.

    Streamed bodies pass through 64-256 KiB bytes objects; with glibc's defaults each one is
    carved from and trimmed back to the heap top, a brk() pair per chunk (measured: ~3 per
    1 MiB upload). Raising the trim and mmap thresholds keeps a few MiB of heap warm instead.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 4 * 1024 * 1024)
    mallopt(m_trim_threshold, 16 * 1024 * 1024)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process."""
    _tune_malloc()
    parser = argparse.ArgumentParser(prog="turnout-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s worker[{args.index}] %(levelname)s %(name)s: %(message)s",
    )
    return uvloop.run(serve(args.control_fd, args.index, not args.no_access_log))


if __name__ == "__main__":
    sys.exit(main())
