"""`headers.field`: the first value of a field among (lower-cased name, name, value) triples,
as the exchange, the mirror and gRPC read a response's or request's fields."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.headers import field

NAMES = st.sampled_from([b"content-type", b"grpc-status", b"user-agent", b"x-a"])
FIELDS = st.lists(st.tuples(NAMES, st.binary(max_size=8)), max_size=6)


@given(FIELDS, NAMES)
def test_the_first_value_of_that_name_or_none(
    pairs: list[tuple[bytes, bytes]], name: bytes
) -> None:
    fields = [(lname, lname.title(), value) for lname, value in pairs]
    values = [value for lname, value in pairs if lname == name]
    assert field(fields, name) == (values[0] if values else None)


def test_names_are_compared_as_given_lower_cased() -> None:
    fields = [(b"content-type", b"Content-Type", b"application/json")]
    assert field(fields, b"content-type") == b"application/json"
    assert field(fields, b"Content-Type") is None
