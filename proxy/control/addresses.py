"""The addresses one Turnout must own before it starts: every `listen` address and `admin`.

A listener's address is shared by the workers with SO_REUSEPORT, which would also let a
second Turnout of the same user share it, silently taking half the traffic; `claim_addresses`
makes each one this Turnout's (a lock, a check, a hold) and says in one line which address is
taken, and by whom when it can tell.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from dataclasses import dataclass, field

from proxy.control.admin import BACKLOG
from proxy.core.spec import ConfigSpec


class StartError(Exception):
    """An address Turnout must listen on is not available; the message is one line for stderr."""


def format_address(host: str, port: int) -> str:
    """`host:port`, `[v6]:port`: as the config file writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    # The workers' rule (proxy.dataplane.listeners, bind_listener): a ':' in the host means
    # IPv6.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_lock_name(host: str, port: int) -> str:
    """The abstract unix socket that one Turnout per `listen` address holds.

    Abstract names live per network namespace, like ports, and vanish with the process, so
    a crashed Turnout leaves no stale lock behind.
    """
    return f"\0turnout/listen/{format_address(host.lower(), port)}"


@dataclass(slots=True)
class AddressClaims:
    """The sockets that keep `listen` and `admin` this Turnout's (see `claim_addresses`).

    `lock` and `hold` are the first listener's; `more` has the locks and holds of the others.
    """

    lock: socket.socket
    hold: socket.socket | None
    admin: socket.socket
    more: list[tuple[socket.socket, socket.socket | None]] = field(default_factory=list)

    @property
    def locks(self) -> list[socket.socket]:
        """Every listener's lock socket."""
        return [self.lock] + [lock for lock, _ in self.more]

    def close(self) -> None:
        """Let the addresses go (closing the admin socket again after its server did is a no-op)."""
        for sock in (self.lock, self.hold, self.admin):
            if sock is not None:
                sock.close()
        for lock, hold in self.more:
            lock.close()
            if hold is not None:
                hold.close()


def _holder_pid(name: str) -> int | None:
    """The pid of the process that holds the lock socket `name`, when it can be told."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None


def _bind_error(what: str, host: str, port: int, exc: OSError) -> StartError:
    where = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return StartError(f"{what} address {where} is already in use by another process")
    return StartError(f"cannot listen on {where} ({what}): {exc.strerror or exc}")


def _check_free(host: str, port: int, what: str) -> None:
    """StartError unless a socket could listen on the address now.

    Without SO_REUSEPORT, so that any listener on it counts, Turnout workers' included; with
    SO_REUSEADDR, like the workers, so that old connections in TIME_WAIT do not.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _bind_error(what, host, port, exc) from None


def _hold(host: str, port: int) -> socket.socket | None:
    """A socket bound to `listen` with SO_REUSEPORT (never listening: it gets no connections).

    Until the workers listen, it keeps every other program off the port (their bind fails,
    as does another Turnout's check on an overlapping address such as 0.0.0.0); the workers
    of this Turnout can still join, being of the same user.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        # Old connections of another program still in TIME_WAIT refuse this bind, which has
        # no SO_REUSEADDR, but not the workers'. Then there is no hold: the lock and the check
        # still stand; only a start at the very same moment could slip in.
        sock.close()
        return None
    return sock


def _claim_listen(host: str, port: int) -> tuple[socket.socket, socket.socket | None]:
    """The lock and the hold of one listener address (StartError naming it)."""
    name = listen_lock_name(host, port)
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(name)
    except OSError as exc:
        lock.close()
        where = format_address(host, port)
        if exc.errno != errno.EADDRINUSE:
            raise StartError(f"cannot lock the listen address {where}: {exc.strerror}") from None
        pid = _holder_pid(name)
        holder = f"another Turnout (pid {pid})" if pid else "another Turnout"
        raise StartError(f"listen address {where} is already in use by {holder}") from None
    try:
        # Listening, so a second Turnout can ask who holds it (SO_PEERCRED).
        lock.listen(8)
        lock.setblocking(False)
        _check_free(host, port, "listen")
    except BaseException:
        lock.close()
        raise
    return lock, _hold(host, port)


def claim_addresses(spec: ConfigSpec) -> AddressClaims:
    """Make every listener address and `admin` this Turnout's, or StartError naming the address.

    A listener: the workers share it with SO_REUSEPORT, which would let a second Turnout of
    the same user share it too, silently taking half the traffic. So: a lock (an abstract unix
    socket named after the address) that a second Turnout cannot take; then a bind without
    SO_REUSEPORT, which fails if anything listens there; then `_hold`. `admin`: bound here,
    without SO_REUSEPORT, which is exclusive by itself.
    """
    claimed: list[tuple[socket.socket, socket.socket | None]] = []
    try:
        for listener in spec.all_listeners():
            claimed.append(_claim_listen(listener.host, listener.port))
        admin_host, admin_port = spec.admin
        admin = socket.socket(_family(admin_host), socket.SOCK_STREAM)
        try:
            admin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            admin.bind((admin_host, admin_port))
            admin.listen(BACKLOG)
        except OSError as exc:
            admin.close()
            raise _bind_error("admin", admin_host, admin_port, exc) from None
    except BaseException:
        for lock, hold in claimed:
            lock.close()
            if hold is not None:
                hold.close()
        raise
    (lock, hold), *more = claimed
    return AddressClaims(lock=lock, hold=hold, admin=admin, more=more)


def drop_connection(lock: socket.socket) -> None:
    """Accept and close one connection on a lock socket (another Turnout asking who holds it)."""
    with contextlib.suppress(OSError):
        conn, _ = lock.accept()
        conn.close()
