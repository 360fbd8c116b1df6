"""The end of a chunked body, written by both sides (client responses, upstream requests)."""

from __future__ import annotations

from proxy.core.headers import last_chunk


def test_without_trailers_it_is_the_zero_chunk_and_a_blank_line() -> None:
    assert last_chunk([]) == b"0\r\n\r\n"


def test_trailers_sit_between_the_zero_chunk_and_the_blank_line() -> None:
    fields = [(b"grpc-status", b"0"), (b"x-checksum", b"abc")]
    assert last_chunk(fields) == b"0\r\ngrpc-status: 0\r\nx-checksum: abc\r\n\r\n"
