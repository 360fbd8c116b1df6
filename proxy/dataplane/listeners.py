"""How a worker takes client connections in: its listening sockets, accepting under the
connection cap, pausing when descriptors run out, and knowing when the last client has gone.

Every worker binds every listener with SO_REUSEPORT, so the kernel spreads new connections
over the workers. A worker stops watching its sockets when it holds `max_clients` connections
(they wait in the kernel's backlog) and when it is out of descriptors (for a tick), and closes
them at shutdown after taking in what the kernel already completed.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol

from proxy.core.spec import Listener, Timeouts
from proxy.dataplane.http1 import ClientConnection, Exchange, TlsClientConnection, WorkerHooks
from proxy.runtime.tasks import TaskSet
from proxy.runtime.tls import (
    CertificateSet,
    ListenerMaterial,
    TlsFileError,
    load_material,
    read_material,
)

log = logging.getLogger("turnout.worker")

# Connections taken per readiness event of a listening socket, so one busy listener cannot
# hold the loop.
ACCEPT_BATCH = 64
# How long accepting pauses after the worker ran out of descriptors: one tick of its timers
# (worker.TICK), after which the next connection may find a descriptor again.
SHORTAGE_PAUSE = 0.1

# File descriptors kept aside for what is not a client connection: the listener, the control
# channel, stdio, health checks, the mirror's client. Every client connection may need one
# more descriptor for its upstream connection, so a worker takes at most
# (fd limit - FD_RESERVE) / 2 clients.
FD_RESERVE = 64


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


# Linux's SO_ATTACH_FILTER and a classic BPF program of one instruction, `ret #0`: every
# packet the socket would receive is dropped.
SO_ATTACH_FILTER = 26
DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)


def refuse_new_connections(sock: socket.socket) -> bool:
    """Make the kernel drop every new connection attempt (SYN) to a listening socket.

    Closing a listener resets the connections completed into its backlog, and one completed
    between the last `accept()` and `close()` is reset after its client may have sent a
    request. With this filter no connection completes any more: the accept loop that follows
    empties the backlog for good, and a client whose SYN was dropped retries it (after a
    second) and finds the port closed. False where the kernel refuses the filter (the race
    then stays as narrow as the accept loop).
    """
    program = ctypes.create_string_buffer(DROP_ALL, len(DROP_ALL))
    # struct sock_fprog: the instruction count and a pointer to the instructions, copied by
    # the kernel during the call.
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


class ClientSide(Protocol):
    """A client connection as the worker tracks, drains and closes it: an HTTP/1.1
    `ClientConnection` or an HTTP/2 `Http2Connection` (proxy.dataplane.http2)."""

    # Set by a drain: HTTP/1.1 answers with `Connection: close` from then on; HTTP/2 sends
    # GOAWAY and lets its open streams finish.
    closing: bool
    idle_since: float  # when it last had no request in progress

    @property
    def tunnel(self) -> Exchange | None:
        """A WebSocket in progress (HTTP/1.1 only), told to go away at a drain."""

    def is_idle(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class BoundListener:
    """One listening socket of this worker and, on a TLS listener, its certificates."""

    __slots__ = ("address", "certificates", "sock", "tls")

    def __init__(self, sock: socket.socket, listener: Listener) -> None:
        self.sock = sock
        self.address = listener.address
        self.tls = listener.tls
        # Replaced whole on renewal: a new handshake takes the set in force when it begins.
        self.certificates: CertificateSet | None = None


class Acceptor:
    """The listening sockets of one worker and the client connections taken from them.

    `hooks` is what every connection is made with (the worker); `warn_limited` logs a line a
    peer can provoke at will, rate limited.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        tasks: TaskSet,
        hooks: WorkerHooks,
        warn_limited: Callable[..., None],
        fd_limit: int,
    ) -> None:
        self._loop = loop
        self._index = index
        self._tasks = tasks
        self._hooks = hooks
        self._warn_limited = warn_limited
        self.fd_limit = fd_limit
        # limits.max_connections, lowered to what the fd limit allows (set with each table).
        self.max_clients = client_capacity(fd_limit)
        # Bounds a TLS handshake: client_keepalive of the table in force (set with each table).
        self.handshake_timeout = Timeouts().client_keepalive
        self.listeners: list[BoundListener] = []
        # Certificates from the supervisor's `certs` message, by listener address.
        self.tls_material: dict[str, ListenerMaterial] = {}
        self.accepting = False
        self.adopting = 0  # accepted sockets whose protocol is not connected yet
        self.short_until = 0.0  # out of descriptors: no accepting before this time
        self.connections: set[ClientSide] = set()
        # Shutting down: the listeners are closed, and every connection is told to close.
        self.closing = False
        # Set once closing and no client is left (connected or being adopted).
        self.idle_event = asyncio.Event()

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
                log.error("worker %d: renewed certificates not loaded: %s", self._index, exc)

    def start_accepting(self) -> None:
        """Watch the listening sockets for new connections."""
        if self.listeners and not self.accepting:
            for bound in self.listeners:
                self._loop.add_reader(bound.sock.fileno(), self._accept, bound)
            self.accepting = True

    def stop_accepting(self) -> None:
        """Leave new connections in the kernel's backlog (max_connections reached, or drain)."""
        if self.listeners and self.accepting:
            for bound in self.listeners:
                self._loop.remove_reader(bound.sock.fileno())
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
            self._tasks.spawn(self._adopt(sock), name="adopt")
        else:
            self._tasks.spawn(self._adopt_tls(sock, certificates.default), name="adopt-tls")

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: ClientConnection(self._hooks), sock)
        except OSError:
            sock.close()
        finally:
            self._adopted()

    async def _adopt_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        # The handshake is bounded by client_keepalive: a client that stalls it must not hold
        # a connection slot longer than an idle keep-alive client could.
        try:
            await self._loop.connect_accepted_socket(
                lambda: TlsClientConnection(self._hooks),
                sock,
                ssl=context,
                ssl_handshake_timeout=self.handshake_timeout,
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
        self.check_idle()

    def close_listener(self) -> None:
        """Stop accepting and close the listening sockets: new connections are refused.

        Connections the kernel already completed sit in the backlog, and closing a listener
        would reset them although their clients may have sent a request: new ones are stopped
        first (`refuse_new_connections`), then those are taken in and served (with
        `Connection: close`).
        """
        self.stop_accepting()
        listeners = self.listeners
        self.listeners = []
        for bound in listeners:
            refuse_new_connections(bound.sock)
            while True:
                try:
                    sock, _ = bound.sock.accept()
                except OSError:
                    break
                self._take(sock, bound)
            bound.sock.close()

    # ---- running out ---------------------------------------------------------------------

    def resource_shortage(self, exc: OSError) -> None:
        """The worker is out of descriptors: stop accepting for a tick, log (rate-limited)."""
        self._warn_limited(
            "fd",
            "worker %d: out of file descriptors (%s) with %d client connections; "
            "accepting paused (limit %d)",
            self._index,
            exc.strerror,
            len(self.connections),
            self.fd_limit,
        )
        self.short_until = self._loop.time() + SHORTAGE_PAUSE
        if self.accepting:
            self.stop_accepting()
            self._loop.call_later(SHORTAGE_PAUSE, self._shortage_over)

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
            and self._loop.time() >= self.short_until
        ):
            self.start_accepting()

    # ---- connections ---------------------------------------------------------------------

    def opened(self, conn: ClientSide) -> None:
        """A client connected."""
        self.connections.add(conn)
        if self.closing:
            conn.closing = True
        if len(self.connections) >= self.max_clients:
            self.stop_accepting()

    def closed(self, conn: ClientSide) -> None:
        """A client connection ended."""
        self.connections.discard(conn)
        if not self.accepting:
            self._resume_accepting()
        self.check_idle()

    def check_idle(self) -> None:
        """Set `idle_event` once closing and no client is left."""
        if self.closing and not self.connections and not self.adopting:
            self.idle_event.set()
