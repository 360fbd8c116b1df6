"""A real `redis-server` for the fleet tests: started on a free port of 127.0.0.1, and stopped,
restarted (with its data or empty), paused and resumed as the failure cases need.

Nothing is saved to disk (`--save ''`, no append-only file), so a restart is always empty
unless `restart(keep=True)` dumps the data first; the server's folder is the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.turnout import free_port

READY_DEADLINE = 10.0


def redis_server_binary() -> str | None:
    """The redis-server (or valkey-server) on PATH; None when neither is installed."""
    return shutil.which("redis-server") or shutil.which("valkey-server")


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, its files in `folder`."""

    def __init__(self, folder: Path, binary: str) -> None:
        self.folder = folder
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, dbfile: bool = False) -> None:
        """Start it and wait until it answers PING (`dbfile`: load dump.rdb if there is one)."""
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.log),
        ]
        if not dbfile:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / "dump.rdb").unlink()
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text(errors='replace')}")
            if self.command("PING") == b"+PONG":
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def command(self, *words: str) -> bytes | None:
        """Send one inline command and return the first reply line; None when unreachable."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                conn.sendall((" ".join(words) + "\r\n").encode())
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                return reply.split(b"\r\n", 1)[0]
        except OSError:
            return None

    def stop(self, *, keep: bool = False) -> None:
        """Kill it (SIGKILL: the data in memory is gone unless a restart keeps a dump);
        `keep` dumps the data first, for a later `start(dbfile=True)` (a Redis that
        persists its data and comes back)."""
        if self.process is None:
            return
        if keep and self.command("SAVE") != b"+OK":
            raise RuntimeError(f"redis-server on port {self.port} did not SAVE its data")
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def restart(self, *, keep: bool) -> None:
        """Stop and start again on the same port; `keep` keeps the data (a SAVE first)."""
        self.stop(keep=keep)
        self.start(dbfile=keep)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a partition, as clients see it)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
