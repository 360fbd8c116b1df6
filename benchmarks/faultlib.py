"""Pieces of the fault run (benchmarks/faults.py): Turnout started from any checkout, a watch
on its workers' RSS that kills it past a cap, an HTTP/1.1 client that says how each request
ended, and hostile upstreams.

Run directly, it serves one hostile upstream (see HOSTILE_KINDS) until killed, or for at most
--lifetime seconds:

    .venv/bin/python benchmarks/faultlib.py endless-head 9300

Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import benchlib as bl
import httptools
import uvloop

HERE = Path(__file__).resolve().parent
LOOPBACK = bl.LOOPBACK
# A hostile upstream stops by itself after this long even if nobody kills it.
HOSTILE_LIFETIME_S = 600.0
# What each hostile upstream does once it has read a request head.
HOSTILE_KINDS = {
    "endless-head": "200 status line, then header lines forever, as fast as they are read",
    "endless-value": "200 status line, then one header value that never ends",
    "slowloris": "a response head at 1 byte per second, never finished",
    "unsolicited-101": "101 Switching Protocols nobody asked for, then raw bytes and an echo",
    "reset": "RST (SO_LINGER 0) right after reading the request head",
}


# --- Turnout from a checkout ------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A Turnout checkout and the interpreter that runs it (`PYTHON -m proxy` with the tree
    first on the import path).
    """

    path: Path
    python: str

    def argv(self, *args: str, nofile: int | None = None) -> list[str]:
        """The command line running `python -m proxy ARGS` from this tree, under a file
        descriptor limit of `nofile` (soft and hard) when given. `env` and `prlimit` exec the
        command, so the pid is Turnout's supervisor itself.
        """
        limit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile is not None else []
        return [*limit, "env", f"PYTHONPATH={self.path}", self.python, "-m", "proxy", *args]

    def describe(self) -> str:
        """The tree's path, commit and whether it has uncommitted changes."""
        head = _git(self.path, "rev-parse", "--short", "HEAD") or "no commit"
        dirty = " + uncommitted changes" if _git(self.path, "status", "--porcelain") else ""
        return f"{self.path} at {head}{dirty}"


def _git(path: Path, *args: str) -> str:
    try:
        done = bl.run_bounded(["git", "-C", str(path), *args], timeout=20)
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def check_tree(tree: Tree) -> str:
    """Where `import proxy` resolves for this tree; SystemExit when it is not inside the tree
    (an editable install of another checkout would otherwise be measured instead).
    """
    argv = [
        "env",
        f"PYTHONPATH={tree.path}",
        tree.python,
        "-c",
        "import proxy; print(proxy.__file__)",
    ]
    try:
        done = subprocess.run(
            argv, cwd=tree.path, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"--tree {tree.path}: cannot run {tree.python}: {exc}") from exc
    where = done.stdout.strip()
    if done.returncode != 0 or not Path(where).resolve().is_relative_to(tree.path.resolve()):
        raise SystemExit(
            f"--tree {tree.path}: `import proxy` gives {where or done.stderr.strip()[-300:]!r}, "
            "not this tree"
        )
    return where


@dataclass
class Turnout:
    """A running Turnout: supervisor process, ports, stderr log."""

    proc: bl.Proc
    port: int
    admin_port: int
    log_path: Path

    def workers(self) -> list[int]:
        """Pids of the supervisor's descendants (the workers) alive now."""
        return bl.process_tree(self.proc.pid)[1:] if self.proc.alive() else []

    def worker_rss_mib(self) -> float:
        """The sum of the workers' VmRSS in MiB."""
        return sum(bl.rss_mib(pid) for pid in self.workers())

    def kill(self) -> None:
        """SIGKILL the supervisor first (so it respawns nothing), then every worker."""
        for pid in bl.process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def log_size(self) -> int:
        """The stderr log's size in bytes now (an offset for `log_lines_since`)."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_lines_since(self, offset: int) -> list[str]:
        """The log lines written after byte `offset`."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace").splitlines()
        except OSError:
            return []


class Procs:
    """Every process a run starts, so that one `stop_all()` ends them whatever happened."""

    def __init__(self) -> None:
        self._procs: list[bl.Proc] = []

    def start(self, name: str, argv: list[str], log: Path, cwd: Path | None = None) -> bl.Proc:
        """Start `argv` as a `benchlib.Proc` (own process group) and remember it."""
        proc = bl.Proc(name, argv, log, stdout_devnull=True, cwd=cwd)
        self._procs.append(proc)
        return proc

    def stop(self, proc: bl.Proc, grace: float = 5.0) -> None:
        """Stop one process (group and descendants) and forget it."""
        proc.stop(grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop everything still remembered, newest first."""
        while self._procs:
            self.stop(self._procs[-1], grace=2.0)


def start_turnout(
    procs: Procs,
    tree: Tree,
    config: dict[str, Any],
    folder: Path,
    name: str,
    *,
    nofile: int | None = None,
) -> Turnout:
    """Write `config` (its `listen` and `admin` on 127.0.0.1), start Turnout from `tree` and
    wait until it is ready; a StartError carries its log when it does not come up.
    """
    port = int(str(config["listen"]).rsplit(":", 1)[1])
    admin_port = int(str(config["admin"]).rsplit(":", 1)[1])
    conf = bl.write_turnout_conf(folder / f"{name}.yaml", config)
    log = folder / f"{name}.log"
    proc = procs.start(
        name, tree.argv("run", str(conf), "--no-access-log", nofile=nofile), log, tree.path
    )
    try:
        bl.wait_for_turnout(proc, port, admin_port, "/", 15.0)
    except BaseException:
        procs.stop(proc)
        raise
    return Turnout(proc, port, admin_port, log)


def start_hostile(procs: Procs, kind: str, folder: Path) -> tuple[bl.Proc, int]:
    """Start a hostile upstream of `kind` in its own process; (process, port) once it listens."""
    port = bl.free_port()
    argv = [sys.executable, str(HERE / "faultlib.py"), kind, str(port)]
    proc = procs.start(f"hostile-{kind}", argv, folder / f"hostile-{kind}.log")
    deadline = time.monotonic() + 10.0
    while not bl.port_open(port):
        if not proc.alive() or time.monotonic() > deadline:
            procs.stop(proc)
            raise bl.StartError(f"hostile upstream {kind} did not listen:\n{proc.log_tail()}")
        time.sleep(0.05)
    return proc, port


def admin_get(port: int, path: str) -> tuple[int, str] | None:
    """GET `path` from 127.0.0.1:`port`: (status, body), or None when nothing answered."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=3.0)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# --- RSS watch --------------------------------------------------------------------------------


@dataclass
class RssWatch:
    """Samples the workers' RSS every `every` seconds; past `cap_mib` in one worker it kills
    Turnout and says when (a worker growing to many GB would take the machine down).
    """

    turnout: Turnout
    cap_mib: float
    every: float = 0.1
    peak_mib: float = 0.0
    killed: str | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Sample until `stop()` or the kill."""
        started = time.monotonic()
        while not self._stop.is_set():
            sizes = [bl.rss_mib(pid) for pid in self.turnout.workers()]
            self.peak_mib = max(self.peak_mib, sum(sizes))
            if sizes and max(sizes) > self.cap_mib:
                self.turnout.kill()
                self.killed = (
                    f"killed at {max(sizes):.0f} MiB after {time.monotonic() - started:.1f} s"
                )
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every):
                    await self._stop.wait()

    def stop(self) -> None:
        """End `run()` at its next sample."""
        self._stop.set()


# --- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """How one request ended: a status (None when no response head came) or an error
    (`reset`, `eof`, `timeout`, `bad response`), whether the response said Connection: close,
    and the seconds from send to answer.
    """

    status: int | None
    error: str
    close: bool
    seconds: float

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def label(self) -> str:
        """The status code as text, or the error."""
        return str(self.status) if self.status is not None else self.error


class ClientConn(asyncio.Protocol):
    """One HTTP/1.1 client connection carrying one request at a time. With `head_only` an
    exchange ends at the response head (the body of a hostile answer may never end).
    """

    def __init__(self, head_only: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._head_only = head_only
        self._close = False
        self._sent_at = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A 101 (asked for or not): the head is complete, the rest is not HTTP.
            self._answer()
        except httptools.HttpParserError:
            self._resolve(Answer(None, "bad response", True, self._elapsed()))
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        """httptools callback: note `Connection: close`."""
        if name.lower() == b"connection" and b"close" in value.lower():
            self._close = True

    def on_headers_complete(self) -> None:
        """httptools callback: the head is in; a head-only exchange ends here."""
        if self._head_only:
            self._answer()

    def on_message_complete(self) -> None:
        """httptools callback: the whole response is in."""
        self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = (
            "reset" if isinstance(exc, ConnectionResetError) else "eof" if exc is None else "lost"
        )
        self._resolve(Answer(None, error, True, self._elapsed()))

    def _elapsed(self) -> float:
        return time.monotonic() - self._sent_at

    def _answer(self) -> None:
        status = int(self._parser.get_status_code())
        self._resolve(Answer(status, "", self._close or status == 101, self._elapsed()))

    def _resolve(self, answer: Answer) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)

    def usable(self) -> bool:
        """Open and not known to be closing: a request written now reaches the peer."""
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    async def exchange(self, request: bytes, limit_s: float) -> Answer:
        """Send `request` and wait up to `limit_s` seconds for the answer. The caller checks
        `usable()` first; a connection the peer closed meanwhile answers `eof` or `reset`.
        """
        assert self._transport is not None, "exchange before connection_made"
        self._close = False
        self._waiter = asyncio.get_running_loop().create_future()
        self._sent_at = time.monotonic()
        self._transport.write(request)
        try:
            async with asyncio.timeout(limit_s):
                return await self._waiter
        except TimeoutError:
            return Answer(None, "timeout", True, self._elapsed())

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()


async def open_conn(port: int, limit_s: float, head_only: bool = False) -> ClientConn:
    """Connect to 127.0.0.1:`port` within `limit_s` seconds; ConnectionRefusedError, other
    OSErrors or TimeoutError.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(limit_s):
        _, conn = await loop.create_connection(lambda: ClientConn(head_only), LOOPBACK, port)
    return conn


def request_bytes(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    """A GET request for `path` with a Host header and `headers`."""
    head = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (head + "\r\n").encode()


def exc_label(exc: BaseException) -> str:
    """A short name for a connect failure."""
    return "connect timeout" if isinstance(exc, TimeoutError) else f"connect {type(exc).__name__}"


def summarise(counts: Counter[str], seconds: dict[str, list[float]] | None = None) -> str:
    """`502 x37, reset x3`, most frequent first; with `seconds`, the median wait of each."""
    parts = []
    for label, count in counts.most_common():
        text = f"{label} x{count}"
        waits = sorted((seconds or {}).get(label, []))
        if waits:
            text += f" ({waits[len(waits) // 2]:.1f} s)"
        parts.append(text)
    return ", ".join(parts) or "-"


# --- hostile upstreams ------------------------------------------------------------------------


async def _hostile(kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        if kind == "endless-head":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            chunk = (b"X-Fill: " + b"a" * 100 + b"\r\n") * 600
            while True:
                writer.write(chunk)
                await writer.drain()
        elif kind == "endless-value":
            writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
            chunk = b"a" * 65536
            while True:
                writer.write(chunk)
                await writer.drain()
        elif kind == "slowloris":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: ":
                writer.write(bytes([byte]))
                await asyncio.sleep(1.0)
            while True:
                writer.write(b"a")
                await asyncio.sleep(1.0)
        elif kind == "unsolicited-101":
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: x-raw\r\n\r\nraw bytes from the upstream\n"
            )
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        elif kind == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve_hostile(kind: str, port: int, lifetime: float) -> None:
    """Serve `kind` on 127.0.0.1:`port` for at most `lifetime` seconds."""
    server = await asyncio.start_server(
        lambda r, w: _hostile(kind, r, w), LOOPBACK, port, backlog=1024
    )
    with contextlib.suppress(TimeoutError):
        async with server, asyncio.timeout(lifetime):
            await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """Serve one hostile upstream (for faults.py)."""
    parser = argparse.ArgumentParser(description="Serve one hostile upstream on 127.0.0.1.")
    parser.add_argument("kind", choices=list(HOSTILE_KINDS))
    parser.add_argument("port", type=int)
    parser.add_argument("--lifetime", type=float, default=HOSTILE_LIFETIME_S, help="seconds")
    args = parser.parse_args(argv)
    uvloop.run(serve_hostile(args.kind, args.port, args.lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
