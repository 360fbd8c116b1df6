"""TLS termination (contract section 10) against a real Turnout subprocess.

Certificates are made at test time with trustme; clients are Python's ssl module and curl.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from proxy.control.addresses import StartError, claim_addresses
from proxy.core.config import parse_config
from proxy.core.spec import ConfigSpec
from tests.support import wait_until
from tests.support.certs import PemPair, write_ca, write_pair
from tests.support.turnout import PROJECT_ROOT, TurnoutFactory, TurnoutProcess, free_port
from tests.support.upstreams import EchoUpstream, pattern_bytes, pattern_sha256


def _client_context(ca_file: Path, *, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = check_hostname
    return ctx


def https_exchange(
    port: int,
    ctx: ssl.SSLContext,
    server_name: str | None,
    host: str = "app.test",
    path: str = "/",
) -> tuple[str | None, bytes]:
    """One `Connection: close` request over TLS: (the TLS version, the whole response)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname=server_name)
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    chunks = []
    while chunk := tls.recv(65536):
        chunks.append(chunk)
    version = tls.version()
    tls.close()
    return version, b"".join(chunks)


def peer_names(ctx: ssl.SSLContext, port: int, server_name: str | None) -> list[str]:
    """The DNS names of the certificate Turnout serves for `server_name`."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    san: Any = cert.get("subjectAltName", ())
    return [str(value) for kind, value in san if kind == "DNS"]


def echo_body(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    data: dict[str, Any] = orjson.loads(body)
    return data


def header(echo: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pairs(ca: trustme.CA, tmp_path: Path) -> dict[str, PemPair]:
    folder = tmp_path / "certs"
    folder.mkdir()
    return {
        "api": write_pair(ca, folder, "api", "api.example.test"),
        "wild": write_pair(ca, folder, "wild", "*.apps.example.test"),
        "www": write_pair(ca, folder, "www", "www.example.test", "example.test"),
    }


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    return write_ca(ca, tmp_path / "ca.pem")


def tls_config(
    blue: EchoUpstream, pairs: dict[str, PemPair], **tls: Any
) -> tuple[dict[str, Any], int, int]:
    plain, secure = free_port(), free_port()
    settings = {"certificates": [pairs[n].config() for n in ("api", "wild", "www")], **tls}
    config = {
        "listen": [
            {"address": f"127.0.0.1:{plain}"},
            {"address": f"127.0.0.1:{secure}", "tls": settings},
        ],
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    return config, plain, secure


def test_sni_picks_exact_wildcard_and_default_certificates(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, _, port = tls_config(blue, pairs)
    turnout_factory(config)
    ctx = _client_context(ca_file)
    assert peer_names(ctx, port, "api.example.test") == ["api.example.test"]
    assert peer_names(ctx, port, "www.example.test") == ["www.example.test", "example.test"]
    assert peer_names(ctx, port, "example.test") == ["www.example.test", "example.test"]
    # A wildcard covers exactly one label.
    assert peer_names(ctx, port, "shop.apps.example.test") == ["*.apps.example.test"]
    no_check = _client_context(ca_file, check_hostname=False)
    assert peer_names(no_check, port, "a.b.apps.example.test") == ["api.example.test"]
    # No SNI, or a name no certificate has: the first certificate is the default.
    assert peer_names(no_check, port, None) == ["api.example.test"]
    assert peer_names(no_check, port, "other.test") == ["api.example.test"]


def test_plain_and_tls_listeners_side_by_side(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, plain, secure = tls_config(blue, pairs)
    turnout = turnout_factory(config, access_log=True)
    version, response = https_exchange(
        secure, _client_context(ca_file), "api.example.test", host="api.example.test"
    )
    echo = echo_body(response)
    assert header(echo, "x-forwarded-proto") == ["https"]
    assert header(echo, "host") == ["api.example.test"]
    with socket.create_connection(("127.0.0.1", plain), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    assert header(echo_body(b"".join(chunks)), "x-forwarded-proto") == ["http"]
    https_id = header(echo, "x-request-id")[0]
    plain_id = header(echo_body(b"".join(chunks)), "x-request-id")[0]
    lines = turnout.wait_for_log({https_id, plain_id})
    assert lines[https_id]["tls_version"] == version == "TLSv1.3"
    assert lines[https_id]["sni"] == "api.example.test"
    assert lines[plain_id]["tls_version"] is None
    assert lines[plain_id]["sni"] is None


def test_alpn_prefers_h2_then_http11(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, _, port = tls_config(blue, pairs)
    turnout_factory(config)
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        ctx = _client_context(ca_file)
        ctx.set_alpn_protocols(offered)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="api.example.test") as tls,
        ):
            assert tls.selected_alpn_protocol() == chosen


def test_min_version_13_refuses_a_tls12_client(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, _, port = tls_config(blue, pairs, min_version="1.3")
    turnout_factory(config)
    old = _client_context(ca_file)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        old.wrap_socket(raw, server_hostname="api.example.test"),
    ):
        pass
    _, response = https_exchange(port, _client_context(ca_file), "api.example.test")
    assert echo_body(response)["upstream"] == "blue"


def test_tls12_client_is_served_by_default(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, _, port = tls_config(blue, pairs)
    turnout_factory(config)
    ctx = _client_context(ca_file)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    version, response = https_exchange(port, ctx, "api.example.test")
    assert version == "TLSv1.2"
    assert echo_body(response)["upstream"] == "blue"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_cacert(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, _, port = tls_config(blue, pairs)
    turnout_factory(config)
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(ca_file),
            "--resolve",
            f"shop.apps.example.test:{port}:127.0.0.1",
            f"https://shop.apps.example.test:{port}/hello",
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    echo = orjson.loads(result.stdout)
    assert echo["path"] == "/hello"
    assert header(echo, "x-forwarded-proto") == ["https"]


def test_stalled_handshake_is_closed(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair]
) -> None:
    config, _, port = tls_config(blue, pairs)
    config["timeouts"] = {"client_keepalive": "1s"}
    turnout_factory(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Connected, but no ClientHello: Turnout closes the connection (EOF) on its own.
        sock.settimeout(15)
        assert sock.recv(1) == b""


def _validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "validate", str(config_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_validate_checks_certificate_files(
    tmp_path: Path, ca: trustme.CA, pairs: dict[str, PemPair]
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = {
        "listen": [
            {
                "address": "127.0.0.1:8443",
                "tls": {
                    "certificates": [
                        pairs["api"].config(),
                        {"cert": "missing.pem", "key": "missing.key"},
                        {"cert": str(pairs["api"].cert), "key": str(pairs["www"].key)},
                        {"cert": str(garbage), "key": str(pairs["api"].key)},
                    ]
                },
            }
        ],
        "upstreams": {"blue": {"endpoints": ["127.0.0.1:9001"]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    path = tmp_path / "bad.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    result = _validate(path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert any(
        "listen[0].tls.certificates[1]: cannot read" in line and "missing.pem" in line
        for line in lines
    ), lines
    assert any(
        "listen[0].tls.certificates[2]:" in line and "is not the key of" in line for line in lines
    ), lines
    assert any(
        "listen[0].tls.certificates[3]:" in line and "not a PEM certificate" in line
        for line in lines
    ), lines
    assert not any("certificates[0]" in line for line in lines), lines

    soon = datetime.now(UTC) + timedelta(days=3)
    expiring = write_pair(ca, tmp_path, "soon", "soon.example.test", not_after=soon)
    good = dict(config)
    good["listen"] = [
        {
            "address": "127.0.0.1:8443",
            "tls": {"certificates": [pairs["api"].config(), expiring.config()]},
        }
    ]
    path.write_bytes(orjson.dumps(good))
    result = _validate(path)
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:8443 (TLS, 2 certificates)" in result.stdout
    # Valid today, so not an error; but said.
    assert f"warning: certificate {expiring.cert} (soon.example.test)" in result.stderr
    assert "expires in 2.9 days" in result.stderr or "expires in 3.0 days" in result.stderr
    assert str(pairs["api"].cert) not in result.stderr


def test_start_refused_with_an_unusable_certificate(
    tmp_path: Path, pairs: dict[str, PemPair]
) -> None:
    config = {
        "listen": [
            {
                "address": f"127.0.0.1:{free_port()}",
                "tls": {"certificates": [{"cert": "nope.pem", "key": "nope.key"}]},
            }
        ],
        "admin": f"127.0.0.1:{free_port()}",
        "upstreams": {"blue": {"endpoints": ["127.0.0.1:9001"]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    path = tmp_path / "turnout.yaml"
    path.write_bytes(orjson.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", str(path), "--no-access-log"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "listen[0].tls.certificates[0]: cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def _der(pair: PemPair) -> bytes:
    """The DER form of the pair's leaf certificate (the first PEM block of its chain)."""
    pem = pair.cert.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


def served_der(ctx: ssl.SSLContext, port: int, server_name: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def replace_pair(source: PemPair, target: PemPair) -> None:
    """Install `source`'s files as `target`'s, each by an atomic rename (as certbot does)."""
    for src, dst in ((source.cert, target.cert), (source.key, target.key)):
        staging = dst.with_suffix(".new")
        staging.write_bytes(src.read_bytes())
        staging.rename(dst)


def keepalive_get(tls: ssl.SSLSocket) -> bytes:
    """One keep-alive request on an open TLS connection; the response head and body."""
    tls.sendall(b"GET /again HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        body += chunk
    return head + b"\r\n\r\n" + body


def admin_json(turnout: TurnoutProcess, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{turnout.admin_url}{path}", timeout=10) as response:
        data: dict[str, Any] = orjson.loads(response.read())
    return data


def scrape(turnout: TurnoutProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"{turnout.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def reloads(turnout: TurnoutProcess, result: str) -> float:
    return scrape(turnout)[("turnout_config_reloads_total", frozenset({("result", result)}))]


def test_renewed_certificate_is_served_without_dropping_connections(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, ca: trustme.CA, tmp_path: Path
) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    live = write_pair(ca, folder, "api", "api.example.test")
    first_der = _der(live)
    renewed = write_pair(ca, tmp_path, "renewed", "api.example.test")
    mismatched = PemPair(renewed.cert, write_pair(ca, tmp_path, "other", "x.test").key)
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    port = free_port()
    config = {
        "listen": [{"address": f"127.0.0.1:{port}", "tls": {"certificates": [live.config()]}}],
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    turnout = turnout_factory(config)
    ctx = _client_context(ca_file)
    assert served_der(ctx, port, "api.example.test") == first_der
    successes_before = reloads(turnout, "success")

    # Requests on new connections run all along the renewals: none may fail.
    stop = threading.Event()
    outcomes: list[str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                _, response = https_exchange(port, ctx, "api.example.test")
                outcomes.append("ok" if response.startswith(b"HTTP/1.1 200") else "bad status")
            except OSError as exc:
                outcomes.append(repr(exc))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="api.example.test") as kept,
    ):
        assert keepalive_get(kept).startswith(b"HTTP/1.1 200")

        # 1. A key that does not match: refused, the old pair stays, counted and shown.
        replace_pair(mismatched, live)
        wait_until(
            lambda: reloads(turnout, "failure") == 1,
            timeout=5,
            what="the bad pair counted as a reload failure",
        )
        error = admin_json(turnout, "/admin/config")["last_error"]
        assert "is not the key of" in error, error
        assert served_der(ctx, port, "api.example.test") == first_der

        # 2. A good renewed pair: new handshakes get it within 2 s; the open connection stays.
        replace_pair(renewed, live)
        wait_until(
            lambda: served_der(ctx, port, "api.example.test") == _der(renewed),
            timeout=2.5,
            what="the renewed certificate on new connections",
        )
        assert keepalive_get(kept).startswith(b"HTTP/1.1 200")
    stop.set()
    worker.join(20)
    assert outcomes.count("ok") == len(outcomes) > 0, [o for o in outcomes if o != "ok"][:5]
    view = admin_json(turnout, "/admin/config")
    assert view["last_error"] is None
    assert view["certificates"][0]["names"] == ["api.example.test"]
    assert reloads(turnout, "success") == successes_before + 1
    assert reloads(turnout, "failure") == 1


def test_expiry_metric_and_warning(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, ca: trustme.CA, tmp_path: Path
) -> None:
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(days=5)
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(days=90)
    expiring = write_pair(ca, tmp_path, "soon", "soon.example.test", not_after=soon)
    fine = write_pair(ca, tmp_path, "later", "later.example.test", not_after=later)
    port = free_port()
    address = f"127.0.0.1:{port}"
    turnout = turnout_factory(
        {
            "listen": [
                {
                    "address": address,
                    "tls": {"certificates": [fine.config(), expiring.config()]},
                }
            ],
            "upstreams": {"blue": {"endpoints": [blue.address]}},
            "routes": [{"name": "all", "split": {"blue": 100}}],
        }
    )
    samples = scrape(turnout)
    name = "turnout_tls_certificate_expiry_timestamp_seconds"
    assert samples[(name, frozenset({("listener", address), ("name", "soon.example.test")}))] == (
        soon.timestamp()
    )
    assert samples[(name, frozenset({("listener", address), ("name", "later.example.test")}))] == (
        later.timestamp()
    )
    stderr = turnout.stderr_text()
    assert f"certificate {expiring.cert} (soon.example.test) of {address} expires in" in stderr
    assert str(fine.cert) not in stderr


def test_client_ca_requires_a_client_certificate(
    turnout_factory: TurnoutFactory,
    blue: EchoUpstream,
    ca: trustme.CA,
    pairs: dict[str, PemPair],
    ca_file: Path,
    tmp_path: Path,
) -> None:
    clients = trustme.CA()
    client_ca = write_ca(clients, tmp_path / "clients-ca.pem")
    config, _, port = tls_config(blue, pairs, client_ca=str(client_ca))
    turnout_factory(config)

    trusted = _client_context(ca_file)
    clients.issue_cert("client.example.test").configure_cert(trusted)
    _, response = https_exchange(port, trusted, "api.example.test")
    assert echo_body(response)["upstream"] == "blue"

    stranger = _client_context(ca_file)
    trustme.CA().issue_cert("client.example.test").configure_cert(stranger)
    for ctx in (_client_context(ca_file), stranger):
        # Refused in the handshake (TLS 1.3 reports it on the first read): never a response.
        try:
            _, response = https_exchange(port, ctx, "api.example.test")
        except (ssl.SSLError, ConnectionError) as exc:
            response = repr(exc).encode()
        assert not response.startswith(b"HTTP/"), response


def test_a_refused_renewal_does_not_block_config_reloads(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, ca: trustme.CA, tmp_path: Path
) -> None:
    live = write_pair(ca, tmp_path, "api", "api.example.test")
    port = free_port()
    config: dict[str, Any] = {
        "listen": [{"address": f"127.0.0.1:{port}", "tls": {"certificates": [live.config()]}}],
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}}],
    }
    turnout = turnout_factory(config)
    live.cert.write_text("garbage\n")
    wait_until(lambda: reloads(turnout, "failure") == 1, timeout=5, what="the refused renewal")
    config["routes"].insert(
        0, {"name": "extra", "match": {"path_prefix": "/x"}, "split": {"blue": 1}}
    )
    turnout.config_path.write_bytes(orjson.dumps({**config, "admin": turnout.config["admin"]}))
    request = urllib.request.Request(f"{turnout.admin_url}/admin/reload", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    view = admin_json(turnout, "/admin/config")
    assert [route["name"] for route in view["config"]["routes"]] == ["extra", "all"]
    assert "not a PEM certificate" in view["certificates_error"]


def test_ten_mib_bodies_both_ways_over_tls(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, _, port = tls_config(blue, pairs)
    turnout_factory(config)
    size = 10 * 1024 * 1024
    body = pattern_bytes(size)
    ctx = _client_context(ca_file)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="api.example.test") as tls,
    ):
        tls.sendall(
            b"POST /upload HTTP/1.1\r\nHost: api.example.test\r\n"
            + f"Content-Length: {size}\r\n\r\n".encode()
            + body
        )
        echo = orjson.loads(_read_response(tls))
        assert echo["body_len"] == size
        assert echo["body_sha256"] == pattern_sha256(size)
        tls.sendall(f"GET /fixed?n={size} HTTP/1.1\r\nHost: api.example.test\r\n\r\n".encode())
        assert _read_response(tls) == body


def _read_response(tls: ssl.SSLSocket) -> bytes:
    """The body of one Content-Length response on a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    chunks = [rest]
    got = len(rest)
    while got < length:
        chunk = tls.recv(1 << 20)
        assert chunk, "connection closed"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_every_listener_address_is_claimed(pairs: dict[str, PemPair], tmp_path: Path) -> None:
    plain, secure = free_port(), free_port()
    tls = {"certificates": [pairs["api"].config()]}

    def spec(*addresses: str) -> ConfigSpec:
        listen = [{"address": a, **({"tls": tls} if i else {})} for i, a in enumerate(addresses)]
        text = orjson.dumps(
            {
                "listen": listen,
                "admin": f"127.0.0.1:{free_port()}",
                "upstreams": {"blue": {"endpoints": ["127.0.0.1:9001"]}},
                "routes": [{"name": "all", "split": {"blue": 100}}],
            }
        ).decode()
        return parse_config(text, str(tmp_path / "turnout.yaml"))

    claims = claim_addresses(spec(f"127.0.0.1:{plain}", f"127.0.0.1:{secure}"))
    try:
        # A second Turnout whose only overlap is the TLS listener is refused, naming it.
        with pytest.raises(StartError, match=rf"listen address 127\.0\.0\.1:{secure} is already"):
            claim_addresses(spec(f"127.0.0.1:{free_port()}", f"127.0.0.1:{secure}"))
    finally:
        claims.close()
    # Released, both addresses: the same claim succeeds again.
    claim_addresses(spec(f"127.0.0.1:{plain}", f"127.0.0.1:{secure}")).close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_sees_the_certificate_of_its_servername(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, pairs: dict[str, PemPair], ca_file: Path
) -> None:
    config, _, port = tls_config(blue, pairs)
    turnout_factory(config)
    for server_name, expected in (
        ("www.example.test", "DNS:www.example.test, DNS:example.test"),
        ("shop.apps.example.test", "DNS:*.apps.example.test"),
    ):
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                server_name,
                "-CAfile",
                str(ca_file),
                "-verify_return_error",
            ],
            input=b"",
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        pem = result.stdout.split(b"-----BEGIN CERTIFICATE-----", 1)[1]
        pem = b"-----BEGIN CERTIFICATE-----" + pem.split(b"-----END CERTIFICATE-----")[0]
        shown = subprocess.run(
            ["openssl", "x509", "-noout", "-ext", "subjectAltName"],
            input=pem + b"-----END CERTIFICATE-----\n",
            capture_output=True,
            timeout=20,
            check=True,
        )
        assert expected in shown.stdout.decode(), shown.stdout
        assert b"Verify return code: 0 (ok)" in result.stdout
