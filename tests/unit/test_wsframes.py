"""Frame-boundary tracking for clean WebSocket closes (proxy.core.wsframes)."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.wsframes import GOING_AWAY, FrameTracker, close_frame


def frame(payload: bytes, *, masked: bool, opcode: int = 0x2) -> bytes:
    """Encode one WebSocket frame (FIN set)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, (0x80 if masked else 0) | size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, (0x80 if masked else 0) | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, (0x80 if masked else 0) | 127)) + size.to_bytes(8, "big")
    if masked:
        key = os.urandom(4)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


@given(
    sizes=st.lists(st.sampled_from([0, 1, 125, 126, 127, 1000, 65535, 65536, 70000]), max_size=6),
    masked=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=30),
)
def test_boundary_known_after_every_frame_whatever_the_reads(
    sizes: list[int], masked: bool, cuts: list[int]
) -> None:
    stream = b""
    ends = {0}
    for size in sizes:
        stream += frame(b"x" * size, masked=masked)
        ends.add(len(stream))
    tracker = FrameTracker()
    pos = 0
    steps = iter(cuts)
    while pos < len(stream):
        step = next(steps, len(stream))
        chunk = stream[pos : pos + step]
        tracker.feed(chunk)
        pos += len(chunk)
        assert tracker.at_boundary == (pos in ends), pos
    assert tracker.at_boundary


def test_mid_header_is_not_a_boundary() -> None:
    tracker = FrameTracker()
    tracker.feed(frame(b"y" * 300, masked=True)[:3])
    assert not tracker.at_boundary


def test_oversized_length_marks_stream_broken() -> None:
    tracker = FrameTracker()
    tracker.feed(bytes((0x82, 127)) + (1 << 63).to_bytes(8, "big"))
    assert tracker.broken
    assert not tracker.at_boundary


def test_close_frames_encode_going_away() -> None:
    assert close_frame(GOING_AWAY, None) == b"\x88\x02\x03\xe9"
    masked = close_frame(GOING_AWAY, b"\x01\x02\x03\x04")
    assert masked[:2] == b"\x88\x82"
    assert masked[2:6] == b"\x01\x02\x03\x04"
    assert bytes(b ^ k for b, k in zip(masked[6:], b"\x01\x02", strict=True)) == b"\x03\xe9"
    tracker = FrameTracker()
    tracker.feed(masked)
    assert tracker.at_boundary
