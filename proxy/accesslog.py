"""The JSON access log: one line per request on stdout (contract section 8).

Lines are buffered and written in batches by the worker's ticker, so a request costs one orjson
call, not a system call. Each write is at most `PIPE_BUF` bytes cut at line ends, so the lines of
several workers sharing one stdout pipe never interleave mid-line.
"""

from __future__ import annotations

import os
import select
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from proxy.dataplane import Exchange

_ATOMIC = getattr(select, "PIPE_BUF", 4096)
_FLUSH_AT = 64 * 1024


class AccessLog:
    """Buffers access-log lines and writes them to a file descriptor."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._lines: list[bytes] = []
        self._size = 0

    def record(self, ex: Exchange, duration: float) -> None:
        """Add the line of one finished exchange."""
        url = ex.url
        q = url.find(b"?")
        user_agent = ""
        for lname, _, value in ex.kept_headers:
            if lname == b"user-agent":
                user_agent = value.decode("latin-1")
                break
        line = orjson.dumps(
            {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "request_id": ex.request_id,
                "client": ex.conn.client_ip,
                "method": ex.method,
                "path": (url if q < 0 else url[:q]).decode("latin-1"),
                "status": ex.status,
                "route": ex.route_name,
                "upstream": ex.upstream_name,
                "decision": ex.decision,
                "endpoint": ex.endpoint_address,
                "attempts": ex.attempts,
                "duration_ms": round(duration * 1000.0, 3),
                "bytes_in": ex.bytes_in,
                "bytes_out": ex.bytes_out,
                "mirrored": ex.mirrored,
                "protocol": f"HTTP/{ex.version}",
                "authority": ex.host.decode("latin-1") if ex.host is not None else "",
                "user_agent": user_agent,
                "upstream_ttfb_ms": round(ex.ttfb * 1000.0, 3) if ex.ttfb >= 0 else None,
                "flags": ex.flag,
                "tls_version": ex.conn.tls_version,
                "sni": ex.conn.sni,
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
