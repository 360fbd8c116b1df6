"""Real gRPC servers and clients for the HTTP/2 and gRPC tests (grpcio, h2c on 127.0.0.1).

`protos()` compiles tests/support/protos/turnout_test.proto with grpc_tools.protoc into a
temporary folder once per process and imports the generated modules from there, so the tests
always run the .proto as it is in the tree (nothing generated is checked in).

`RigServer` is a threaded grpcio server on an OS-chosen port, serving the `turnout.test.Rig`
service under a `version` ("v1", "v2") that every answer carries, in one of the `Mode`s:

- `healthy`: Unary echoes the text; ServerStream sends `count` replies; ClientStream sums the
  numbers; Bidi echoes each message as it comes.
- `internal`: every call ends with INTERNAL, the message naming the version (with a non-ASCII
  character and a '%', so the percent-encoding of grpc-message is exercised) and the trailing
  metadata of `trailers`.
- `slow`: Unary waits for the caller to give up (its deadline or a cancel), at most SLOW_S,
  then answers normally: a call with a shorter deadline ends DEADLINE_EXCEEDED.
- `trailers`: as healthy, plus trailing metadata `x-rig-version: <version>` and a binary
  `x-rig-bin` (what a proxy must pass through unchanged, base64 on the wire).

The mode may be changed while the server runs (a canary that starts failing). The server counts
the calls it took and records the invocation metadata of the last one.

`RigClient` is a grpcio channel to a target (plain h2c, or TLS with a CA and a name override)
with one helper per call shape. `h2_request` is one request on a fresh HTTP/2 connection with
the h2 library, for what a gRPC stub hides: the `:status`, the headers and trailers as sent, and
no timer of the client's own (only a read deadline against hanging).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Literal

import grpc
import h2.config
import h2.connection
import h2.events
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent / "protos"
PROTO_FILE = "turnout_test.proto"
SERVICE = "turnout.test.Rig"
# The longest a `slow` call waits for its caller to give up: long enough for any deadline a test
# sets, short enough that a test that forgot its deadline still ends.
SLOW_S = 15.0
# Channel options every client uses: no proxy from the environment (http_proxy would divert
# 127.0.0.1 traffic), and no retries of grpcio's own, so one call is one request.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
)
BINARY_TRAILER = b"\x00\xffrig\x01"

Mode = Literal["healthy", "internal", "slow", "trailers"]
Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Protos:
    """The generated modules: messages (`pb2`) and the stub and servicer helpers (`pb2_grpc`)."""

    pb2: ModuleType
    pb2_grpc: ModuleType


@functools.cache
def protos() -> Protos:
    """Compile the .proto into a temporary folder (once per process) and import the result."""
    out = Path(tempfile.mkdtemp(prefix="turnout-protos-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO_FILE,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed ({status}) on {PROTO_DIR / PROTO_FILE}")
    # The generated _pb2_grpc module imports its _pb2 sibling by its top-level name.
    sys.path.insert(0, str(out))
    stem = PROTO_FILE.removesuffix(".proto")
    return Protos(
        importlib.import_module(f"{stem}_pb2"), importlib.import_module(f"{stem}_pb2_grpc")
    )


def grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: flag byte, 4-byte big-endian length, the bytes."""
    return bytes([int(compressed)]) + len(message).to_bytes(4, "big") + message


class RigServer:
    """A threaded grpcio server of the Rig service (see the module docstring); `with` or
    `start()` / `stop()`."""

    def __init__(self, version: str, mode: Mode = "healthy", *, threads: int = 32) -> None:
        self.version = version
        self.mode: Mode = mode
        self.calls = 0
        self.last_metadata: dict[str, str | bytes] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"rig-{version}")
        )
        self._server.add_generic_rpc_handlers((self._handlers(),))
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        if not self.port:
            raise RuntimeError("the gRPC rig server could not bind 127.0.0.1")

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, as an endpoint in a Turnout config."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> RigServer:
        """Start serving; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop at once, cancelling calls in progress."""
        self._server.stop(grace=None).wait(10)

    def __enter__(self) -> RigServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the service ----------------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        pb2 = protos().pb2
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(
                    self._unary,
                    request_deserializer=pb2.EchoRequest.FromString,
                    response_serializer=pb2.EchoReply.SerializeToString,
                ),
                "ServerStream": grpc.unary_stream_rpc_method_handler(
                    self._server_stream,
                    request_deserializer=pb2.StreamRequest.FromString,
                    response_serializer=pb2.EchoReply.SerializeToString,
                ),
                "ClientStream": grpc.stream_unary_rpc_method_handler(
                    self._client_stream,
                    request_deserializer=pb2.Number.FromString,
                    response_serializer=pb2.Sum.SerializeToString,
                ),
                "Bidi": grpc.stream_stream_rpc_method_handler(
                    self._bidi,
                    request_deserializer=pb2.EchoRequest.FromString,
                    response_serializer=pb2.EchoReply.SerializeToString,
                ),
            },
        )

    def _begin(self, context: grpc.ServicerContext) -> Mode:
        """Count the call, keep its metadata, and apply the mode's trailers or failure."""
        with self._lock:
            self.calls += 1
            self.last_metadata = dict(context.invocation_metadata())
            mode = self.mode
        if mode in ("trailers", "internal"):
            context.set_trailing_metadata(
                (("x-rig-version", self.version), ("x-rig-bin", BINARY_TRAILER))
            )
        if mode == "internal":
            context.abort(grpc.StatusCode.INTERNAL, f"{self.version} fails on purpose: naïve 100%")
        return mode

    def _reply(self, text: str, index: int = 0) -> Any:
        return protos().pb2.EchoReply(version=self.version, text=text, index=index)

    def _unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._begin(context) == "slow":
            given_up = threading.Event()
            # Wakes when the call ends early (deadline, cancel); never a sleep that hopes.
            context.add_callback(given_up.set)
            given_up.wait(SLOW_S)
        return self._reply(request.text)

    def _server_stream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._begin(context)
        for index in range(request.count):
            yield self._reply(request.text, index)

    def _client_stream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        self._begin(context)
        total = count = 0
        for number in requests:
            total += number.value
            count += 1
        return protos().pb2.Sum(version=self.version, total=total, count=count)

    def _bidi(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self._begin(context)
        for index, request in enumerate(requests):
            yield self._reply(request.text, index)


class RigClient:
    """A grpcio channel to `target` (`host:port`) with a helper per call shape.

    Plain h2c by default; with `root_pem`, TLS trusting that CA, checking the certificate for
    `server_name`. Every helper takes `metadata` and `timeout` (the call's deadline, sent as
    grpc-timeout) and raises grpc.RpcError on a non-OK status.
    """

    def __init__(
        self, target: str, *, root_pem: bytes | None = None, server_name: str | None = None
    ) -> None:
        options = list(CHANNEL_OPTIONS)
        if root_pem is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub: Any = protos().pb2_grpc.RigStub(self.channel)
        self.pb2 = protos().pb2

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> RigClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects (grpc.FutureTimeoutError after `timeout`)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def unary(
        self, text: str, *, metadata: Metadata = (), timeout: float = 10.0
    ) -> tuple[Any, grpc.Call]:
        """One Unary call: (the reply, the call for its metadata, trailers and status)."""
        reply, call = self.stub.Unary.with_call(
            self.pb2.EchoRequest(text=text), metadata=tuple(metadata), timeout=timeout
        )
        return reply, call

    def server_stream(
        self, text: str, count: int, *, metadata: Metadata = (), timeout: float = 10.0
    ) -> list[Any]:
        """Every reply of one ServerStream call."""
        call = self.stub.ServerStream(
            self.pb2.StreamRequest(text=text, count=count),
            metadata=tuple(metadata),
            timeout=timeout,
        )
        return list(call)

    def client_stream(
        self, values: Iterable[int], *, metadata: Metadata = (), timeout: float = 10.0
    ) -> Any:
        """The Sum a ClientStream call of `values` gets."""
        numbers = (self.pb2.Number(value=value) for value in values)
        return self.stub.ClientStream(numbers, metadata=tuple(metadata), timeout=timeout)

    def bidi(self, *, metadata: Metadata = (), timeout: float = 30.0) -> BidiCall:
        """Open a Bidi call; send and receive through the returned BidiCall."""
        return BidiCall(self, metadata, timeout)


class BidiCall:
    """One open Bidi call: `exchange(text)` sends a message and waits for its echo; `close()`
    ends the request stream and waits for the call's end. The call's deadline bounds every wait.
    """

    _END = object()

    def __init__(self, client: RigClient, metadata: Metadata, timeout: float) -> None:
        self._outbox: list[Any] = []
        self._ready = threading.Condition()
        self._pb2 = client.pb2
        self._deadline = time.monotonic() + timeout
        self.call: Any = client.stub.Bidi(
            self._requests(), metadata=tuple(metadata), timeout=timeout
        )

    def _requests(self) -> Iterator[Any]:
        while True:
            with self._ready:
                # Bounded by the call's deadline: after it grpcio stops reading this iterator.
                remaining = self._deadline - time.monotonic()
                if not self._ready.wait_for(lambda: bool(self._outbox), timeout=remaining):
                    return
                item = self._outbox.pop(0)
            if item is BidiCall._END:
                return
            yield item

    def _put(self, item: Any) -> None:
        with self._ready:
            self._outbox.append(item)
            self._ready.notify()

    def exchange(self, text: str) -> Any:
        """Send `text`; the reply to it (the server answers each message in turn)."""
        self._put(self._pb2.EchoRequest(text=text))
        return next(self.call)

    def close(self) -> grpc.StatusCode:
        """End the request stream; the call's final status."""
        self._put(BidiCall._END)
        for extra in self.call:
            raise AssertionError(f"a reply nobody asked for: {extra}")
        code: grpc.StatusCode = self.call.code()
        return code


@dataclass
class H2Answer:
    """What one HTTP/2 request got: response headers, body, trailers (lower-case names), or the
    RST_STREAM error code when the stream was reset."""

    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str]
    reset: int | None = None

    @property
    def status(self) -> int:
        """The `:status`, or 0 when no response head came."""
        return int(self.headers.get(":status", "0"))

    def grpc_status(self) -> int | None:
        """grpc-status from the trailers, or from the head of a trailers-only answer."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)

    def grpc_message(self) -> str | None:
        """grpc-message from the trailers or a trailers-only head (still percent-encoded)."""
        return self.trailers.get("grpc-message", self.headers.get("grpc-message"))


def grpc_request_headers(
    authority: str, method: str, *, scheme: str = "http", extra: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The request head a gRPC client sends for `method` ("Unary") of the rig's service."""
    return [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", f"/{SERVICE}/{method}"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


def h2_request(
    port: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    read_timeout: float = 20.0,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> H2Answer:
    """Send one request (`body` with END_STREAM) on a new HTTP/2 connection to 127.0.0.1:`port`
    (prior knowledge, or TLS with ALPN h2); wait for the stream's end. `read_timeout` bounds
    each read (socket.timeout when the peer goes quiet), not the whole exchange.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    sock: socket.socket = raw
    try:
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
            wrapped = tls.wrap_socket(raw, server_hostname=server_name)
            sock = wrapped
            if wrapped.selected_alpn_protocol() != "h2":
                raise AssertionError("the server did not choose h2 by ALPN")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, list(headers), end_stream=not body)
        if body:
            conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        answer = H2Answer({}, b"", {})
        chunks: list[bytes] = []
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the connection closed before the stream ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = _text_headers(event.headers)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = _text_headers(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    chunks.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    answer.reset = int(event.error_code)
                    return answer
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    answer.body = b"".join(chunks)
                    return answer
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()


def _text_headers(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        out[key.lower()] = text
    return out
