"""Header rules of contract section 3: hop-by-hop stripping and the forwarding headers.

Works on raw `bytes` names and values as the C parser hands them over, so the data plane never
decodes a header it only copies. Pure core: no I/O, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

# RFC 9110 section 7.6.1 plus the legacy ones the contract names. Lower-case. The one list:
# the data plane builds its request and response filters from it.
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

IDEMPOTENT_RETRY_METHODS: Final[frozenset[str]] = frozenset(
    {"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}
)
RETRY_BODY_LIMIT: Final = 64 * 1024


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The lower-cased tokens of every `Connection` header value (`close`, header names...)."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def is_chunked(transfer_encoding: bytes) -> bool:
    """Whether `chunked` is the final transfer coding (RFC 9112 section 6.3)."""
    last = transfer_encoding.rsplit(b",", 1)[-1]
    return last.strip().lower() == b"chunked"


def field(fields: Iterable[tuple[bytes, bytes, bytes]], lname: bytes) -> bytes | None:
    """The value of the first field named `lname` among (lower-cased name, name, value)."""
    for name, _, value in fields:
        if name == lname:
            return value
    return None


def forwarded_for(existing: Sequence[bytes], client: str) -> bytes:
    """X-Forwarded-For: the values received, in order, with the client's address appended."""
    encoded = client.encode("ascii", "replace")
    if not existing:
        return encoded
    return b", ".join([*existing, encoded])


def via_names_us(value: bytes, name: bytes) -> bool:
    """Whether a Via field value has an entry received by `name` (RFC 9110 section 7.6.3).

    Entries are `protocol received-by [comment]`, comma-separated.
    """
    if name not in value:
        return False
    for entry in value.split(b","):
        parts = entry.split()
        if len(parts) >= 2 and parts[1] == name:
            return True
    return False


def last_chunk(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The end of a chunked body (RFC 9112 section 7.1): the zero-size chunk, the trailer
    fields, the blank line."""
    parts = [b"0\r\n"]
    for name, value in trailers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
