"""What the data plane writes in one event-loop pass leaves together, after the pass's callbacks.

Each connection's pieces are joined into one send, and no connection sends in the middle of the
pass: a send at the end of each callback woke the peers one send at a time
(proxy/dataplane/writes.py). A worker's client and pooled upstream connections on real socket
pairs; two requests arrive as two callbacks of one pass would hand them over, and the upstream
ends read without blocking to see what has been sent, and when.
"""

from __future__ import annotations

import asyncio
import socket

from proxy.core.config import parse_config
from proxy.core.table import compile_table
from proxy.dataplane.http1 import ClientConnection
from proxy.dataplane.upstream import UpstreamConnection
from proxy.dataplane.worker import WorkerContext

CONFIG = """
upstreams:
  blue: {endpoints: ["127.0.0.1:9001"]}
routes:
  - name: all
    split: {blue: 100}
"""


def pending(peer: socket.socket) -> bytes:
    """What has arrived at `peer` so far (b"" for nothing)."""
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def test_a_loop_pass_writes_each_connection_once_after_its_callbacks() -> None:
    loop = asyncio.get_running_loop()
    ctx = WorkerContext(loop, 0, access_log=False)
    ctx.apply(compile_table(parse_config(CONFIG, "t.yaml"), generation=1, sha256="x"))
    pool = next(iter(ctx.pools.endpoints.values()))
    sockets: list[socket.socket] = []
    clients: list[ClientConnection] = []
    endpoints: list[socket.socket] = []  # the upstream's ends of the pooled connections
    for _ in range(2):
        ours, theirs = socket.socketpair()
        sockets.append(theirs)
        _, client = await loop.connect_accepted_socket(lambda: ClientConnection(ctx), ours)
        clients.append(client)
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        sockets.append(theirs)
        endpoints.append(theirs)
        _, upstream = await loop.connect_accepted_socket(lambda: UpstreamConnection(pool), ours)
        pool.connections.add(upstream)
        upstream.reusable = True
        pool.release(upstream, ctx.state.now)
    try:
        for n, client in enumerate(clients):
            client.data_received(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        # Both requests went to pooled connections, and nothing is sent yet.
        assert [pending(end) for end in endpoints] == [b"", b""]
        # The pass ends: the flush the first write scheduled runs before the next pass.
        await asyncio.sleep(0)
        sent = sorted(pending(end) for end in endpoints)
        assert [request.split(b"\r\n", 1)[0] for request in sent] == [
            b"GET /0 HTTP/1.1",
            b"GET /1 HTTP/1.1",
        ]
        assert all(request.endswith(b"\r\n\r\n") for request in sent)
    finally:
        for client in clients:
            client.abort()
        for end in sockets:
            end.close()
