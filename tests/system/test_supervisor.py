"""The supervisor as a user meets it: `python -m proxy run` in a subprocess, real workers.

Reload (SIGHUP, POST /admin/reload, the file watch: edit in place, replace by rename, a
Kubernetes ConfigMap symlink swap), a rejected file keeping the old generation, the admin token,
a killed worker being replaced, and the SIGTERM drain with /readyz going 503 at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy.control.supervisor import Supervisor, load_config
from proxy.runtime.tasks import TaskSet
from tests.support import async_wait_until, wait_until
from tests.support.turnout import PROJECT_ROOT, TurnoutProcess, free_port, process_tree
from tests.support.upstreams import EchoUpstream, UpstreamHost

# The contract: a change of the file is seen within 2 s.
WATCH_DEADLINE = 2.0
# Explicit triggers and worker restarts: generous, they only bound a hang.
DEADLINE = 15.0

Launch = Callable[..., TurnoutProcess]


# --- helpers ---------------------------------------------------------------------------------


def call(
    method: str, url: str, *, token: str | None = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One HTTP request; (status, JSON body or None)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, body = int(exc.code), exc.read()
    return status, orjson.loads(body) if body else None


def admin_config(proc: TurnoutProcess, token: str | None = None) -> dict[str, Any]:
    status, body = call("GET", f"{proc.admin_url}/admin/config", token=token)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def generation_is(proc: TurnoutProcess, generation: int) -> Callable[[], bool]:
    """The supervisor and every worker are at `generation`."""

    def check() -> bool:
        view = admin_config(proc)
        return view["generation"] == generation and all(
            w["generation"] == generation for w in view["workers"]
        )

    return check


def assert_serves(proc: TurnoutProcess) -> None:
    status, body = call("GET", f"{proc.url}/hello")
    assert status == 200, body
    assert body["upstream"] == "blue"


def base_config(upstream: EchoUpstream, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "workers": 1,
        "drain": {"delay": "0s", "shutdown": "5s"},
        "upstreams": {"blue": {"endpoints": [upstream.address]}},
        "routes": [{"name": "all", "split": {"blue": 100}, "retries": 2}],
    }
    config.update(extra)
    return config


def variant(config: dict[str, Any], retries: int) -> str:
    """The config as YAML with a different (valid) content: another retry count."""
    changed = dict(config, routes=[dict(config["routes"][0], retries=retries)])
    return yaml.safe_dump(changed, sort_keys=False)


INVALID_SPLIT = re.compile(r":\d+:\d+: routes\[0\]\.split\.canray: unknown upstream 'canray'")


def invalid(config: dict[str, Any]) -> str:
    broken = dict(config, routes=[dict(config["routes"][0], split={"canray": 100})])
    return yaml.safe_dump(broken, sort_keys=False)


@pytest.fixture(scope="module")
def blue(upstream_host: UpstreamHost) -> EchoUpstream:
    return upstream_host.echo("blue")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """`launch(config, path=..., env=...)`: start Turnout on an already written file."""
    started: list[TurnoutProcess] = []

    def start(
        config: dict[str, Any], path: Path, *, env: dict[str, str] | None = None
    ) -> TurnoutProcess:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.pop("TURNOUT_ADMIN_TOKEN", None)
        full_env.update(env or {})
        stderr_path = tmp_path / f"turnout{len(started)}.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", str(path), "--no-access-log"],
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=full_env,
                start_new_session=True,
            )
        turnout = TurnoutProcess(proc, config, path)
        turnout.stderr_path = stderr_path
        started.append(turnout)
        turnout.wait_ready()
        return turnout

    yield start
    for turnout in started:
        turnout.close()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def hidden_from_watch(tmp_path: Path, text: str) -> tuple[Path, Path]:
    """(config path, real file): the config is a symlink into a subfolder.

    The watch looks at the config's own folder, not into others, so editing the real file in
    place is seen only by an explicit reload: SIGHUP or POST /admin/reload.
    """
    real = tmp_path / "versions" / "current.yaml"
    real.parent.mkdir()
    write(real, text)
    link = tmp_path / "turnout.yaml"
    link.symlink_to(Path("versions") / "current.yaml")
    return link, real


# --- tests -------------------------------------------------------------------------------------


def test_serves_and_reports_the_config_in_force(
    tmp_path: Path, blue: EchoUpstream, launch: Launch
) -> None:
    config = base_config(blue, workers=2)
    path = write(tmp_path / "turnout.yaml", yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path)

    assert_serves(proc)
    assert call("GET", f"{proc.admin_url}/healthz")[0] == 200
    view = admin_config(proc)
    assert view["generation"] == 1
    assert view["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert view["path"] == str(path)
    assert view["last_error"] is None
    assert view["config"]["routes"][0]["name"] == "all"
    assert view["loaded_at"].endswith("Z")
    loaded_at = datetime.fromisoformat(view["loaded_at"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - loaded_at).total_seconds()) < 120
    workers = view["workers"]
    assert sorted(w["index"] for w in workers) == [0, 1]
    assert all(w["ready"] and w["generation"] == 1 for w in workers)
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2
    assert pids <= set(process_tree(proc.proc.pid))


def test_sighup_reloads_and_unchanged_file_is_a_noop(
    tmp_path: Path, blue: EchoUpstream, launch: Launch
) -> None:
    config = base_config(blue)
    path, real = hidden_from_watch(tmp_path, yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path)

    write(real, variant(config, retries=1))
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(generation_is(proc, 2), timeout=DEADLINE, what="generation 2 after SIGHUP")
    view = admin_config(proc)
    assert view["sha256"] == hashlib.sha256(real.read_bytes()).hexdigest()
    assert view["config"]["routes"][0]["retries"] == 1
    assert view["reloads"] == {"success": 1, "failure": 0}

    proc.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "reload (SIGHUP): file unchanged" in proc.stderr_text(),
        timeout=DEADLINE,
        what="the no-op reload",
    )
    assert admin_config(proc)["generation"] == 2
    assert_serves(proc)


def test_post_admin_reload(tmp_path: Path, blue: EchoUpstream, launch: Launch) -> None:
    config = base_config(blue)
    path, real = hidden_from_watch(tmp_path, yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path)

    assert call("POST", f"{proc.admin_url}/admin/reload") == (
        200,
        {"generation": 1, "changed": False},
    )
    write(real, variant(config, retries=0))
    assert call("POST", f"{proc.admin_url}/admin/reload") == (
        200,
        {"generation": 2, "changed": True},
    )
    wait_until(generation_is(proc, 2), timeout=DEADLINE, what="workers at generation 2")
    assert_serves(proc)


def test_invalid_file_keeps_the_old_generation(
    tmp_path: Path, blue: EchoUpstream, launch: Launch
) -> None:
    config = base_config(blue)
    path = write(tmp_path / "turnout.yaml", yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path)
    good_sha = admin_config(proc)["sha256"]

    # Seen by the watch: rejected, counted, shown.
    write(path, invalid(config))
    wait_until(
        lambda: admin_config(proc)["last_error"] is not None,
        timeout=DEADLINE,
        what="last_error",
    )
    view = admin_config(proc)
    assert INVALID_SPLIT.search(view["last_error"]), view["last_error"]
    assert (view["generation"], view["sha256"]) == (1, good_sha)
    assert view["reloads"]["failure"] == 1

    # An explicit reload of the same bad file answers with the errors.
    status, body = call("POST", f"{proc.admin_url}/admin/reload")
    assert status == 400
    assert any(INVALID_SPLIT.search(line) for line in body["errors"]), body
    assert admin_config(proc)["reloads"]["failure"] == 2

    # SIGHUP retries it too (the watch would not: the content did not change again).
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: admin_config(proc)["reloads"]["failure"] == 3,
        timeout=DEADLINE,
        what="the SIGHUP reload to fail",
    )
    assert call("GET", f"{proc.admin_url}/readyz")[0] == 200
    assert_serves(proc)

    # A good file again: a new generation, and the error is gone.
    write(path, variant(config, retries=1))
    wait_until(generation_is(proc, 2), timeout=DEADLINE, what="generation 2")
    assert admin_config(proc)["last_error"] is None


def test_admin_token(tmp_path: Path, blue: EchoUpstream, launch: Launch) -> None:
    config = base_config(blue)
    path = write(tmp_path / "turnout.yaml", yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path, env={"TURNOUT_ADMIN_TOKEN": "s3cret-token"})
    url = f"{proc.admin_url}/admin/config"

    status, body = call("GET", url)
    assert status == 401
    assert "error" in body
    assert call("GET", url, token="wrong")[0] == 401
    assert call("POST", f"{proc.admin_url}/admin/reload")[0] == 401
    status, body = call("GET", url, token="s3cret-token")
    assert status == 200
    assert body["generation"] == 1
    # Probes work without credentials.
    assert call("GET", f"{proc.admin_url}/healthz")[0] == 200
    assert call("GET", f"{proc.admin_url}/readyz")[0] == 200


def test_killed_worker_is_replaced(tmp_path: Path, blue: EchoUpstream, launch: Launch) -> None:
    config = base_config(blue)
    path = write(tmp_path / "turnout.yaml", yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path)
    (worker,) = admin_config(proc)["workers"]
    old_pid = worker["pid"]

    os.kill(old_pid, signal.SIGKILL)

    def replaced() -> bool:
        workers = admin_config(proc)["workers"]
        return len(workers) == 1 and workers[0]["pid"] != old_pid and workers[0]["ready"]

    wait_until(replaced, timeout=DEADLINE, what="a new worker")
    assert call("GET", f"{proc.admin_url}/readyz")[0] == 200
    assert_serves(proc)
    assert "worker 0 exited unexpectedly (killed by SIGKILL)" in proc.stderr_text()
    assert old_pid not in process_tree(proc.proc.pid)


def test_sigterm_drains_with_readyz_503_then_exits_0(
    tmp_path: Path, blue: EchoUpstream, launch: Launch
) -> None:
    delay = 3.0
    config = base_config(blue, drain={"delay": f"{delay:g}s", "shutdown": "5s"})
    path = write(tmp_path / "turnout.yaml", yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path)

    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: call("GET", f"{proc.admin_url}/readyz")[0] == 503,
        timeout=1.0,
        what="/readyz 503 right after SIGTERM",
    )
    # Still serving during drain.delay, and still alive.
    assert_serves(proc)
    assert call("GET", f"{proc.admin_url}/healthz")[0] == 200
    assert proc.proc.poll() is None

    assert proc.proc.wait(timeout=delay + 5 + 10) == 0
    assert time.monotonic() - started >= delay - 0.5
    assert "killing" not in proc.stderr_text()


def test_second_signal_exits_at_once(tmp_path: Path, blue: EchoUpstream, launch: Launch) -> None:
    config = base_config(blue, drain={"delay": "60s", "shutdown": "60s"})
    path = write(tmp_path / "turnout.yaml", yaml.safe_dump(config, sort_keys=False))
    proc = launch(config, path)
    (worker,) = admin_config(proc)["workers"]

    proc.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: call("GET", f"{proc.admin_url}/readyz")[0] == 503,
        timeout=DEADLINE,
        what="draining",
    )
    proc.proc.send_signal(signal.SIGINT)
    # Within 10 s of a 60 s drain: the second signal did not wait for it.
    assert proc.proc.wait(timeout=10) == 1
    wait_until(
        lambda: not os.path.exists(f"/proc/{worker['pid']}"),
        timeout=DEADLINE,
        what="the worker to be gone",
    )


def edit_in_place(path: Path, text: str) -> None:
    with open(path, "r+", encoding="utf-8") as f:
        f.truncate(0)
        f.write(text)


def replace_by_rename(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.swp-new")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def configmap_layout(folder: Path, text: str) -> Path:
    """A Kubernetes ConfigMap volume: turnout.yaml -> ..data/turnout.yaml, ..data -> ..v1."""
    (folder / "..v1").mkdir()
    (folder / "..v1" / "turnout.yaml").write_text(text, encoding="utf-8")
    (folder / "..data").symlink_to("..v1")
    path = folder / "turnout.yaml"
    path.symlink_to(Path("..data") / "turnout.yaml")
    return path


def configmap_swap(path: Path, text: str) -> None:
    """What the kubelet does: new folder, new ..data link renamed over the old, old removed."""
    folder = path.parent
    (folder / "..v2").mkdir()
    (folder / "..v2" / "turnout.yaml").write_text(text, encoding="utf-8")
    (folder / "..data_tmp").symlink_to("..v2")
    os.replace(folder / "..data_tmp", folder / "..data")
    shutil.rmtree(folder / "..v1")


@pytest.mark.parametrize("how", ["in_place", "rename", "configmap"])
def test_file_watch_sees_changes_within_2s(
    tmp_path: Path, blue: EchoUpstream, launch: Launch, how: str
) -> None:
    config = base_config(blue)
    text = yaml.safe_dump(config, sort_keys=False)
    folder = tmp_path / "config"
    folder.mkdir()
    if how == "configmap":
        path = configmap_layout(folder, text)
    else:
        path = write(folder / "turnout.yaml", text)
    proc = launch(config, path)

    new_text = variant(config, retries=1)
    if how == "in_place":
        edit_in_place(path, new_text)
    elif how == "rename":
        replace_by_rename(path, new_text)
    else:
        configmap_swap(path, new_text)

    wait_until(
        lambda: admin_config(proc)["generation"] == 2,
        timeout=WATCH_DEADLINE,
        what=f"generation 2 after {how}",
    )
    view = admin_config(proc)
    assert view["sha256"] == hashlib.sha256(new_text.encode()).hexdigest()
    assert view["path"] == str(path)
    wait_until(generation_is(proc, 2), timeout=DEADLINE, what="workers at generation 2")
    assert_serves(proc)


async def test_request_stats_gathers_answers_within_the_deadline(
    tmp_path: Path, blue: EchoUpstream
) -> None:
    # In process, so the test can call the supervisor's API; the workers are real processes.
    config = base_config(blue, workers=2)
    path = write(tmp_path / "turnout.yaml", yaml.safe_dump(config, sort_keys=False))
    text, spec = load_config(str(path))
    supervisor = Supervisor(str(path), text, spec, access_log=False)
    tasks = TaskSet("test")
    running = tasks.spawn(supervisor.run(), name="supervisor")
    try:
        await async_wait_until(lambda: supervisor.readiness().ready, seconds=DEADLINE)
        pids = [w["pid"] for w in supervisor.config_view()["workers"]]

        answers = await supervisor.workers.request_stats(5.0)
        assert sorted(a["pid"] for a in answers) == sorted(pids)

        # A worker that cannot answer (stopped) is left out once the deadline passes.
        os.kill(pids[0], signal.SIGSTOP)
        try:
            # Bounded by the caller's deadline, not by the stopped worker.
            async with asyncio.timeout(DEADLINE):
                answers = await supervisor.workers.request_stats(0.5)
            assert [a["pid"] for a in answers] == [pids[1]]
        finally:
            os.kill(pids[0], signal.SIGCONT)
    finally:
        supervisor.request_stop()
        assert await asyncio.wait_for(running, DEADLINE) == 0
