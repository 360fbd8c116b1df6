"""The admin API's command-line client as an operator runs it: real `turnout` subprocesses
against a real Turnout (`status`, `split`, `rollout`, `reload`, `healthcheck`, `--version`).

Exit statuses 0 (done), 1 (refused, with the server's message; or no answer, in one line) and 2
(usage); the token from TURNOUT_ADMIN_TOKEN; the admin address from --admin or from the `admin`
of --config (a wildcard one asked on loopback, as the image's HEALTHCHECK does); a Python that
lacks the dependencies gets one line and exit 1, not a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy import cli, client
from proxy.control.rollouts import ACTIONS
from proxy.control.supervisor import TOKEN_ENV
from proxy.core.spec import ConfigSpec
from tests.support import wait_until
from tests.support.turnout import (
    PROJECT_ROOT,
    TurnoutFactory,
    TurnoutProcess,
    free_port,
    http_status,
    launch,
)
from tests.support.upstreams import EchoUpstream

TURNOUT = str(Path(sys.executable).with_name("turnout"))
TOKEN = "cli-s3cret"
# A command of the client makes a few HTTP calls; a slow CI box still takes seconds to start it.
COMMAND_TIMEOUT = 60.0
# The rollout test's traffic: paced, bounded in time.
TRAFFIC_PERIOD = 0.02
TRAFFIC_DEADLINE = 30.0


def turnout(
    *args: str, env: dict[str, str] | None = None, python: tuple[str, ...] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `turnout ARGS` (or `PYTHON -m proxy ARGS`) without a token unless `env` gives one."""
    full_env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    full_env.update(env or {})
    command = [*python, "-m", "proxy"] if python else [TURNOUT]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env=full_env,
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a command that failed with status 1 (and printed nothing)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def table(blue: EchoUpstream, green: EchoUpstream, **extra: Any) -> dict[str, Any]:
    """Two routes: `api` (90/10, with a rollout) and `web` (all blue)."""
    config: dict[str, Any] = {
        "workers": 1,
        "upstreams": {
            "blue": {"endpoints": [blue.address]},
            "green": {"endpoints": [green.address]},
        },
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "split": {"blue": 90, "green": 10},
                "rollout": {
                    "baseline": "blue",
                    "canary": "green",
                    # The first verdict is the test's cue to pause: the second step cannot pass
                    # (nor be inconclusive) in the seconds the pause takes.
                    "steps": [50, 75, 100],
                    "interval": "3s",
                    "check": "1s",
                    "min_requests": 20,
                },
            },
            {"name": "web", "split": {"blue": 100, "green": 0}},
        ],
    }
    config.update(extra)
    return config


def admin_get(proc: TurnoutProcess, path: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{proc.admin_url}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return orjson.loads(response.read())


def route_view(proc: TurnoutProcess, name: str) -> dict[str, Any]:
    routes = admin_get(proc, "/admin/routes")["routes"]
    (found,) = [route for route in routes if route["name"] == name]
    return dict(found)


def served_by(proc: TurnoutProcess, path: str) -> str:
    with urllib.request.urlopen(f"{proc.url}{path}", timeout=10) as response:
        return str(response.headers["X-Upstream"])


def status_rows(stdout: str) -> dict[str, list[str]]:
    """The route table of `turnout status`: name -> [split, source, rollout]."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ROUTE "))
    assert re.split(r"\s{2,}", lines[start]) == ["ROUTE", "SPLIT", "SOURCE", "ROLLOUT"]
    rows = [re.split(r"\s{2,}", line, maxsplit=3) for line in lines[start + 1 :] if line]
    return {row[0]: row[1:] for row in rows}


def with_admin(proc: TurnoutProcess) -> tuple[str, str]:
    return ("--admin", proc.admin_url)


# --- the commands against a running Turnout ------------------------------------------------------


def test_status_shows_each_routes_split_source_and_rollout(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(table(blue, green))
    result = turnout("status", *with_admin(proc))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first == (f"Turnout at {proc.admin_url}: ready; generation 1, config {proc.config_path}")
    assert status_rows(result.stdout) == {
        "api": ["blue 90, green 10", "file", "idle"],
        "web": ["blue 100, green 0", "file", "-"],
    }

    as_json = turnout("status", "--json", *with_admin(proc))
    assert as_json.returncode == 0, as_json.stderr
    # The server's JSON; no fleet API on this Turnout, so `fleet` is null (and no failure).
    assert orjson.loads(as_json.stdout) == {**admin_get(proc, "/admin/routes"), "fleet": None}


def test_split_puts_a_runtime_split_in_force_and_reset_gives_the_files_back(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(table(blue, green))
    assert served_by(proc, "/") == "blue"

    flipped = turnout("split", "web", "blue=0", "green=100", *with_admin(proc))
    assert flipped.returncode == 0, flipped.stderr
    assert flipped.stdout == "web: blue 0, green 100 (runtime; generation 2)\n"
    # In force in the worker when the command returns.
    assert served_by(proc, "/") == "green"
    assert status_rows(turnout("status", *with_admin(proc)).stdout)["web"] == [
        "blue 0, green 100",
        "runtime",
        "-",
    ]

    # Upstreams left out get 0, and --json prints the server's answer.
    only_green = turnout("split", "api", "green=1", "--json", *with_admin(proc))
    assert only_green.returncode == 0, only_green.stderr
    answer = orjson.loads(only_green.stdout)
    assert answer["effective_split"] == {"blue": 0.0, "green": 100.0}
    assert answer["split_source"] == "runtime"

    reset = turnout("split", "web", "--reset", *with_admin(proc))
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout == "web: blue 100, green 0 (file; generation 4)\n"
    assert served_by(proc, "/") == "blue"
    assert route_view(proc, "web")["runtime_split"] is None


def test_a_refused_call_exits_1_with_the_servers_message(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(table(blue, green))
    unknown_upstream = one_line_error(turnout("split", "api", "purple=1", *with_admin(proc)))
    assert unknown_upstream.startswith("turnout: refused (400): unknown upstream(s) 'purple'")
    unknown_route = one_line_error(turnout("split", "nope", "blue=1", *with_admin(proc)))
    assert unknown_route == "turnout: refused (404): unknown route 'nope'"
    zero = one_line_error(turnout("split", "api", "blue=0", *with_admin(proc)))
    assert zero == "turnout: refused (400): at least one weight must be > 0"
    not_paused = one_line_error(turnout("rollout", "api", "resume", *with_admin(proc)))
    assert not_paused.startswith("turnout: refused (409): cannot resume")
    no_rollout = one_line_error(turnout("rollout", "web", "start", *with_admin(proc)))
    assert no_rollout.startswith("turnout: refused (")
    # Nothing of it changed anything.
    assert route_view(proc, "api")["split_source"] == "file"
    assert admin_get(proc, "/admin/routes")["generation"] == 1


@pytest.mark.parametrize(
    "args",
    [
        ["split", "api"],  # neither weights nor --reset
        ["split", "api", "--reset", "blue=1"],  # both
        ["split", "api", "blue=x"],  # not a number
        ["split", "api", "blue=nan"],
        ["split", "api", "blue"],  # not NAME=WEIGHT
        ["split", "api", "blue=1", "blue=2"],  # twice
        ["rollout", "api", "explode"],
        ["rollout", "api"],
        ["status", "--admin", "ftp://127.0.0.1:9901"],
        ["status", "--admin", "127.0.0.1:99999"],
        ["status", "--admin", "a b:9901"],
        ["status", "--admin", "::1:9901"],  # IPv6 without brackets
        ["status", "--timeout", "soon"],
        ["status", "--timeout", "0"],
        ["status", "--timeout", "inf"],
        ["healthcheck", "--json"],
        ["nonsense"],
        [],
    ],
    ids=lambda args: " ".join(args) or "no-command",
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    # Refused before any call: no Turnout needed, nothing listens on the default port here.
    result = turnout(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: turnout" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def drive_until_a_verdict(proc: TurnoutProcess) -> dict[str, Any]:
    """Send paced requests to `api` until its rollout has a verdict in its history; the view."""
    deadline = time.monotonic() + TRAFFIC_DEADLINE
    while True:
        rollout = route_view(proc, "api")["rollout"]
        if rollout["history"]:
            return dict(rollout)
        assert time.monotonic() < deadline, f"no verdict after {TRAFFIC_DEADLINE}s: {rollout}"
        for _ in range(5):
            served_by(proc, "/api/x")
            time.sleep(TRAFFIC_PERIOD)


def test_rollout_actions_and_the_last_verdict_in_status(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(table(blue, green))
    started = turnout("rollout", "api", "start", *with_admin(proc))
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith(
        "api: blue 50, green 50 (rollout; generation 2); rollout running: step 0 (canary 50%) "
        "of 50/75/100: started"
    ), started.stdout

    drive_until_a_verdict(proc)
    paused = turnout("rollout", "api", "pause", *with_admin(proc))
    assert paused.returncode == 0, paused.stderr
    # Paused: nothing is looked at, so the history stays what status is compared with.
    rollout = route_view(proc, "api")["rollout"]
    assert rollout["state"] == "paused"
    last = rollout["history"][-1]
    row = status_rows(turnout("status", *with_admin(proc)).stdout)["api"]
    assert row[1] == "rollout"
    assert row[2] == (
        f"paused: step {rollout['step']} (canary {rollout['canary_weight']:g}%) of 50/75/100; "
        f"last verdict {last['verdict']} at step {last['step']} ({last['weight']:g}%)"
    )

    resumed = turnout("rollout", "api", "resume", "--json", *with_admin(proc))
    assert resumed.returncode == 0, resumed.stderr
    assert orjson.loads(resumed.stdout)["rollout"]["state"] == "running"
    aborted = turnout("rollout", "api", "abort", *with_admin(proc))
    assert aborted.returncode == 0, aborted.stderr
    assert aborted.stdout.startswith("api: blue 100, green 0 (rollout; generation ")
    assert "rollout aborted" in aborted.stdout
    assert served_by(proc, "/api/x") == "blue"
    promoted = turnout("rollout", "api", "promote", *with_admin(proc))
    assert promoted.returncode == 0, promoted.stderr
    assert "rollout succeeded" in promoted.stdout
    assert route_view(proc, "api")["effective_split"] == {"blue": 0.0, "green": 100.0}
    assert served_by(proc, "/api/x") == "green"


def test_reload_reports_the_generation_or_every_error_of_the_file(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    config = table(blue, green)
    proc = turnout_factory(config)
    unchanged = turnout("reload", *with_admin(proc))
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout == "unchanged: the file is the config in force (generation 1)\n"

    config["routes"][1]["split"] = {"blue": 0, "green": 100}
    proc.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    reloaded = turnout("reload", *with_admin(proc))
    assert reloaded.returncode == 0, reloaded.stderr
    # The file watch may have loaded it first (within 2 s): then the command finds it in force.
    assert reloaded.stdout in (
        "reloaded: generation 2\n",
        "unchanged: the file is the config in force (generation 2)\n",
    )
    assert served_by(proc, "/") == "green"

    proc.config_path.write_text(
        proc.config_path.read_text(encoding="utf-8").replace("green: 100", "purple: 100"),
        encoding="utf-8",
    )
    refused = turnout("reload", *with_admin(proc))
    assert refused.returncode == 1
    assert refused.stdout == ""
    lines = refused.stderr.splitlines()
    assert lines[0] == "turnout: refused (400): the file has errors; the config in force stays:"
    assert any(
        line.startswith(f"turnout: {proc.config_path}:") and "unknown upstream 'purple'" in line
        for line in lines[1:]
    ), lines
    assert served_by(proc, "/") == "green"


def test_the_token_comes_from_the_environment(
    blue: EchoUpstream, green: EchoUpstream, tmp_path: Path
) -> None:
    config = table(blue, green)
    config["listen"] = f"127.0.0.1:{free_port()}"
    config["admin"] = f"127.0.0.1:{free_port()}"
    config_path = tmp_path / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    with launch(config, config_path, prefix=("env", f"{TOKEN_ENV}={TOKEN}")) as proc:
        missing = one_line_error(turnout("status", *with_admin(proc)))
        assert missing == (
            f"turnout: refused (401): missing or wrong admin token ({TOKEN_ENV} is not set)"
        )
        wrong = one_line_error(turnout("status", *with_admin(proc), env={TOKEN_ENV: "nope"}))
        assert wrong.endswith(f"({TOKEN_ENV} is not the server's token)")

        good = {TOKEN_ENV: TOKEN}
        assert turnout("status", *with_admin(proc), env=good).returncode == 0
        flipped = turnout("split", "web", "green=1", *with_admin(proc), env=good)
        assert flipped.returncode == 0, flipped.stderr
        assert served_by(proc, "/") == "green"
        # /readyz is open: the health check needs no token.
        healthy = turnout("healthcheck", *with_admin(proc))
        assert (healthy.returncode, healthy.stdout) == (0, "ready\n")


def test_no_admin_api_is_one_line_and_exit_1() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for args in (
        ["status"],
        ["status", "--json"],
        ["split", "api", "blue=1"],
        ["split", "api", "--reset"],
        ["rollout", "api", "start"],
        ["reload"],
        ["healthcheck"],
    ):
        line = one_line_error(turnout(*args, "--admin", f"127.0.0.1:{port}"))
        assert line.startswith(
            f"turnout: cannot reach the admin API at {url}: connection refused"
        ), (args, line)


def test_an_admin_port_that_never_answers_times_out_in_one_line() -> None:
    # A listener that never accepts: the kernel completes the connection, nobody answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        line = one_line_error(turnout("status", "--admin", f"127.0.0.1:{port}", "--timeout", "0.5"))
    assert line.startswith(f"turnout: cannot reach the admin API at http://127.0.0.1:{port}: ")
    assert "no answer within 0.5 s" in line


def test_healthcheck_follows_readyz_through_a_drain_and_the_exit(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    # Readiness is 503 for drain.delay after SIGTERM while the admin port still answers.
    proc = turnout_factory(table(blue, green, drain={"delay": "5s", "shutdown": "1s"}))
    ready = turnout("healthcheck", *with_admin(proc))
    assert (ready.returncode, ready.stdout, ready.stderr) == (0, "ready\n", "")

    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http_status(f"{proc.admin_url}/readyz") == 503, what="/readyz 503")
    draining = turnout("healthcheck", *with_admin(proc))
    assert (draining.returncode, draining.stdout) == (1, "not ready: draining\n")

    assert proc.proc.wait(30) == 0
    gone = one_line_error(turnout("healthcheck", *with_admin(proc)))
    assert "cannot reach the admin API" in gone


def test_config_option_reads_the_admin_address_of_the_file(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream, tmp_path: Path
) -> None:
    proc = turnout_factory(table(blue, green))
    result = turnout("status", "--config", str(proc.config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Turnout at {proc.admin_url}: ready;")
    # Only `admin` is read: a file broken elsewhere (mid-edit) still says where Turnout is.
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"admin: {proc.config['admin']}\nroutes: 12\n", encoding="utf-8")
    assert turnout("healthcheck", "--config", str(broken)).returncode == 0
    # --admin wins over --config.
    nowhere = f"127.0.0.1:{free_port()}"
    assert turnout("healthcheck", "--config", str(broken), "--admin", nowhere).returncode == 1

    missing = one_line_error(turnout("status", "--config", str(tmp_path / "nope.yaml")))
    assert missing == f"turnout: {tmp_path / 'nope.yaml'}: cannot read the config file: " + (
        "No such file or directory"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("admin: [1, 2]\n", encoding="utf-8")
    assert one_line_error(turnout("status", "--config", str(bad))) == (
        f"turnout: {bad}: admin: expected host:port, e.g. 127.0.0.1:9901"
    )


def dockerfile_instruction(name: str) -> str:
    """An instruction's arguments in the Dockerfile, continuation lines joined."""
    text = (PROJECT_ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    (found,) = [
        line.strip()[len(name) :].strip()
        for line in text.splitlines()
        if line.strip().startswith(f"{name} ")
    ]
    return found


def test_the_images_healthcheck_is_turnout_healthcheck_on_the_images_config(
    blue: EchoUpstream, green: EchoUpstream, tmp_path: Path
) -> None:
    """The Dockerfile's HEALTHCHECK, run as written but on a copy of the image's config (admin
    on 0.0.0.0, so the token is set for the server and not for the check) with free ports."""
    _, _, command = dockerfile_instruction("HEALTHCHECK").partition(" CMD ")
    argv = orjson.loads(command)
    image_config = orjson.loads(dockerfile_instruction("CMD"))[1]
    assert argv == ["turnout", "healthcheck", "--config", image_config]
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    assert f"COPY config/container.yaml {image_config}" in dockerfile

    config = yaml.safe_load((PROJECT_ROOT / "config" / "container.yaml").read_text("utf-8"))
    assert config["admin"].startswith("0.0.0.0:")
    listen, admin = free_port(), free_port()
    config.update(
        listen=f"127.0.0.1:{listen}",
        admin=f"0.0.0.0:{admin}",
        state_file=str(tmp_path / "turnout.state.json"),
        upstreams={"blue": {"endpoints": [blue.address]}, "green": {"endpoints": [green.address]}},
    )
    config_path = tmp_path / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    where = {"listen": f"127.0.0.1:{listen}", "admin": f"127.0.0.1:{admin}"}
    check = [*argv[1:-1], str(config_path)]
    with launch(where, config_path, prefix=("env", f"{TOKEN_ENV}={TOKEN}")) as proc:
        healthy = turnout(*check)
        assert (healthy.returncode, healthy.stdout) == (0, "ready\n"), healthy.stderr
        assert proc.stop() == 0
    assert one_line_error(turnout(*check)).startswith(
        f"turnout: cannot reach the admin API at http://127.0.0.1:{admin}: "
    )


def test_version_is_the_one_metrics_reports(
    turnout_factory: TurnoutFactory, blue: EchoUpstream, green: EchoUpstream
) -> None:
    proc = turnout_factory(table(blue, green))
    result = turnout("--version")
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"turnout (\S+) \((compiled|pure) data plane\)\n", result.stdout)
    assert match is not None, result.stdout
    with urllib.request.urlopen(f"{proc.admin_url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    line = f'turnout_build_info{{version="{match[1]}",build="{match[2]}"}} 1.0'
    assert line in metrics.splitlines()


# --- help, start-up, constants ---------------------------------------------------------------


def test_help_lists_signals_environment_and_exit_codes() -> None:
    result = turnout("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for needed in ("SIGTERM", "SIGINT", "SIGHUP", "a second one", TOKEN_ENV, "exit status"):
        assert needed in text, needed
    assert re.search(r"^\s+2\s+a usage error$", text, re.M), text
    for command in ("status", "split", "rollout", "reload", "healthcheck"):
        assert re.search(rf"^\s+{command}\s", text, re.M), command
        sub = turnout(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert TOKEN_ENV in sub.stdout
        assert "--admin URL" in sub.stdout
        assert "Exit status: 0 done; 1 refused" in " ".join(sub.stdout.split())


def test_help_names_every_environment_variable_turnout_reads() -> None:
    read = set()
    for source in (PROJECT_ROOT / "proxy").glob("*.py"):
        read |= set(re.findall(r"\bTURNOUT_[A-Z_]+\b", source.read_text(encoding="utf-8")))
    assert TOKEN_ENV in read
    for name in read:
        assert name in cli.EPILOG, name


def test_client_commands_import_none_of_the_proxy_runtime() -> None:
    """`healthcheck` runs every few seconds in a container: it loads the client only."""
    probe = (
        "import sys\n"
        "from proxy.cli import main\n"
        "main(['healthcheck', '--admin', sys.argv[1]])\n"
        "heavy = {'aiohttp', 'uvloop', 'httptools', 'prometheus_client', 'watchfiles'}\n"
        "print(sorted(name for name in sys.modules if name.partition('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        cwd=PROJECT_ROOT,
        check=False,
    )
    assert result.stdout.splitlines()[-1] == "[]", (result.stdout, result.stderr)
    assert "cannot reach the admin API" in result.stderr


def test_a_python_without_the_dependencies_gets_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Regression: `python -m proxy` with a Python that lacks aiohttp & co printed a
    ModuleNotFoundError traceback. `-S` leaves site-packages out: the standard library only."""
    bare = (sys.executable, "-S")
    env = {"PYTHONPATH": ""}
    lacks = subprocess.run([*bare, "-c", "import aiohttp"], capture_output=True, check=False)
    assert lacks.returncode != 0, "this Python must really lack the dependencies"
    config = PROJECT_ROOT / "config" / "demo.yaml"
    for args in (
        ["validate", str(config)],
        ["run", str(config)],
        ["demo"],
        ["status"],
        ["healthcheck"],
        ["--version"],
    ):
        line = one_line_error(turnout(*args, env=env, python=bare))
        assert re.fullmatch(
            rf"turnout: cannot run: the Python module '\w+'( \(from the package [\w-]+\))? is "
            rf"missing for {re.escape(sys.executable)}; install Turnout's dependencies with "
            r"`\./dev setup` in the source tree \(then run \.venv/bin/turnout\), or "
            r"`pip install \.` there",
            line,
        ), (args, line)
    # What needs nothing but the standard library still works.
    assert turnout("--help", env=env, python=bare).returncode == 0
    assert turnout("split", "api", env=env, python=bare).returncode == 2


def test_the_client_agrees_with_the_server_on_names_and_defaults() -> None:
    assert client.TOKEN_ENV == TOKEN_ENV
    host, port = ConfigSpec(upstreams=(), routes=()).admin
    assert f"http://{host}:{port}" == client.DEFAULT_ADMIN
    assert cli.ROLLOUT_ACTIONS == ACTIONS


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("http://127.0.0.1:9901", "http://127.0.0.1:9901"),
        ("http://127.0.0.1:9901/", "http://127.0.0.1:9901"),
        ("127.0.0.1:9901", "http://127.0.0.1:9901"),
        ("localhost:19901", "http://localhost:19901"),
        ("[::1]:9901", "http://[::1]:9901"),
        ("0.0.0.0:9901", "http://127.0.0.1:9901"),
        ("[::]:9901", "http://[::1]:9901"),
    ],
)
def test_admin_addresses(text: str, url: str) -> None:
    assert client.admin_url(text) == url


def test_every_turnout_command_in_the_readme_and_operations_parses() -> None:
    """Every `turnout ...` line in the README's and docs/operations.md's code blocks parses."""
    lines = []
    for doc in (PROJECT_ROOT / "README.md", PROJECT_ROOT / "docs" / "operations.md"):
        in_code = False
        for line in doc.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("```"):
                in_code = not in_code
                continue
            command = line.strip().removeprefix("$ ")
            command = re.sub(r"^(TURNOUT_ADMIN_TOKEN=\S+ )", "", command)
            if in_code and command.startswith("turnout "):
                lines.append(command.split(" | ")[0].split("  #")[0])
    assert len(lines) >= 10, lines
    parser = cli.build_parser()
    for command in lines:
        words = shlex.split(command)[1:]
        if words in (["--version"], ["--help"]):
            continue  # they exit 0 by design
        args = parser.parse_args(words)
        if args.command == "split":
            assert bool(args.weights) != args.reset, command
