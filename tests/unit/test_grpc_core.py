"""The pure gRPC rules: what a gRPC request is, its deadline, proxy-made statuses."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.core import grpc


def test_content_types() -> None:
    assert grpc.is_grpc(b"application/grpc")
    assert grpc.is_grpc(b"application/grpc+proto")
    assert grpc.is_grpc(b"Application/GRPC; charset=utf-8")
    assert not grpc.is_grpc(b"application/grpc-web")
    assert not grpc.is_grpc(b"application/json")
    assert not grpc.is_grpc(b"")


def test_timeouts() -> None:
    assert grpc.parse_timeout(b"1S") == 1.0
    assert grpc.parse_timeout(b"250m") == 0.25
    assert grpc.parse_timeout(b"2M") == 120.0
    assert grpc.parse_timeout(b"1H") == 3600.0
    assert grpc.parse_timeout(b"5000u") == 0.005
    assert grpc.parse_timeout(b"99999999n") is not None
    assert grpc.parse_timeout(b"123456789S") is None  # more than 8 digits
    assert grpc.parse_timeout(b"S") is None
    assert grpc.parse_timeout(b"10x") is None
    assert grpc.parse_timeout(b"-1S") is None
    assert grpc.parse_timeout(b"") is None


def test_local_statuses() -> None:
    assert grpc.status_for_local(503, False) == grpc.UNAVAILABLE
    assert grpc.status_for_local(502, False) == grpc.UNAVAILABLE
    assert grpc.status_for_local(504, False) == grpc.DEADLINE_EXCEEDED
    assert grpc.status_for_local(502, True) == grpc.DEADLINE_EXCEEDED
    assert grpc.status_for_local(404, False) == grpc.UNIMPLEMENTED
    assert grpc.status_for_local(413, False) == grpc.RESOURCE_EXHAUSTED
    assert grpc.status_for_local(500, False) == grpc.UNKNOWN
    assert grpc.UNAVAILABLE in grpc.ERROR_CODES
    assert grpc.INVALID_ARGUMENT not in grpc.ERROR_CODES
    assert grpc.NAMES[grpc.UNAVAILABLE] == "UNAVAILABLE"


@given(st.text())
def test_messages_round_trip(text: str) -> None:
    encoded = grpc.encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert grpc.decode_message(encoded) == text.encode("utf-8", "replace").decode("utf-8")


def test_message_decoding_keeps_bad_escapes() -> None:
    assert grpc.decode_message(b"50%") == "50%"
    assert grpc.decode_message(b"%zz") == "%zz"
    assert grpc.decode_message(b"a%20b") == "a b"


def test_status_of_the_fields() -> None:
    def fields(*pairs: tuple[bytes, bytes]) -> list[tuple[bytes, bytes, bytes]]:
        return [(name.lower(), name, value) for name, value in pairs]

    assert grpc.status_of(fields((b"grpc-status", b"13"))) == grpc.INTERNAL
    assert grpc.status_of(fields((b"x-other", b"1"), (b"grpc-status", b" 0 "))) == grpc.OK
    assert grpc.status_of(fields((b"x-other", b"1"))) == -1
    assert grpc.status_of([]) == -1


@given(st.binary(max_size=8))
def test_any_status_value_is_a_code_from_0_to_99(value: bytes) -> None:
    code = grpc.status_of([(b"grpc-status", b"grpc-status", value)])
    assert 0 <= code <= 99
    if not value.strip().isdigit() or len(value.strip()) > 2:
        assert code == grpc.UNKNOWN
