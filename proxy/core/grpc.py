"""gRPC over HTTP/2, the parts a proxy must know: what a gRPC request is, its deadline, and
the status a proxy-made failure is answered with (github.com/grpc/grpc, doc/PROTOCOL-HTTP2.md
and doc/http-grpc-status-mapping.md). Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Final

from proxy.core.headers import field

OK: Final = 0
CANCELLED: Final = 1
UNKNOWN: Final = 2
INVALID_ARGUMENT: Final = 3
DEADLINE_EXCEEDED: Final = 4
NOT_FOUND: Final = 5
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
DATA_LOSS: Final = 15
UNAUTHENTICATED: Final = 16

NAMES: Final[dict[int, str]] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

# The statuses that say the server (not the caller) failed: errors for the rollout's tests, as
# 5xx are for HTTP. INVALID_ARGUMENT, NOT_FOUND and the like are the caller's, like 4xx.
ERROR_CODES: Final = frozenset(
    {UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS}
)

# grpc-timeout units (PROTOCOL-HTTP2.md: "TimeoutValue TimeoutUnit", at most 8 digits).
_UNITS: Final[dict[int, float]] = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def status_of(headers: list[tuple[bytes, bytes, bytes]]) -> int:
    """The `grpc-status` among (lower-cased name, name, value) fields: its code, UNKNOWN for a
    value that is not one (a hostile value must not become a metric label), -1 for none."""
    value = field(headers, b"grpc-status")
    if value is None:
        return -1
    text = value.strip()
    return int(text) if text.isdigit() and len(text) <= 2 else UNKNOWN


def is_grpc(content_type: bytes) -> bool:
    """Whether a Content-Type names gRPC: `application/grpc`, `+proto`, `;charset`..."""
    value = content_type.strip().lower()
    if not value.startswith(b"application/grpc"):
        return False
    rest = value[16:17]
    return rest in (b"", b"+", b";")


def parse_timeout(value: bytes) -> float | None:
    """Seconds from a grpc-timeout value, or None when it is malformed."""
    value = value.strip()
    digits = value[:-1]
    if not 1 <= len(digits) <= 8 or not digits.isdigit():
        return None
    unit = _UNITS.get(value[-1])
    if unit is None:
        return None
    return int(digits) * unit


def status_for_local(http_status: int, deadline_passed: bool) -> int:
    """The gRPC status for an answer the proxy makes itself with `http_status`.

    The HTTP-to-gRPC table of http-grpc-status-mapping.md, but that a timeout of the call's own
    deadline is DEADLINE_EXCEEDED (what the client's stub reports for its deadline), and a body
    or head over the proxy's limits is RESOURCE_EXHAUSTED (what gRPC servers answer for an
    oversized message).
    """
    if deadline_passed:
        return DEADLINE_EXCEEDED
    if http_status in (413, 431):
        return RESOURCE_EXHAUSTED
    if http_status in (400, 405, 505):
        return INTERNAL
    if http_status == 401:
        return UNAUTHENTICATED
    if http_status == 403:
        return PERMISSION_DENIED
    if http_status == 404:
        return UNIMPLEMENTED
    if http_status in (408, 504):
        return DEADLINE_EXCEEDED
    if http_status in (429, 502, 503):
        return UNAVAILABLE
    return UNKNOWN


def encode_message(text: str) -> bytes:
    """A grpc-message value: UTF-8, percent-encoded outside printable ASCII and '%'."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def decode_message(value: bytes) -> str:
    """The text of a grpc-message value (undecodable escapes are kept as they are)."""
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        byte = value[i]
        if byte == 0x25 and i + 2 < n and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(byte)
        i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)
