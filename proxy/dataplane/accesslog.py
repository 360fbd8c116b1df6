"""The JSON access log: one line per request on stdout (contract section 8).

The data plane hands over an `AccessRecord` (plain values, built once when an exchange ends), so
this module knows nothing of connections or exchanges and imports nothing from the data plane.
Lines are buffered and written in batches by the worker's ticker, so a request costs one orjson
call, not a system call. Each write is at most `PIPE_BUF` bytes cut at line ends, so the lines of
several workers sharing one stdout pipe never interleave mid-line.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import orjson

_ATOMIC: Final = getattr(select, "PIPE_BUF", 4096)
_FLUSH_AT: Final = 64 * 1024


@dataclass(slots=True)
class AccessRecord:
    """What one finished exchange contributes to its line, as the protocol layer saw it.

    Built once, when the exchange ends, and not changed after. Raw where the wire gives bytes
    (target, authority, headers): decoding is the log's job. A slots class rather than a
    NamedTuple: cheaper to build and to read on a path taken once per request.
    """

    request_id: str
    client: str
    method: str
    target: bytes  # the request target as received; the query is cut off in the line
    status: int
    route: str
    upstream: str
    decision: str
    endpoint: str
    attempts: int
    duration: float  # seconds, from the request's first byte
    bytes_in: int
    bytes_out: int
    mirrored: bool
    version: str  # "1.1", "1.0"
    authority: bytes | None
    headers: list[tuple[bytes, bytes, bytes]]  # (lower-case name, name, value), as forwarded
    ttfb: float  # seconds from the request sent upstream to the response head; < 0: none
    flag: str
    tls_version: str | None
    sni: str | None


class AccessLog:
    """Buffers access-log lines and writes them to a file descriptor."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._lines: list[bytes] = []
        self._size = 0
        # The timestamp up to the second, made again only when the second changes.
        self._second = -1
        self._prefix = ""

    def timestamp(self, now: float) -> str:
        """`now` (seconds since the epoch) in ISO 8601 UTC with milliseconds, as
        `datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")` but with `Z`.

        A quarter of the cost of formatting a datetime per line: the date and time of day are
        formatted once a second.
        """
        # Rounded to the microsecond as datetime does (half to even), then cut to milliseconds.
        second = int(now)
        micro = round((now - second) * 1_000_000)
        if micro == 1_000_000:
            second += 1
            micro = 0
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{micro // 1000:03d}Z"

    def record(self, rec: AccessRecord) -> None:
        """Add the line of one finished exchange."""
        url = rec.target
        q = url.find(b"?")
        user_agent = ""
        for lname, _, value in rec.headers:
            if lname == b"user-agent":
                user_agent = value.decode("latin-1")
                break
        host = rec.authority
        ttfb = rec.ttfb
        line = orjson.dumps(
            {
                "time": self.timestamp(time.time()),
                "request_id": rec.request_id,
                "client": rec.client,
                "method": rec.method,
                "path": (url if q < 0 else url[:q]).decode("latin-1"),
                "status": rec.status,
                "route": rec.route,
                "upstream": rec.upstream,
                "decision": rec.decision,
                "endpoint": rec.endpoint,
                "attempts": rec.attempts,
                "duration_ms": round(rec.duration * 1000.0, 3),
                "bytes_in": rec.bytes_in,
                "bytes_out": rec.bytes_out,
                "mirrored": rec.mirrored,
                "protocol": f"HTTP/{rec.version}",
                "authority": host.decode("latin-1") if host is not None else "",
                "user_agent": user_agent,
                "upstream_ttfb_ms": round(ttfb * 1000.0, 3) if ttfb >= 0 else None,
                "flags": rec.flag,
                "tls_version": rec.tls_version,
                "sni": rec.sni,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        self._lines.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered, in writes no larger than PIPE_BUF cut at line ends."""
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._size = 0
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > _ATOMIC:
                self._write(b"".join(batch))
                batch = []
                size = 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                # stdout is gone (closed pipe): logging must never take the proxy down.
                return
            view = view[written:]
