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
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import uvloop

from proxy.core.counters import WorkerSnapshot
from proxy.core.spec import Listener, Timeouts
from proxy.core.table import Table, compile_table
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.http1 import ClientConnection, Generation, LoopState, RequestIds
from proxy.dataplane.http2 import adopt
from proxy.dataplane.listeners import FD_RESERVE, Acceptor, ClientSide, client_capacity
from proxy.dataplane.pools import Pools
from proxy.dataplane.stats import WorkerStats
from proxy.dataplane.upstream import EndpointPool
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
from proxy.runtime.tls import ListenerMaterial

if TYPE_CHECKING:
    from proxy.dataplane.mirror import Mirrorer

log = logging.getLogger("turnout.worker")

TICK = 0.1

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


class WorkerContext:
    """One worker, as its connections and its control loop see it (`http1.WorkerHooks`): the
    generation in force, the timers, and the parts that do the rest: `acceptor` (listeners
    and client connections), `pools` (upstream pools and their health) and `stats`."""

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
        self.state = LoopState(
            loop.time(), AccessLog() if access_log else None, RequestIds(os.urandom(8).hex())
        )
        self.fd_limit = fd_limit
        # The Via name of a config without `via` (see Generation).
        self.default_via = via_name
        self._logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._last_trim = self.state.now
        self._trim: Callable[[int], int] | None = _malloc_trim()
        self.tasks = TaskSet(f"worker-{index}")
        self.batcher = WriteBatcher(loop)
        self.generation: Generation = None  # type: ignore[assignment]  # set before serving
        # The timeouts of the generation in force, for what is not part of a request: idle
        # keep-alive clients and TLS handshakes. An exchange reads its own generation's.
        self.timeouts = Timeouts()
        self.acceptor = Acceptor(loop, index, self.tasks, self, self.warn_limited, fd_limit)
        self.pools = Pools(index, self.batcher, self.tasks)
        self.stats = WorkerStats()
        self._ticks = 0
        self._mirrorer: Mirrorer | None = None

    def mirrorer(self) -> Mirrorer:
        """The shadow-traffic sender, created on first use (it owns an HTTP client session)."""
        if self._mirrorer is None:
            from proxy.dataplane.mirror import Mirrorer

            self._mirrorer = Mirrorer(self.loop)
        return self._mirrorer

    # ---- what the supervisor sends -------------------------------------------------------

    def apply(self, table: Table) -> None:
        """Swap in a new table; keep warm pools, health and counters of what stays."""
        old = self.generation
        pools = self.pools.build(table, self.state.now)
        stats, no_route, mirror_stats = self.stats.carry(old, table)
        spec = table.spec
        self.generation = Generation(
            table, pools, stats, no_route, mirror_stats, spec.via or self.default_via
        )
        if any(route.mirror is not None for route in table.routes):
            # Create the sender (and import aiohttp) now, not on the first mirrored request.
            self.mirrorer()
        self.timeouts = spec.timeouts
        self.acceptor.handshake_timeout = spec.timeouts.client_keepalive
        capacity = client_capacity(self.fd_limit)
        wanted = spec.limits.max_connections
        self.acceptor.max_clients = min(wanted, capacity)
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

    def listen(
        self,
        listeners: tuple[Listener, ...],
        bind: Callable[[Listener], socket.socket] | None = None,
    ) -> None:
        """Bind every listener and start accepting (`Acceptor.listen`)."""
        self.acceptor.listen(listeners, bind)

    def renew_certificates(self, material: dict[str, ListenerMaterial]) -> None:
        """Certificates from the supervisor: for the listeners still to be bound, and for new
        handshakes on those bound already (`Acceptor.renew_certificates`)."""
        self.acceptor.renew_certificates(material)

    def set_down(self, down: set[tuple[str, str]]) -> None:
        """Endpoints failing active health checks, from the supervisor."""
        self.pools.set_down(down, self.state.now)

    def stats_snapshot(self) -> WorkerSnapshot:
        """This worker's counters for the supervisor (only series of the current table), which
        reads them back with `proxy.core.counters.read_worker_snapshot`."""
        return self.stats.snapshot(
            self.generation, self.pools.endpoints.values(), len(self.acceptor.connections)
        )

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
        self.acceptor.resource_shortage(exc)

    def count_fail_open(self, upstream: str) -> None:
        """No endpoint of `upstream` was healthy: all were tried anyway."""
        self.stats.count_fail_open(upstream)

    def passive_result(self, endpoint: EndpointPool, status: int) -> None:
        """Outcome of one attempt: 0 for a connect/reset/timeout failure, else the status."""
        self.pools.passive_result(endpoint, status, self.state.now)

    def connection_opened(self, conn: ClientSide) -> None:
        """A client connected (or an HTTP/1.1 connection turned HTTP/2)."""
        self.acceptor.opened(conn)

    def connection_closed(self, conn: ClientSide) -> None:
        """A client connection ended."""
        self.acceptor.closed(conn)

    def count_h2_goaway(self, reason: str) -> None:
        """An HTTP/2 client connection was closed with GOAWAY for `reason`."""
        self.stats.count_h2_goaway(reason)

    def adopt_http2(self, conn: ClientConnection, initial: bytes) -> None:
        """A client connection turned out to speak HTTP/2 (h2c preface, or ALPN h2)."""
        adopt(conn, initial)

    # ---- timers --------------------------------------------------------------------------

    async def ticker(self) -> None:
        """Coarse clock, deadlines, idle timeouts and the access-log flush, every TICK."""
        while True:
            await asyncio.sleep(TICK)
            self.tick()

    def tick(self) -> None:
        """One pass of the timers (also called directly by tests)."""
        now = self.loop.time()
        state = self.state
        state.now = now
        # Each exchange's idle timeout is that of its own generation (a reload does not move it).
        expired = [
            ex
            for ex in state.watched
            if (ex.deadline and now > ex.deadline)
            or (not ex.deadline and now - ex.last_io > ex.gen.timeouts.idle)
        ]
        for ex in expired:
            state.watched.discard(ex)
            ex.timed_out()
        self._ticks += 1
        connections = self.acceptor.connections
        if self.acceptor.closing:
            for conn in [c for c in connections if c.is_idle()]:
                if now - conn.idle_since >= DRAIN_IDLE_GRACE:
                    conn.close()
        if self._ticks % 10 == 0:
            keepalive = self.timeouts.client_keepalive
            for conn in [c for c in connections if c.is_idle()]:
                if now - conn.idle_since > keepalive:
                    conn.close()
            self.pools.sweep(now)
            if self._trim is not None and now - self._last_trim >= TRIM_EVERY:
                # Buffers of many slow clients leave free holes in the heap that glibc (tuned
                # not to trim, see _tune_malloc) would keep for good: return them now and then.
                self._last_trim = now
                self._trim(0)
        if self.state.access_log is not None:
            self.state.access_log.flush()

    # ---- shutdown ------------------------------------------------------------------------

    async def drain(self, delay: float, budget: float) -> None:
        """The shutdown sequence of contract section 6, for this worker."""
        acceptor = self.acceptor
        # 1. Keep serving for drain.delay: the supervisor already answers /readyz with 503, so
        #    load balancers stop sending new connections here while we still take them.
        if delay > 0:
            await asyncio.sleep(delay)
        # 2. Close the listener: from now on new connections are refused by the kernel.
        acceptor.closing = True
        acceptor.close_listener()
        # 3. Keep-alive clients idle for DRAIN_IDLE_GRACE are closed now (tick() closes the
        #    others once they have been idle that long); every response from now on carries
        #    `Connection: close`, so a request already on its way is answered, not reset.
        #    WebSockets are told to go away (close frame 1001) rather than held to the deadline.
        now = self.loop.time()
        for conn in list(acceptor.connections):
            conn.closing = True
            if conn.tunnel is not None:
                conn.tunnel.go_away()
            elif conn.is_idle() and now - conn.idle_since >= DRAIN_IDLE_GRACE:
                conn.close()
        # 4. In-flight requests get up to drain.shutdown to finish.
        acceptor.check_idle()
        if not acceptor.idle_event.is_set():
            try:
                async with asyncio.timeout(budget):
                    await acceptor.idle_event.wait()
            except TimeoutError:
                pass
        # 5. Whatever is still running at the deadline is cut, and counted in the log.
        left = [c for c in acceptor.connections if not c.is_idle()]
        if left:
            log.warning(
                "worker %d: cutting %d request(s) still running at the deadline",
                self.index,
                len(left),
            )
        for conn in list(acceptor.connections):
            conn.abort()
        self.pools.close_all()
        if self._mirrorer is not None:
            await self._mirrorer.close()
        if self.state.access_log is not None:
            self.state.access_log.flush()


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
            # Before the first table no listener is bound yet: the material waits for `listen`.
            ctx.renew_certificates(material_from_message(msg))
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
