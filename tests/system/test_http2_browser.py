"""A real browser speaks HTTP/2 to Turnout (contract sections 10 and 11).

Headless Chromium (Debian's, driven by Playwright as in test_dashboard.py) loads a page through
Turnout's TLS listener, which offers h2 by ALPN; the page pulls a script and an image. The
upstream is plain HTTP/1.1: HTTP/2 ends at the proxy. The certificate is issued at test time by
a trustme CA; Chromium is told to trust exactly that certificate's public key
(`--ignore-certificate-errors-spki-list`), not to ignore certificate errors in general.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import wait_until
from tests.support.certs import PemPair, write_pair
from tests.support.turnout import TurnoutFactory, free_port
from tests.support.upstreams import UpstreamHost

try:
    from playwright.sync_api import Browser, sync_playwright
except ImportError:  # the skip below says what to install
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True

CHROMIUM = os.environ.get("TURNOUT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
MISSING = (
    "needs Playwright for Python (pip install playwright) and Debian's chromium "
    f"(apt-get install chromium; looked for {CHROMIUM}, or set TURNOUT_CHROMIUM)"
)
HOST = "h2.turnout.test"
PAGE = (
    "<!doctype html><html><head><title>h2 through Turnout</title>"
    '<script src="/static/app.js"></script></head>'
    '<body><img id="pixel" src="/static/pixel.gif"></body></html>'
)
SCRIPT = "window.scriptRan = 'yes';"
# The smallest GIF (1x1, transparent).
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
LOAD_TIMEOUT_MS = 15000


class SiteUpstream:
    """An HTTP/1.1 site: `/` the page, `/static/app.js`, `/static/pixel.gif`; records
    (path, HTTP version, X-Forwarded-Proto) of every request it serves."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/static/app.js", self._script)
        app.router.add_get("/static/pixel.gif", self._pixel)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request) -> None:
        version = f"{request.version.major}.{request.version.minor}"
        with self._lock:
            self.seen.append((request.path, version, request.headers.get("X-Forwarded-Proto", "")))

    async def _page(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(text=PAGE, content_type="text/html")

    async def _script(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(text=SCRIPT, content_type="application/javascript")

    async def _pixel(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(body=PIXEL, content_type="image/gif")


@pytest.fixture
def site(upstream_host: UpstreamHost) -> Iterator[SiteUpstream]:
    upstream = SiteUpstream()
    upstream_host.call(upstream.start())
    yield upstream
    upstream_host.call(upstream.stop())


def spki_hash(pem: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of a certificate: what Chromium's
    --ignore-certificate-errors-spki-list takes."""
    # The file is the chain, leaf first; the loader reads the first certificate.
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


@pytest.fixture
def pair(tmp_path: Path) -> PemPair:
    folder = tmp_path / "certs"
    folder.mkdir()
    return write_pair(trustme.CA(), folder, "site", HOST)


@pytest.fixture
def browser(pair: PemPair) -> Iterator[Browser]:
    if not HAVE_PLAYWRIGHT or not os.access(CHROMIUM, os.X_OK):
        pytest.skip(MISSING)
    args = [
        "--no-sandbox",
        f"--ignore-certificate-errors-spki-list={spki_hash(pair.cert)}",
        # The page's name resolves to Turnout's loopback listener, with no DNS involved.
        f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
    ]
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield launched
        launched.close()


def test_chromium_loads_a_page_and_its_resources_over_h2(
    turnout_factory: TurnoutFactory, site: SiteUpstream, pair: PemPair, browser: Browser
) -> None:
    secure = free_port()
    config = {
        "listen": [
            {"address": f"127.0.0.1:{free_port()}"},
            {"address": f"127.0.0.1:{secure}", "tls": {"certificates": [pair.config()]}},
        ],
        "upstreams": {"site": {"endpoints": [f"127.0.0.1:{site.port}"]}},
        "routes": [{"name": "site", "split": {"site": 100}}],
    }
    turnout = turnout_factory(config, access_log=True)
    page = browser.new_page()
    try:
        response = page.goto(f"https://{HOST}:{secure}/", timeout=LOAD_TIMEOUT_MS)
        assert response is not None
        assert response.status == 200
        page.wait_for_function(
            "document.getElementById('pixel').complete && window.scriptRan === 'yes'",
            timeout=LOAD_TIMEOUT_MS,
        )
        protocol = page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
        resources = page.evaluate(
            "performance.getEntriesByType('resource')"
            ".map(e => [new URL(e.name).pathname, e.nextHopProtocol])"
        )
        width = page.evaluate("document.getElementById('pixel').naturalWidth")
    finally:
        page.close()
    assert protocol == "h2"
    assert ["/static/app.js", "h2"] in resources, resources
    assert ["/static/pixel.gif", "h2"] in resources, resources
    assert width == 1
    # The upstream served all three over HTTP/1.1, told that the client came over TLS.
    served = sorted(site.seen)
    assert [path for path, _, _ in served] == ["/", "/static/app.js", "/static/pixel.gif"]
    assert {(version, proto) for _, version, proto in served} == {("1.1", "https")}
    # Turnout's access log says which protocol each request came in with.
    wanted = {("/", "HTTP/2"), ("/static/app.js", "HTTP/2"), ("/static/pixel.gif", "HTTP/2")}
    wait_until(
        lambda: wanted <= {(e.get("path"), e.get("protocol")) for e in turnout.access_log()},
        timeout=10,
        what=f"access-log lines {sorted(wanted)}",
    )
