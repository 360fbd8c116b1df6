"""The control channel between the supervisor and its workers.

One `socket.socketpair(AF_UNIX, SOCK_STREAM)` per worker; the worker gets its end as an inherited
file descriptor (`--control-fd`). Messages are orjson objects, one per line, in both directions.
The channel carries control only (tables, health, stats); requests never cross it.

supervisor -> worker
    {"op": "table", "generation": int, "sha256": str, "path": str, "spec": str,
     "split_overrides": {route: [{upstream: weight}, "runtime" | "rollout"]}}
        the validated ConfigSpec the supervisor parsed, pickled and base64-encoded, which the
        worker compiles with `compile_table`. Workers never parse YAML: a big file takes
        ~150 ms of pure-Python parsing, which would stall every worker's event loop on each
        reload, while unpickling takes microseconds. Pickle is safe here because only the
        supervisor can write to this private socketpair. Sent at start and after every
        successful reload or split change, in generation order.
    {"op": "health", "down": [[upstream, "host:port"], ...]}
        endpoints that fail their active health checks (everything else is up): the whole set,
        sent right after a worker's first table and to every worker whenever it changes.
    {"op": "stats", "id": int}
        asks for the worker's counters; answered by a stats message with the same id.
    {"op": "certs", "generation": int, "material": str}
        the bytes of every TLS listener's certificate, key and CA files (a pickled, base64
        tuple of proxy.runtime.tls.ListenerMaterial), as the supervisor read and checked them: sent
        before a worker's first table, and to every worker when renewed files pass the checks.
        A worker serves new handshakes with them; connections already open keep theirs.

worker -> supervisor
    {"op": "ready", "generation": int, "pid": int}   listening, first table applied
    {"op": "applied", "generation": int}             after each later table swap
    {"op": "stats", "id": int, "data": {...}}        answer to a stats request

End of file on the channel means the other side is gone: a worker that sees it shuts down.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import pickle
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from proxy.core.spec import ConfigSpec
from proxy.runtime.tls import ListenerMaterial

# The table message carries the whole config file (up to 64 MiB, larger once JSON-escaped);
# a line must fit in the stream's buffer.
LINE_LIMIT = 256 * 1024 * 1024

OP_TABLE = "table"
OP_HEALTH = "health"
OP_STATS = "stats"
OP_READY = "ready"
OP_APPLIED = "applied"
OP_CERTS = "certs"


class ControlError(Exception):
    """A malformed message on the control channel (not JSON, not an object, or too long)."""


def encode(msg: Mapping[str, object]) -> bytes:
    """One message as a line: compact JSON and a newline (orjson never emits raw newlines)."""
    return orjson.dumps(msg) + b"\n"


def table_message(
    *,
    generation: int,
    sha256: str,
    path: str,
    spec: ConfigSpec,
    split_overrides: Mapping[str, tuple[Mapping[str, float], str]],
) -> dict[str, object]:
    """Build a `table` message; `split_overrides` maps route -> (weights, source)."""
    return {
        "op": OP_TABLE,
        "generation": generation,
        "sha256": sha256,
        "path": path,
        "spec": base64.b64encode(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)).decode(),
        "split_overrides": {
            route: [dict(weights), source] for route, (weights, source) in split_overrides.items()
        },
    }


def certs_message(generation: int, material: Iterable[ListenerMaterial]) -> dict[str, object]:
    """Build a `certs` message."""
    blob = base64.b64encode(pickle.dumps(tuple(material), protocol=pickle.HIGHEST_PROTOCOL))
    return {"op": OP_CERTS, "generation": generation, "material": blob.decode("ascii")}


def material_from_message(msg: Mapping[str, object]) -> dict[str, ListenerMaterial]:
    """The material of a `certs` message by listener address (ControlError if malformed)."""
    raw = msg.get("material")
    if not isinstance(raw, str):
        raise ControlError("certs message without material")
    material = pickle.loads(base64.b64decode(raw))
    if not isinstance(material, tuple) or not all(
        isinstance(item, ListenerMaterial) for item in material
    ):
        raise ControlError("certs message material is not ListenerMaterial")
    return {item.address: item for item in material}


def spec_from_message(msg: Mapping[str, object]) -> ConfigSpec:
    """The ConfigSpec of a `table` message (ControlError if it is not one)."""
    raw = msg.get("spec")
    if not isinstance(raw, str):
        raise ControlError("table message without a spec")
    spec = pickle.loads(base64.b64decode(raw))
    if not isinstance(spec, ConfigSpec):
        raise ControlError("table message spec is not a ConfigSpec")
    return spec


def health_message(down: Iterable[tuple[str, str]]) -> dict[str, object]:
    """Build a `health` message from (upstream, "host:port") pairs that fail their checks."""
    return {"op": OP_HEALTH, "down": [[upstream, endpoint] for upstream, endpoint in down]}


def parse_split_overrides(raw: object) -> dict[str, tuple[dict[str, float], str]]:
    """The `split_overrides` of a table message back as route -> (weights, source)."""
    if not isinstance(raw, dict):
        return {}
    result: dict[str, tuple[dict[str, float], str]] = {}
    for route, pair in raw.items():
        weights, source = pair
        result[str(route)] = ({str(k): float(v) for k, v in weights.items()}, str(source))
    return result


class ControlChannel:
    """Newline-delimited orjson messages over an asyncio stream pair.

    `send` only buffers (it never blocks the loop); call `drain` where back-pressure matters,
    such as after a big table message. Sending on a closed channel does nothing: the peer is
    gone and `recv` on this side reports it as end of file.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None at end of file (the peer closed or died).

        Raises ControlError for a line that is not a JSON object or exceeds LINE_LIMIT.
        """
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            # EOF, possibly in the middle of a line: the peer is gone either way.
            return None
        except asyncio.LimitOverrunError as exc:
            raise ControlError(f"control message longer than {LINE_LIMIT} bytes") from exc
        except ConnectionError:
            return None
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ControlError(f"control message is not JSON: {exc}") from exc
        if not isinstance(msg, dict):
            raise ControlError("control message is not a JSON object")
        return msg

    def send(self, msg: Mapping[str, object]) -> None:
        """Queue one message for sending."""
        self.send_encoded(encode(msg))

    def send_encoded(self, line: bytes) -> None:
        """Queue a message already encoded with `encode` (one encoding for many channels)."""
        if self._writer.is_closing():
            return
        self._writer.write(line)

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark (ConnectionError if gone)."""
        await self._writer.drain()

    @property
    def closed(self) -> bool:
        """True once `close` was called or the transport was lost."""
        return self._writer.is_closing()

    def close(self) -> None:
        """Close the channel; the peer sees end of file."""
        self._writer.close()

    async def wait_closed(self) -> None:
        """Wait until the transport is closed (after `close`), ignoring a broken connection."""
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


async def open_channel(sock: socket.socket) -> ControlChannel:
    """Wrap a connected stream socket (one end of the socketpair) in a ControlChannel."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
    return ControlChannel(reader, writer)
