"""The `turnout` command line as a user runs it: real subprocesses, real files, real ports.

`validate` exit codes and error format, the refusals of `run` (bad config, non-loopback admin
without a token, aiohttp without its C extensions, a data-plane port that is taken),
`demo --requests` showing a split end to end, and a newcomer's first hour: the demo's hints are
the README's and each of them works (the cookie jar keeps a visitor's version, a plain curl does
not), the demo's access log stays off unless asked for, the README says how to get `turnout` on
PATH, links nothing outside the repository, and its protocol list holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.control.supervisor import load_config
from proxy.demo import path_note, try_lines
from tests.support import wait_until
from tests.support.turnout import PROJECT_ROOT, TurnoutFactory, free_port
from tests.support.upstreams import EchoUpstream

TURNOUT = str(Path(sys.executable).with_name("turnout"))
# A refusal happens before anything is bound or spawned; a slow CI box still takes seconds.
QUICK_EXIT = 30.0

GOOD = """\
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
upstreams:
  blue: {{endpoints: [127.0.0.1:{upstream}]}}
  green: {{endpoints: [127.0.0.1:{upstream}]}}
routes:
  - name: all
    split: {{blue: 90, green: 10}}
"""

# Two errors on known lines: an unknown upstream (line 7, the key at column 13) and a bad
# duration (line 9, the value at column 12).
BAD = """\
listen: 127.0.0.1:18080
admin: 127.0.0.1:19901
upstreams:
  blue: {endpoints: [127.0.0.1:19001]}
routes:
  - name: all
    split: {canray: 100}
timeouts:
  connect: soon
"""

ERROR_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<msg>.+)$")


def turnout(
    *args: str, env: dict[str, str] | None = None, timeout: float = QUICK_EXIT
) -> subprocess.CompletedProcess[str]:
    """Run the console script and capture its output."""
    full_env = dict(os.environ)
    full_env.pop("TURNOUT_ADMIN_TOKEN", None)
    full_env.pop("AIOHTTP_NO_EXTENSIONS", None)
    full_env.update(env or {})
    return subprocess.run(
        [TURNOUT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def write_good(tmp_path: Path, *, admin_host: str = "127.0.0.1") -> Path:
    path = tmp_path / "routes.yaml"
    text = GOOD.format(listen=free_port(), admin=free_port(), upstream=free_port())
    path.write_text(text.replace("admin: 127.0.0.1", f"admin: {admin_host}"), encoding="utf-8")
    return path


def test_validate_good_file_prints_one_line_summary(tmp_path: Path) -> None:
    path = write_good(tmp_path)
    result = turnout("validate", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0]
    assert "2 upstreams" in lines[0]
    assert result.stderr == ""


def test_validate_bad_file_reports_every_error_with_position(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(BAD, encoding="utf-8")
    result = turnout("validate", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    parsed = [ERROR_LINE.match(line) for line in lines]
    assert all(parsed), lines
    by_path = {m["path"]: m for m in parsed if m}
    assert set(by_path) == {"routes[0].split.canray", "timeouts.connect"}
    canray = by_path["routes[0].split.canray"]
    assert (canray["file"], canray["line"], canray["col"]) == (str(path), "7", "13")
    assert "unknown upstream 'canray'" in canray["msg"]
    assert by_path["timeouts.connect"]["line"] == "9"


def test_validate_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    result = turnout("validate", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr
    assert "No such file" in result.stderr


def test_run_with_invalid_config_exits_1_with_the_errors(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(BAD, encoding="utf-8")
    result = turnout("run", str(path))
    assert result.returncode == 1
    assert "routes[0].split.canray: unknown upstream 'canray'" in result.stderr
    assert "timeouts.connect" in result.stderr


def test_run_refuses_non_loopback_admin_without_token(tmp_path: Path) -> None:
    path = write_good(tmp_path, admin_host="0.0.0.0")
    result = turnout("run", str(path))
    assert result.returncode == 1
    assert "refusing to start" in result.stderr
    assert "TURNOUT_ADMIN_TOKEN" in result.stderr
    assert "0.0.0.0" in result.stderr


def test_run_refuses_without_aiohttp_c_extensions(tmp_path: Path) -> None:
    path = write_good(tmp_path)
    result = turnout("run", str(path), env={"AIOHTTP_NO_EXTENSIONS": "1"})
    assert result.returncode == 1
    assert "refusing to start" in result.stderr
    assert "C extensions" in result.stderr


def test_run_exits_1_when_listen_is_taken(tmp_path: Path) -> None:
    # A plain listener holds the port: refused before any worker starts, in one line.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        path = tmp_path / "routes.yaml"
        path.write_text(
            GOOD.format(listen=port, admin=free_port(), upstream=free_port()), encoding="utf-8"
        )
        result = turnout("run", str(path), "--no-access-log")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"turnout: cannot start: listen address 127.0.0.1:{port} is already in use by "
        "another process"
    ]


def test_python_dash_m_proxy_is_the_same_cli(tmp_path: Path) -> None:
    path = write_good(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=QUICK_EXIT,
        cwd=PROJECT_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 upstreams" in result.stdout


DEMO = """\
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
workers: 1
upstreams:
  blue:   {{endpoints: [127.0.0.1:{blue}]}}
  green:  {{endpoints: [127.0.0.1:{green}]}}
  canary: {{endpoints: [127.0.0.1:{canary}]}}
  shadow: {{endpoints: [127.0.0.1:{shadow}]}}
routes:
  - name: api
    match: {{path_prefix: /api}}
    overrides:
      - {{header: x-canary, value: "true", to: canary}}
    split: {{blue: 50, green: 50}}
"""


@pytest.mark.slow
def test_demo_requests_shows_the_split(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("listen", "admin", "blue", "green", "canary", "shadow")}
    path = tmp_path / "demo.yaml"
    path.write_text(DEMO.format(**ports), encoding="utf-8")
    result = turnout("demo", "--config", str(path), "--requests", "60", timeout=90.0)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    counts = {
        m["name"]: int(m["count"])
        for m in re.finditer(r"^\s+(?P<name>\S+)\s+(?P<count>\d+)\s+\(", result.stdout, re.M)
    }
    # 60 requests at 50/50: each side gets at least one unless p = 2 * 0.5**60.
    assert set(counts) == {"blue", "green"}, output
    assert sum(counts.values()) == 60


# --- the first hour: the demo's hints, the README ------------------------------------------------

README = PROJECT_ROOT / "README.md"
DEMO_PORTS = (8080, 9901, 9001, 9101, 9201, 9301)
# The venv's bin folder, put first on PATH as `source .venv/bin/activate` does.
VENV_BIN = str(Path(sys.executable).parent)
HINTS_END = "Press Ctrl-C to stop."


def readme_demo_block() -> list[str]:
    """The lines of the first ```sh block after `## The demo` in the README."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The demo") :]
    start = section.index("```sh\n") + len("```sh\n")
    return section[start : section.index("```", start)].splitlines()


def test_the_demo_hints_are_the_readmes_demo_block() -> None:
    _, spec = load_config(str(PROJECT_ROOT / "config" / "demo.yaml"))
    assert readme_demo_block() == try_lines(spec)


def test_the_demo_hints_show_a_cookie_jar_for_stickiness() -> None:
    _, spec = load_config(str(PROJECT_ROOT / "config" / "demo.yaml"))
    lines = try_lines(spec)
    assert "curl -s -c jar -b jar 127.0.0.1:8080/api/hello" in lines
    # No hint claims stickiness with a made-up cookie value.
    assert not any("session_id=" in line for line in lines)


def test_the_path_note_says_how_to_reach_turnout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    note = path_note()
    assert note is not None
    assert f"source {Path(VENV_BIN) / 'activate'}" in note or "source .venv/bin/activate" in note
    monkeypatch.setenv("PATH", f"{VENV_BIN}:/usr/bin:/bin")
    assert path_note() is None


def test_the_readme_says_how_to_get_turnout_on_path() -> None:
    """Regression: the README's commands after the demo answered "command not found"."""
    text = README.read_text(encoding="utf-8")
    assert "source .venv/bin/activate" in text
    assert ".venv/bin/turnout" in text
    if Path(VENV_BIN).parent != PROJECT_ROOT / ".venv":
        pytest.skip("the suite does not run from the checkout's .venv")
    bare = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    shell = ["bash", "--noprofile", "--norc", "-c"]

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*shell, script],
            capture_output=True,
            text=True,
            env=bare,
            cwd=PROJECT_ROOT,
            timeout=QUICK_EXIT,
            check=False,
        )

    # What a fresh terminal has: no `turnout` (unless one is installed system-wide).
    if bash("command -v turnout").returncode == 0:
        pytest.skip("a `turnout` is on the system PATH already")
    after = bash("source .venv/bin/activate && turnout --version && .venv/bin/turnout --version")
    assert after.returncode == 0, after.stderr
    assert after.stdout.count("turnout ") == 2


def test_no_document_points_outside_the_repository() -> None:
    """Regression: the README linked ../shared/contract.md, which users never have."""
    documents = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    for document in documents:
        text = document.read_text(encoding="utf-8")
        assert "shared/" not in text, document
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (document.parent / target.partition("#")[0]).resolve()
            assert path.is_relative_to(PROJECT_ROOT), (document.name, target)
            assert path.exists(), (document.name, target)


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection; everything read back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_readmes_protocol_list_holds(
    turnout_factory: TurnoutFactory, blue: EchoUpstream
) -> None:
    """README "Protocols": HTTP/1.x, TLS, HTTP/2 and gRPC served; what is "not supported yet"
    (WebSocket over HTTP/2, gRPC mirrors) is tested in tests/integration/test_http2_downstream.py
    and tests/integration/test_h2_upstream.py; the wire facts below are the ones the list
    promises."""
    text = README.read_text(encoding="utf-8")
    protocols = text[text.index("## Protocols") :].split("\n## ")[0]
    for name in ("HTTP/1.1", "WebSocket", "TLS", "HTTP/2", "gRPC", "Not supported yet"):
        assert name in protocols, name
    proc = turnout_factory(
        {
            "upstreams": {"blue": {"endpoints": [blue.address]}},
            "routes": [{"name": "all", "split": {"blue": 100}}],
        }
    )
    # HTTP/2 with prior knowledge (h2c): the preface is answered with a SETTINGS frame.
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        first = b""
        while len(first) < 9 and (chunk := sock.recv(65536)):
            first += chunk
    assert first[3:5] == b"\x04\x00", first[:9]  # type SETTINGS, no ACK flag
    # A TLS ClientHello on `listen`: a plain-text 400.
    hello = raw_exchange(proc.port, bytes.fromhex("16030100050100000100"))
    assert hello.startswith(b"HTTP/1.1 400 "), hello[:100]
    # Asking to upgrade to h2c: served over HTTP/1.1.
    upgrade = raw_exchange(
        proc.port,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
    )
    assert upgrade.startswith(b"HTTP/1.1 200 "), upgrade[:100]
    # HTTP/1.0 is served.
    old = raw_exchange(proc.port, b"GET / HTTP/1.0\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 200 ", old), old[:100]


class Demo:
    """`turnout demo` running in the background, its stdout collected line by line."""

    def __init__(self, config: Path, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"}
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        self.stderr_path = config.with_suffix(".stderr")
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [TURNOUT, "demo", "--config", str(config), *extra],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def hints(self) -> list[str]:
        """Wait for the printed instructions; the indented command and comment lines."""
        wait_until(
            lambda: HINTS_END in self.lines or self.proc.poll() is not None,
            timeout=60,
            what="the demo's instructions",
        )
        assert HINTS_END in self.lines, self.stderr_path.read_text(encoding="utf-8")
        block = self.lines[: self.lines.index(HINTS_END)]
        return [line[2:] for line in block if line.startswith("  ")]

    def interrupt(self) -> int:
        """Ctrl-C, as in a terminal; the exit status."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(60)
        self._reader.join(10)
        return code

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@pytest.fixture
def demo_config(tmp_path: Path) -> Path:
    """config/demo.yaml moved to free ports."""
    text = (PROJECT_ROOT / "config" / "demo.yaml").read_text(encoding="utf-8")
    for port in DEMO_PORTS:
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    path = tmp_path / "demo.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def running_demo(config: Path, *extra: str) -> Iterator[Demo]:
    demo = Demo(config, *extra)
    try:
        yield demo
    finally:
        demo.close()


def json_lines(lines: list[str]) -> list[Any]:
    found = []
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError):
            found.append(orjson.loads(line))
    return found


def upstream_of(output: str) -> str:
    return str(orjson.loads(output)["upstream"])


@pytest.mark.slow
def test_every_demo_hint_works_and_the_access_log_stays_off(
    demo_config: Path, tmp_path: Path
) -> None:
    """Regression: the access log flooded the terminal that shows the hints."""
    with running_demo(demo_config) as demo:
        hints = demo.hints()
        commands = [line for line in hints if not line.startswith("#")]
        assert len(commands) >= 10, hints
        env = dict(os.environ, PATH=f"{VENV_BIN}:/usr/bin:/bin")
        env.pop("TURNOUT_ADMIN_TOKEN", None)

        def sh(command: str) -> str:
            result = subprocess.run(
                ["bash", "-c", command],
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=QUICK_EXIT,
                check=False,
            )
            assert result.returncode == 0, (command, result.stdout, result.stderr)
            return result.stdout

        for command in commands:
            output = sh(command)
            if command.startswith("curl") and "/admin/" not in command:
                assert upstream_of(output) in {"blue", "green", "canary"}, (command, output)
            elif command.startswith("curl"):
                assert orjson.loads(output)["route"] == "api", output

        # The cookie jar keeps a visitor's version: the jar hint again and again, one upstream.
        (jar,) = [command for command in commands if " -c jar -b jar " in command]
        assert len({upstream_of(sh(jar)) for _ in range(8)}) == 1
        # A plain request has no cookie to send: each gets a new session id.
        (plain,) = [c for c in commands if c.startswith("curl -s 127.0.0.1:") and "/api/" in c]
        url = "http://" + shlex.split(plain)[-1]
        minted = set()
        for _ in range(3):
            with urllib.request.urlopen(url, timeout=10) as response:
                minted.add(response.headers["Set-Cookie"].split(";")[0])
        assert len(minted) == 3, minted

        assert demo.interrupt() == 0
    assert json_lines(demo.lines) == [], "the access log is off by default"
    assert "The access log is off: turnout demo --access-log writes it here." in demo.lines


@pytest.mark.slow
def test_demo_access_log_flag_turns_it_on(demo_config: Path) -> None:
    with running_demo(demo_config, "--access-log") as demo:
        (plain, *_) = [c for c in demo.hints() if c.startswith("curl -s 127.0.0.1:")]
        with urllib.request.urlopen("http://" + shlex.split(plain)[-1], timeout=10) as response:
            request_id = response.headers["X-Request-Id"]
        wait_until(
            lambda: any(e.get("request_id") == request_id for e in json_lines(demo.lines)),
            what="the request's access-log line",
        )
        assert demo.interrupt() == 0
