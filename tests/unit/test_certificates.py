"""The supervisor's certificates (proxy.control.certificates) on files made with trustme: what a
renewal sends to the workers and counts, and what a broken one leaves in force. No processes."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trustme

from proxy.control.certificates import Certificates
from proxy.control.views import certificates_view
from proxy.core.config import parse_config
from proxy.core.spec import Listener
from tests.support.certs import PemPair, write_pair


def listeners_of(pair: PemPair) -> tuple[Listener, ...]:
    config = {
        "listen": [
            {"address": "127.0.0.1:8080"},
            {"address": "127.0.0.1:8443", "tls": {"certificates": [pair.config()]}},
        ],
        "upstreams": {"blue": {"endpoints": ["127.0.0.1:9001"]}},
        "routes": [{"name": "all", "split": {"blue": 1}}],
    }
    return parse_config(orjson.dumps(config).decode(), "t.yaml").listeners


class Recorder:
    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []
        self.outcomes: list[bool] = []


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def make(pair: PemPair) -> tuple[Certificates, Recorder]:
    seen = Recorder()
    certificates = Certificates(
        listeners_of(pair), on_renewed=seen.sent.append, on_outcome=seen.outcomes.append
    )
    return certificates, seen


async def test_unchanged_files_are_nothing_to_do(ca: trustme.CA, tmp_path: Path) -> None:
    certificates, seen = make(write_pair(ca, tmp_path, "api", "api.example.test"))
    assert certificates.watched
    first = certificates.message()
    assert first is not None
    assert first["generation"] == 0
    assert [entry["names"] for entry in certificates_view(certificates.loaded)] == [
        ["api.example.test"]
    ]
    assert await certificates.check() is False
    assert (seen.sent, seen.outcomes, certificates.error) == ([], [], None)


async def test_a_renewal_is_sent_and_counted(ca: trustme.CA, tmp_path: Path) -> None:
    certificates, seen = make(write_pair(ca, tmp_path, "api", "api.example.test"))
    write_pair(ca, tmp_path, "api", "api.example.test", "www.example.test")
    assert await certificates.check() is True
    assert seen.outcomes == [True]
    (sent,) = seen.sent
    assert sent == certificates.message()
    assert sent["generation"] == 1
    (listener,) = certificates.loaded
    assert listener == "127.0.0.1:8443"
    assert set(certificates.loaded[listener][0].names) == {"api.example.test", "www.example.test"}


async def test_a_broken_renewal_keeps_the_old_pair_and_is_reported_once(
    ca: trustme.CA, tmp_path: Path
) -> None:
    pair = write_pair(ca, tmp_path, "api", "api.example.test")
    certificates, seen = make(pair)
    before = certificates.message()
    # A key of another certificate: the pair does not match.
    other = write_pair(ca, tmp_path, "other", "other.example.test")
    pair.key.write_bytes(other.key.read_bytes())
    assert await certificates.check() is False
    assert await certificates.check() is False
    assert seen.outcomes == [False]
    assert seen.sent == []
    assert certificates.error is not None
    assert certificates.error.startswith("certificate renewal refused, the old certificates stay")
    assert certificates.message() == before
