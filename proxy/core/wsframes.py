"""WebSocket frame boundaries, so the proxy can end a tunnel with a proper close frame.

A proxied WebSocket is a byte tunnel; the proxy never decodes messages. To close one cleanly
(shutdown, or its upstream removed by a reload) it must put a close frame (code 1001, "going
away") between two frames, never inside one. `FrameTracker` follows the frame headers of one
direction (RFC 6455 section 5.2) cheaply: it only counts payload bytes. Pure core: no I/O.
"""

from __future__ import annotations

from typing import Final

GOING_AWAY: Final = 1001


class FrameTracker:
    """Follows frame boundaries in one direction of a WebSocket byte stream."""

    __slots__ = ("_head", "_remaining", "broken")

    def __init__(self) -> None:
        self._head = b""  # a frame header split across reads
        self._remaining = 0  # payload bytes of the current frame still to come
        self.broken = False  # the stream is not WebSocket framing: never inject

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at the end of a frame."""
        return not self.broken and self._remaining == 0 and not self._head

    def feed(self, data: bytes) -> None:
        """Account for bytes passing in this direction."""
        pos = 0
        size = len(data)
        while pos < size and not self.broken:
            if self._remaining:
                step = min(self._remaining, size - pos)
                self._remaining -= step
                pos += step
                continue
            # A header is at most 14 bytes, so when this slice cannot complete it, the slice
            # already took every byte left in `data`.
            head = self._head + data[pos : pos + 14]
            need = _header_length(head)
            if need is None or len(head) < need:
                self._head = head
                return
            pos += need - len(self._head)
            self._head = b""
            self._remaining = _payload_length(head)
            if self._remaining < 0:
                self.broken = True


def _header_length(head: bytes) -> int | None:
    """Bytes of the frame header starting at `head`, or None if not enough bytes to tell."""
    if len(head) < 2:
        return None
    length7 = head[1] & 0x7F
    masked = head[1] & 0x80
    extra = 2 if length7 == 126 else 8 if length7 == 127 else 0
    return 2 + extra + (4 if masked else 0)


def _payload_length(head: bytes) -> int:
    length7 = head[1] & 0x7F
    if length7 == 126:
        return int.from_bytes(head[2:4], "big")
    if length7 == 127:
        value = int.from_bytes(head[2:10], "big")
        return -1 if value >> 63 else value
    return length7


def close_frame(code: int, mask: bytes | None) -> bytes:
    """A close frame with `code`; client-to-server frames must be masked with a 4-byte key."""
    payload = code.to_bytes(2, "big")
    if mask is None:
        return bytes((0x88, len(payload))) + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x88, 0x80 | len(payload))) + mask + masked
