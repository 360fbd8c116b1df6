"""An upstream whose every connection runs a script: for peers that break HTTP on purpose.

`ScriptedUpstream(script)` listens on 127.0.0.1 and, for each connection, reads one request
head and calls `script(conn)` in a thread of its own (`conn.head` is that head). `sent`
records how many bytes each connection managed to write before the peer hung up, so a test
can see that Turnout cut an endless response short. Scripts must bound what they send
(`stream` takes a cap).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable

Script = Callable[["Connection"], None]


class Connection:
    """One accepted connection, as a script sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b""  # the first request's head
        self.sent = 0
        self.cut = False  # the peer closed or reset while we were writing

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False once the peer is gone."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.cut = True
            return False
        self.sent += len(data)
        return True

    def stream(self, pieces: Iterable[bytes], cap: int) -> None:
        """Send pieces until the peer hangs up or `cap` bytes went out."""
        for piece in pieces:
            if self.sent >= cap or not self.send(piece):
                return


class ScriptedUpstream:
    """A TCP server on 127.0.0.1 running `script` for every connection (after its head)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.connections: list[Connection] = []
        self.heads: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        """`127.0.0.1:port`, as written in a Turnout config."""
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = Connection(sock)
        with sock:
            sock.settimeout(30.0)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    head += chunk
            except OSError:
                return
            conn.head = head
            with self._lock:
                self.connections.append(conn)
                self.heads.append(head)
            self.script(conn)

    def close(self) -> None:
        """Stop accepting (connections in progress end with their scripts)."""
        self.server.close()
