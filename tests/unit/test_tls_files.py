"""The TLS file checks of proxy.runtime.tls: every bad file is one clear, located line, no crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from proxy.core.config import parse_config
from proxy.core.spec import ConfigSpec
from proxy.runtime.tls import CertificateSet, load_listener, tls_file_problems
from tests.support.certs import PemPair, write_ca, write_pair


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def spec_with(tmp_path: Path, tls: str, upstream_tls: str = "") -> ConfigSpec:
    text = f"""
listen:
  - address: 127.0.0.1:8443
    tls: {tls}
upstreams:
  blue: {{endpoints: [127.0.0.1:9001]{upstream_tls}}}
routes:
  - {{name: r, split: {{blue: 1}}}}
"""
    return parse_config(text, str(tmp_path / "turnout.yaml"))


def pair_yaml(pair: PemPair) -> str:
    return f"{{cert: {pair.cert}, key: {pair.key}}}"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "holds no PEM CA certificate"),
        (b"garbage\n", "holds no PEM CA certificate"),
    ],
)
def test_a_bad_client_ca_is_reported(
    ca: trustme.CA, tmp_path: Path, content: bytes, expected: str
) -> None:
    pair = write_pair(ca, tmp_path, "api", "api.test")
    bad = tmp_path / "clients.pem"
    bad.write_bytes(content)
    spec = spec_with(tmp_path, f"{{certificates: [{pair_yaml(pair)}], client_ca: {bad}}}")
    problems = tls_file_problems(spec)
    assert problems == [f"listen[0].tls.certificates[0]: {bad} {expected}"]


def test_a_missing_client_ca_is_reported_once(ca: trustme.CA, tmp_path: Path) -> None:
    pairs = [write_pair(ca, tmp_path, name, f"{name}.test") for name in ("a", "b")]
    certs = ", ".join(pair_yaml(p) for p in pairs)
    spec = spec_with(tmp_path, f"{{certificates: [{certs}], client_ca: nope.pem}}")
    problems = tls_file_problems(spec)
    assert len(problems) == 1
    assert problems[0].startswith("listen[0].tls.client_ca: cannot read ")


@pytest.mark.parametrize(
    ("cert", "key", "expected"),
    [
        (b"", None, "is not a PEM certificate"),
        (None, b"", "not a PEM certificate chain and its key"),
        (None, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "and its key"),
    ],
)
def test_bad_pairs_are_reported(
    ca: trustme.CA, tmp_path: Path, cert: bytes | None, key: bytes | None, expected: str
) -> None:
    pair = write_pair(ca, tmp_path, "api", "api.test")
    if cert is not None:
        pair.cert.write_bytes(cert)
    if key is not None:
        pair.key.write_bytes(key)
    problems = tls_file_problems(spec_with(tmp_path, f"{{certificates: [{pair_yaml(pair)}]}}"))
    assert len(problems) == 1
    assert expected in problems[0], problems


def test_upstream_files_are_checked(ca: trustme.CA, tmp_path: Path) -> None:
    pair = write_pair(ca, tmp_path, "api", "api.test")
    empty = tmp_path / "empty-ca.pem"
    empty.write_bytes(b"")
    spec = spec_with(tmp_path, f"{{certificates: [{pair_yaml(pair)}]}}", f", tls: {{ca: {empty}}}")
    assert tls_file_problems(spec) == [f"upstreams.blue.tls: {empty} holds no PEM CA certificate"]
    good = spec_with(
        tmp_path,
        f"{{certificates: [{pair_yaml(pair)}]}}",
        f", tls: {{ca: {write_ca(ca, tmp_path / 'ca.pem')}, cert: {pair.cert}, key: {pair.key}}}",
    )
    assert tls_file_problems(good) == []


def test_sni_choice(ca: trustme.CA, tmp_path: Path) -> None:
    pairs = [
        write_pair(ca, tmp_path, "a", "API.test"),
        write_pair(ca, tmp_path, "w", "*.apps.test"),
        write_pair(ca, tmp_path, "b", "api.test", "*.apps.test"),
    ]
    certs = ", ".join(pair_yaml(p) for p in pairs)
    spec = spec_with(tmp_path, f"{{certificates: [{certs}]}}")
    listener = spec.listeners[0]
    assert listener.tls is not None
    loaded = load_listener(listener.address, listener.tls)
    chosen = CertificateSet(loaded)
    first, wild, _ = (cert.context for cert in loaded)
    assert chosen.choose(None) is first
    assert chosen.choose("api.TEST.") is first  # case and a trailing dot do not matter
    assert chosen.choose("x.apps.test") is wild  # the earlier certificate with the name wins
    assert chosen.choose("apps.test") is first  # a wildcard needs a label
    assert chosen.choose("a.b.apps.test") is first  # ... exactly one
    assert chosen.choose("other.test") is first
    assert [cert.names for cert in loaded] == [
        ("api.test",),
        ("*.apps.test",),
        ("api.test", "*.apps.test"),
    ]
