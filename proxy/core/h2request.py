"""The head of an HTTP/2 request: its pseudo-header fields checked and its fields made ready
for the exchange (RFC 9113 section 8). Pure core: no I/O.

h2 can check request heads itself, but it treats every malformed head as a connection error:
one bad request would end every other request of the connection. RFC 9113 section 8.1.1 makes
a malformed request a *stream* error, so the data plane turns h2's checks off and uses these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Fields that are specific to one HTTP/1.1 connection and never valid in HTTP/2 (RFC 9113
# section 8.2.2); `te` is allowed with the value `trailers` only.
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)

_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})

# Bytes a field name may not hold (RFC 9113 section 8.2.1): controls, space, upper case, DEL
# and above; ':' only as the first byte of a pseudo-header.
_BAD_NAME_BYTES: Final = frozenset(
    [*range(0x21), *range(0x41, 0x5B), *range(0x7F, 0x100), ord(":")]
)


# What a method token is made of (RFC 9110 section 5.6.2, tchar).
_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class MalformedRequest(Exception):
    """A request head RFC 9113 calls malformed: answered with RST_STREAM PROTOCOL_ERROR."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A checked request head. `fields` are the regular fields in order, cookies joined into
    one (RFC 9113 section 8.2.3); `authority` is :authority, else the Host field, else None."""

    method: str
    scheme: bytes
    authority: bytes | None
    path: bytes
    protocol: bytes | None  # :protocol of an extended CONNECT (RFC 8441)
    fields: tuple[tuple[bytes, bytes], ...]
    size: int  # names and values, as the exchange counts a head


def _check_name(name: bytes, pseudo: bool) -> None:
    if not name or (pseudo and len(name) == 1):
        raise MalformedRequest("empty field name")
    body = name[1:] if pseudo else name
    for byte in body:
        if byte in _BAD_NAME_BYTES:
            raise MalformedRequest(f"invalid field name {name!r}")


def _check_value(name: bytes, value: bytes) -> None:
    if b"\x00" in value or b"\r" in value or b"\n" in value:
        raise MalformedRequest(f"invalid value of field {name!r}")
    if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise MalformedRequest(f"value of field {name!r} starts or ends with white space")


def parse_request(headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """Check a decoded request header block and split it into pseudo-headers and fields.

    Raises MalformedRequest for what RFC 9113 section 8 calls malformed: a missing, repeated,
    unknown or late pseudo-header, a field name that is not lower case, a connection-specific
    field, `te` other than `trailers`, an empty :path, a Host that names another authority.
    """
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host: bytes | None = None
    size = 0
    for name, value in headers:
        size += len(name) + len(value)
        if name[:1] == b":":
            _check_name(name, True)
            if fields or cookies or host is not None:
                raise MalformedRequest(f"pseudo-header {name!r} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise MalformedRequest(f"unknown pseudo-header {name!r}")
            if name in pseudo:
                raise MalformedRequest(f"repeated pseudo-header {name!r}")
            _check_value(name, value)
            pseudo[name] = value
            continue
        _check_name(name, False)
        _check_value(name, value)
        if name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific field {name!r}")
        if name == b"te" and value.lower() != b"trailers":
            raise MalformedRequest("te other than 'trailers'")
        if name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise MalformedRequest("more than one host field")
            host = value
        else:
            fields.append((name, value))
    method = pseudo.get(b":method")
    if not method:
        raise MalformedRequest("no :method")
    protocol = pseudo.get(b":protocol")
    scheme = pseudo.get(b":scheme", b"")
    path = pseudo.get(b":path", b"")
    if method == b"CONNECT" and protocol is None:
        # A plain CONNECT names only an authority (RFC 9113 section 8.5).
        if scheme or path:
            raise MalformedRequest("CONNECT with :scheme or :path")
    else:
        if protocol is not None and method != b"CONNECT":
            raise MalformedRequest(":protocol outside an extended CONNECT")
        if not scheme:
            raise MalformedRequest("no :scheme")
        if not path:
            raise MalformedRequest("no :path")
    authority = pseudo.get(b":authority")
    if authority is not None and host is not None and host != authority:
        raise MalformedRequest("host field names another authority than :authority")
    if authority is None:
        authority = host
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    if method.translate(None, _TCHAR):
        raise MalformedRequest(f"invalid :method {method!r}")
    return RequestHead(
        method.decode("ascii"), scheme, authority, path, protocol, tuple(fields), size
    )
