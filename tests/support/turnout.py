"""Start and stop Turnout as a real subprocess (`python -m proxy run CONFIG`).

`start_turnout(config, tmp_path)` writes the config (a dict, contract section 1) as YAML, fills
in free `listen` and `admin` ports when the dict has none, starts the process in its own session
(so that teardown can kill its workers too), and returns once `GET /readyz` on the admin address
answers 200 and the data-plane port accepts connections (20 s deadline; on failure the error
carries the captured stderr). Stdout (the access log) is collected line by line by a thread;
stderr goes to a file next to the config.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import yaml

from tests.support import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY_DEADLINE = 20.0


# Ports are handed out from a block of their own per pytest-xdist worker, below the kernel's
# ephemeral range: a port that free_port() checked and closed cannot be taken meanwhile by another
# worker's free_port(), nor by anyone's bind-to-0 or outgoing connection (those draw ephemeral
# ports). Within its block a process goes round in order from a random start (two suites running
# at once on one machine rarely meet), so a port comes again only after the whole block: two
# picks for one config (listen, admin) always differ.
PORTS_FROM = 10000
_BLOCK: range | None = None
_NEXT = 0


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_block() -> range:
    """The ports this process hands out: its xdist worker's share of PORTS_FROM up to the
    ephemeral range (all of it outside xdist)."""
    global _BLOCK, _NEXT
    if _BLOCK is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        # A worker xdist starts in place of a crashed one is numbered on (gw4 of 4): it takes
        # a block of the range, never one inside the ephemeral range.
        index = int(worker.removeprefix("gw")) % count if worker.startswith("gw") else 0
        size = (_ephemeral_low() - PORTS_FROM) // count
        if size < 200:
            raise RuntimeError(f"too few ports below the ephemeral range for {count} workers")
        _BLOCK = range(PORTS_FROM + index * size, PORTS_FROM + (index + 1) * size)
        _NEXT = random.randrange(size)
    return _BLOCK


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """The next port of this process's block that nothing on 127.0.0.1 holds now (bind, close)."""
    global _NEXT
    block = port_block()
    for _ in range(len(block)):
        port = block[_NEXT % len(block)]
        _NEXT += 1
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {block}")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET to `url`, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="latin-1") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its living descendants (a /proc scan)."""
    children = _children()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of `pid` in KiB; empty when the process is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="latin-1") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
    except OSError:
        return {}
    return values


class AccessLogLines(ABC):
    """The access log of a Turnout, whether a subprocess or the in-process data plane, read
    from the lines its log went to (`stdout_lines`)."""

    @abstractmethod
    def stdout_lines(self) -> list[str]:
        """Every line written to the access log's stream so far."""

    def access_log(self) -> list[dict[str, Any]]:
        """Stdout lines that are JSON objects (the access log), parsed."""
        entries = []
        for line in self.stdout_lines():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                entries.append(value)
        return entries

    def wait_for_log(self, request_ids: set[str], timeout: float = 10.0) -> dict[str, Any]:
        """Wait until an access-log line exists for every id; return them by id."""
        found: dict[str, dict[str, Any]] = {}

        def have_all() -> bool:
            for entry in self.access_log():
                if entry.get("request_id") in request_ids:
                    found[str(entry["request_id"])] = entry
            return set(found) >= request_ids

        wait_until(have_all, timeout=timeout, what=f"access-log lines for {sorted(request_ids)}")
        return found


class TurnoutProcess(AccessLogLines):
    """A running Turnout subprocess; use as a context manager or call `close()`."""

    def __init__(
        self, proc: subprocess.Popen[bytes], config: dict[str, Any], config_path: Path
    ) -> None:
        self.proc = proc
        self.config = config
        self.config_path = config_path
        self.stderr_path = config_path.with_suffix(".stderr")
        listen = config["listen"]
        # The list form (contract section 10): the first listener is the one `url` names.
        first = listen[0]["address"] if isinstance(listen, list) else listen
        listen_host, _, listen_port = str(first).rpartition(":")
        self.port = int(listen_port)
        self.url = f"http://{listen_host}:{self.port}"
        self.admin_url = f"http://{config['admin']}"
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._lock:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))

    # -- output ---------------------------------------------------------------------------------

    def stdout_lines(self) -> list[str]:
        """Every stdout line read so far."""
        with self._lock:
            return list(self._lines)

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # -- processes ------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The supervisor and every descendant (workers)."""
        if self.proc.poll() is not None:
            return []
        return process_tree(self.proc.pid)

    def rss_kib(self) -> int:
        """Summed VmRSS of the process tree, KiB."""
        return sum(memory_kib(pid).get("VmRSS", 0) for pid in self.pids())

    def hwm_kib(self) -> dict[int, int]:
        """VmHWM (peak RSS) per process of the tree, KiB."""
        return {pid: memory_kib(pid).get("VmHWM", 0) for pid in self.pids()}

    # -- lifecycle ------------------------------------------------------------------------------

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        """Wait for /readyz 200 and a listening data plane; raise with stderr on failure."""
        until = time.monotonic() + deadline
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"turnout exited with {code} before ready; stderr:\n{self.stderr_text()}"
                )
            if http_status(f"{self.admin_url}/readyz", timeout=1.0) == 200 and self._listening():
                return
            if time.monotonic() > until:
                raise RuntimeError(
                    f"turnout not ready after {deadline}s; stderr:\n{self.stderr_text()}"
                )
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the supervisor and wait; its exit code (kills and raises after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(
                f"turnout did not exit {timeout}s after SIGTERM; stderr:\n{self.stderr_text()}"
            ) from None
        self._reader.join(5)
        return code

    def close(self) -> None:
        """Kill the whole process group (supervisor and workers) if anything is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> TurnoutProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_turnout(
    config: dict[str, Any], tmp_path: Path, *, access_log: bool = False
) -> TurnoutProcess:
    """Write `config` to tmp_path and run Turnout on it until ready (see the module docstring)."""
    config = dict(config)
    config.setdefault("listen", f"127.0.0.1:{free_port()}")
    config.setdefault("admin", f"127.0.0.1:{free_port()}")
    config_path = tmp_path / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return launch(config, config_path, access_log=access_log)


def launch(
    config: dict[str, Any],
    config_path: Path,
    *,
    access_log: bool = False,
    prefix: tuple[str, ...] = (),
) -> TurnoutProcess:
    """Run Turnout on `config_path` as the caller laid it out; return once it is ready.

    `config` is what the file says (its `listen` and `admin` tell where Turnout will be).
    Stderr goes to `config_path` with the suffix `.stderr`. `prefix` goes before the command
    (e.g. `prlimit --nofile=256:256`).
    """
    command = [*prefix, sys.executable, "-m", "proxy", "run", str(config_path)]
    if not access_log:
        command.append("--no-access-log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TURNOUT_ADMIN_TOKEN", None)
    with open(config_path.with_suffix(".stderr"), "wb") as stderr:
        proc = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
    turnout = TurnoutProcess(proc, config, config_path)
    try:
        turnout.wait_ready()
    except BaseException:
        turnout.close()
        raise
    return turnout


TurnoutFactory = Callable[..., TurnoutProcess]
"""The `turnout_factory` fixture: `factory(config, *, access_log=False) -> TurnoutProcess`."""
