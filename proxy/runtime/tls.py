"""TLS: server contexts for TLS listeners (chosen by SNI), client contexts for upstreams, and
the checks of their files.

Shell code (reads files, builds `ssl.SSLContext`s). The supervisor reads a listener's files
once (`read_material`), checks the bytes, and sends them to the workers, which load exactly
those bytes into contexts (`CertificateSet`): a renewal caught half-written never reaches a
worker. Upstream client contexts (`client_context`) are built from the files where they are
used (workers, health checks, mirror) after the supervisor checked them.

Defaults are those of Mozilla's "intermediate" profile: TLS 1.2+, its cipher list, no
compression, no renegotiation, session tickets on (OpenSSL's default).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from proxy.core.spec import CertificateFiles, ConfigSpec, ListenerTls, UpstreamTls

# Mozilla's "intermediate" cipher suites for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults).
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)

# What TLS listeners offer, in order of preference: HTTP/2 (proxy.dataplane.http2), then 1.1.
SERVER_ALPN_PROTOCOLS = ("h2", "http/1.1")
# What Turnout offers an upstream endpoint over TLS.
ALPN_PROTOCOLS = ("http/1.1",)

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# Where the SNI callback leaves the name the client asked for, on the connection's SSLObject
# (the access log reads it back: a server-side SSLObject does not keep it itself).
_SNI_ATTRIBUTE = "turnout_sni"


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    """One certificate pair loaded into its own server context."""

    files: CertificateFiles
    names: tuple[str, ...]  # DNS names from the SAN (the CN when there is no SAN), lower-case
    not_after: float  # expiry, seconds since the epoch
    context: ssl.SSLContext


@dataclass(frozen=True, slots=True)
class ListenerMaterial:
    """The bytes of a TLS listener's files, read once: checked by the supervisor, then sent to
    the workers as they are, so a worker loads exactly what was checked (never a file caught
    half-written by a renewal)."""

    address: str
    pairs: tuple[tuple[bytes, bytes], ...]  # (cert chain PEM, key PEM), in config order
    client_ca: bytes | None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_material(address: str, tls: ListenerTls) -> ListenerMaterial:
    """Read a listener's certificate, key and CA files (TlsFileError naming the one unreadable)."""
    pairs = tuple((_read(files.cert), _read(files.key)) for files in tls.certificates)
    client_ca = _read(tls.client_ca) if tls.client_ca is not None else None
    return ListenerMaterial(address, pairs, client_ca)


def _decode_certificate(path: str, shown: str) -> dict[str, Any]:
    # The ssl module's own decoder of a PEM file's first certificate (the leaf of a chain);
    # it is what `getpeercert()` uses, without needing a connection or a third-party parser.
    decode: Any = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
    try:
        info: dict[str, Any] = decode(path)
    except (ssl.SSLError, ValueError):
        raise TlsFileError(f"{shown} is not a PEM certificate") from None
    return info


def certificate_names(info: dict[str, Any]) -> tuple[str, ...]:
    """The DNS names a decoded certificate is valid for (SAN, else the subject's CN)."""
    names = [value.lower() for kind, value in info.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in info.get("subject", ()):
            names += [value.lower() for key, value in rdn if key == "commonName"]
    return tuple(dict.fromkeys(names))


def _server_context(
    tls: ListenerTls, files: CertificateFiles, cert_path: str, key_path: str, ca: bytes | None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS[tls.min_version]
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(SERVER_ALPN_PROTOCOLS))
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:  # before OSError, of which it is a subclass
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsFileError(f"{files.key} is not the key of {files.cert}") from None
        raise TlsFileError(
            f"{files.cert} / {files.key}: not a PEM certificate chain and its key ({exc.reason})"
        ) from None
    if ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):  # ValueError: an empty file
            raise TlsFileError(f"{tls.client_ca} holds no PEM CA certificate") from None
    return ctx


def load_material(tls: ListenerTls, material: ListenerMaterial) -> list[LoadedCertificate]:
    """Load every pair of a listener from its bytes: parses, key matches, names a host.

    TlsFileError names the file at fault (the first). The ssl module loads certificates and
    keys from files only: each pair passes through a private temporary folder.
    """
    loaded: list[LoadedCertificate] = []
    with tempfile.TemporaryDirectory(prefix="turnout-tls-") as folder:
        cert_path = os.path.join(folder, "cert.pem")
        key_path = os.path.join(folder, "key.pem")
        for files, (cert, key) in zip(tls.certificates, material.pairs, strict=True):
            for path, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            info = _decode_certificate(cert_path, files.cert)
            context = _server_context(tls, files, cert_path, key_path, material.client_ca)
            names = certificate_names(info)
            if not names:
                raise TlsFileError(f"{files.cert} names no host (no DNS subjectAltName, no CN)")
            not_after = float(ssl.cert_time_to_seconds(info["notAfter"]))
            loaded.append(LoadedCertificate(files, names, not_after, context))
    return loaded


def load_listener(address: str, tls: ListenerTls) -> list[LoadedCertificate]:
    """Read and load a listener's files (TlsFileError)."""
    return load_material(tls, read_material(address, tls))


def client_context(tls: UpstreamTls) -> ssl.SSLContext:
    """The context Turnout connects to an upstream's endpoints with (TlsFileError)."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca)
    except (ssl.SSLError, ValueError):  # before OSError, of which SSLError is a subclass
        raise TlsFileError(f"{tls.ca} holds no PEM CA certificate") from None
    except OSError as exc:
        raise TlsFileError(f"cannot read {tls.ca}: {exc.strerror or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert is not None and tls.key is not None:
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise TlsFileError(f"{tls.key} is not the key of {tls.cert}") from None
            raise TlsFileError(
                f"{tls.cert} / {tls.key}: not a PEM certificate chain and its key ({exc.reason})"
            ) from None
        except OSError as exc:
            missing = exc.filename or f"{tls.cert} or {tls.key}"
            raise TlsFileError(f"cannot read {missing}: {exc.strerror or exc}") from None
    return ctx


def tls_file_problems(spec: ConfigSpec, *, listeners: bool = True) -> list[str]:
    """What is wrong with the TLS files of the config (upstreams, and listeners unless told
    not to), a line each."""
    problems: list[str] = []
    for upstream in spec.upstreams:
        if upstream.tls is not None:
            try:
                client_context(upstream.tls)
            except TlsFileError as exc:
                problems.append(f"upstreams.{upstream.name}.tls: {exc}")
    for index, listener in enumerate(spec.listeners if listeners else ()):
        if listener.tls is not None:
            problems += listener_problems(index, listener.address, listener.tls)
    return problems


def listener_problems(index: int, address: str, tls: ListenerTls) -> list[str]:
    """What is wrong with one listener's files: one located line per certificate at fault."""
    where = f"listen[{index}].tls"
    client_ca = None
    if tls.client_ca is not None:
        try:
            client_ca = _read(tls.client_ca)
        except TlsFileError as exc:
            return [f"{where}.client_ca: {exc}"]
    problems: list[str] = []
    for n, files in enumerate(tls.certificates):
        try:
            pair = (_read(files.cert), _read(files.key))
        except TlsFileError as exc:
            problems.append(f"{where}.certificates[{n}]: {exc}")
            continue
        problems += material_problems(
            index, tls, ListenerMaterial(address, (pair,), client_ca), first=n
        )
    return problems


def material_problems(
    index: int, tls: ListenerTls, material: ListenerMaterial, first: int = 0
) -> list[str]:
    """What is wrong with a listener's files, judged on bytes already read (a line per pair).

    `material` may hold a slice of the listener's pairs, starting at pair number `first`.
    """
    problems: list[str] = []
    for n, pair in enumerate(material.pairs, start=first):
        files = tls.certificates[n]
        one = ListenerTls((files,), tls.min_version, tls.client_ca)
        try:
            load_material(one, ListenerMaterial(material.address, (pair,), material.client_ca))
        except TlsFileError as exc:
            problems.append(f"listen[{index}].tls.certificates[{n}]: {exc}")
    return problems


def expiry_warnings(
    listener: str, certificates: list[LoadedCertificate], now: float, within: float
) -> list[str]:
    """A line per certificate that expires within `within` seconds (or has expired)."""
    warnings: list[str] = []
    for cert in certificates:
        left = cert.not_after - now
        if left <= 0:
            warnings.append(
                f"certificate {cert.files.cert} ({cert.names[0]}) of {listener} has expired"
            )
        elif left <= within:
            warnings.append(
                f"certificate {cert.files.cert} ({cert.names[0]}) of {listener} expires in "
                f"{left / 86400.0:.1f} days"
            )
    return warnings


class CertificateSet:
    """The certificates of one TLS listener: a context per pair, switched by SNI.

    A client's server name picks the certificate with that exact name, else one whose
    wildcard (`*.example.com`, one label) covers it, else the first (the default).
    """

    __slots__ = ("certificates", "default", "exact", "wildcard")

    def __init__(self, certificates: list[LoadedCertificate]) -> None:
        self.certificates = tuple(certificates)
        self.default = certificates[0].context
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for cert in certificates:
            for name in cert.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[1:], cert.context)
                else:
                    self.exact.setdefault(name, cert.context)
            cert.context.sni_callback = self._choose

    def choose(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a client that asked for `server_name` (None: no SNI)."""
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        chosen = self.exact.get(name)
        if chosen is None:
            dot = name.find(".")
            if dot > 0:
                chosen = self.wildcard.get(name[dot:])
        return self.default if chosen is None else chosen

    def _choose(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        setattr(sslobj, _SNI_ATTRIBUTE, server_name)
        chosen = self.choose(server_name)
        if chosen is not ctx:
            sslobj.context = chosen


def sni_of(sslobj: object) -> str | None:
    """The server name a client sent in its handshake (None: no SNI)."""
    name: str | None = getattr(sslobj, _SNI_ATTRIBUTE, None)
    return name
