"""The `turnout` command line as a user runs it: real subprocesses, real files, real ports.

`validate` exit codes and error format, the refusals of `run` (bad config, non-loopback admin
without a token, aiohttp without its C extensions, a data-plane port that is taken), and
`demo --requests` showing a split end to end.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.turnout import PROJECT_ROOT, free_port

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
