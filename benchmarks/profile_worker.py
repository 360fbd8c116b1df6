"""Where a Turnout worker's time goes under real load: py-spy for the process's own frames
(Python, the compiled modules, C libraries), perf for the whole process including the kernel.

    .venv/bin/python benchmarks/profile_worker.py          # browser scenario, 10 s per tool
    .venv/bin/python benchmarks/profile_worker.py --scenario small --seconds 20
    .venv/bin/python benchmarks/profile_worker.py --scenario h2-small   # h2load over h2c

One worker pinned on core 0, the backend nginx and wrk on the last core (as `run.py --pin`), the
route of `run.py --features` (sticky 90/10 split with a header override, metrics on, access log
off). wrk (for h2-small: h2load, --connections in flight as 8 streams per connection) runs
for warm-up + both recordings; py-spy records first, then `perf record -e cpu-clock` (no
hardware counters needed), one after the other so neither slows the other's view.
The report lists the leaf functions taking the most samples and the same samples in a few
groups (kernel, event loop, HTTP parser, Turnout's code, interpreter, allocator). py-spy stops
the process to unwind native stacks and so over-samples system calls: take shares from perf's
table, and from py-spy's which function a cost sits under. It is written
to benchmarks/out/profile-<scenario>-<time>.md. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import benchlib as bl
import h2lib as h2
import run as bench

TOP = 25

# Leaf-frame groups, first match wins. py-spy names native frames `symbol (library)` and Python
# frames `function (file.py:line)`; perf's symbols come with `[k]` for the kernel.
GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kernel", re.compile(r"\[k\]")),
    # py-spy cannot see below libc: a sample in a system call's wrapper is time in the kernel.
    ("waiting in epoll (idle)", re.compile(r"^(\[\.\] )?epoll_p?wait\b")),
    ("system calls", re.compile(r"^(\[\.\] )?(__)?(libc_)?(write|read|send|recv)\w* |^syscall ")),
    ("event loop (uvloop, libuv)", re.compile(r"uvloop|libuv|^uv_|uv__")),
    ("HTTP parser (httptools, llhttp)", re.compile(r"httptools|llhttp")),
    # py-spy names these frames `Class.method (h2/stream.py:1314)`.
    ("HTTP/2 (h2, hpack, hyperframe)", re.compile(r"\((h2|hpack|hyperframe)/")),
    ("TLS (OpenSSL)", re.compile(r"libssl|libcrypto|ssl")),
    ("Turnout, compiled", re.compile(r"CPyDef_|CPyPy_|hot__mypyc|__native_")),
    ("Turnout, Python", re.compile(r"proxy/")),
    ("allocator", re.compile(r"[Mm]alloc|[Ff]ree\b|_PyObject_Free|arena|pymalloc")),
    ("interpreter and objects", re.compile(r"python3|libpython|_Py|Py[A-Z]")),
)


def group_of(frame: str) -> str:
    for name, pattern in GROUPS:
        if pattern.search(frame):
            return name
    return "other"


def worker_pid(supervisor: int, deadline_s: float = 10.0) -> int:
    """The one worker: the supervisor's child running the data plane."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for pid in bl.process_tree(supervisor)[1:]:
            with contextlib.suppress(OSError):
                if b"proxy.dataplane.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        time.sleep(0.1)
    raise bl.StartError("no worker process found under the supervisor")


def py_spy_leaves(pid: int, seconds: int, out: Path) -> collections.Counter[str]:
    """Leaf frames of `pid` sampled by py-spy (native frames included), by sample count."""
    argv = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--native",
        "--rate",
        "250",
        "--format",
        "raw",
        "--duration",
        str(seconds),
        "--pid",
        str(pid),
        "--output",
        str(out),
    ]
    done = bl.run_bounded(argv, seconds + 30)
    if done.returncode != 0:
        raise bl.StartError(f"py-spy failed: {done.stdout[-2000:]}")
    leaves: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            leaves[stack.split(";")[-1].strip()] += int(count)
    return leaves


def perf_leaves(pid: int, seconds: int, out: Path) -> collections.Counter[str]:
    """Leaf symbols of `pid` (kernel ones marked [k]) sampled by perf's cpu-clock."""
    record = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(pid), "-o"]
    done = bl.run_bounded([*record, str(out), "--", "sleep", str(seconds)], seconds + 30)
    if done.returncode != 0:
        raise bl.StartError(f"perf record failed: {done.stdout[-2000:]}")
    report = ["perf", "report", "-i", str(out), "--no-children", "--sort", "dso,sym", "--stdio"]
    text = bl.run_bounded([*report, "-F", "period,dso,sym"], 120).stdout
    leaves: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        # "  12345678  libc.so.6  [.] __send"
        fields = line.split(None, 2)
        if len(fields) == 3 and fields[0].isdigit():
            dso, sym = fields[1], fields[2]
            kind, _, name = sym.partition(" ")
            leaves[f"{kind} {name.strip()} ({dso})"] += int(fields[0])
    return leaves


def table(title: str, leaves: collections.Counter[str]) -> list[str]:
    total = sum(leaves.values()) or 1
    groups: collections.Counter[str] = collections.Counter()
    for frame, count in leaves.items():
        groups[group_of(frame)] += count
    lines = [f"### {title}", "", "| group | share |", "|---|---|"]
    lines += [f"| {name} | {100 * count / total:.1f} % |" for name, count in groups.most_common()]
    lines += ["", f"Top {TOP} leaf frames:", "", "| share | frame |", "|---|---|"]
    for frame, count in leaves.most_common(TOP):
        lines.append(f"| {100 * count / total:.1f} % | `{frame.replace('|', '/')}` |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="browser", choices=["browser", "small", "h2-small"])
    parser.add_argument("--seconds", type=int, default=10, help="per recording (10)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--no-perf", action="store_true", help="py-spy only")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, bl.interrupt_on_sigterm)
    scenario = bench.SCENARIOS[args.scenario]
    tools = bench.ensure_tools(pin=True, perf=not args.no_perf, h2=bool(scenario.h2_streams))
    settings = bench.parse_args(["--workers", "1", "--pin", "--scenarios", args.scenario])
    pinning = bench.choose_pinning(True, [1])
    warmup = 3
    wrk_seconds = warmup + args.seconds * (1 if args.no_perf else 2) + 5
    with bl.session_dir("turnout-profile-") as tmp, contextlib.ExitStack() as stack:
        backend = bench.start_backend(tmp, tools, pinning, stack)
        lab = bench.Lab(settings, tools, pinning, tmp, tmp, backend)
        subject = bench.start_turnout(lab, 1, stack)
        worker = worker_pid(subject.proc.pid)
        script = bench.write_lua(tmp, scenario)
        url = f"http://{bl.LOOPBACK}:{subject.port}{scenario.path}"
        if scenario.h2_streams:
            # h2c with prior knowledge on the plain listener; connections x streams in flight.
            load = h2.h2load_argv(
                tools["h2load"],
                url,
                max(1, args.connections // scenario.h2_streams),
                scenario.h2_streams,
                wrk_seconds,
                None,
                None,
            )
        else:
            load = [
                tools["wrk"],
                "-t2",
                f"-c{args.connections}",
                f"-d{wrk_seconds}s",
                "-s",
                str(script),
                url,
            ]
        wrk = subprocess.Popen(
            [*bl.taskset_prefix(pinning.load), *load], stdout=subprocess.PIPE, text=True
        )
        stack.callback(wrk.kill)
        time.sleep(warmup)  # wrk has no ready signal; this is load ramp-up, not a wait for state
        spy = py_spy_leaves(worker, args.seconds, tmp / "py-spy.txt")
        kernel = None if args.no_perf else perf_leaves(worker, args.seconds, tmp / "perf.data")
        wrk_out, _ = wrk.communicate(timeout=wrk_seconds + 30)
        build = subprocess.run(
            [*settings.turnout_cmd, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    rps = re.search(r"Requests/sec:\s+([\d.]+)|finished in [\d.]+\w+, ([\d.]+) req/s", wrk_out)
    lines = [
        f"# Profile of one Turnout worker: {args.scenario}, c{args.connections}",
        "",
        f"- {bl.timestamp()}, {build}; {pinning.description}",
        f"- {'h2load' if scenario.h2_streams else 'wrk'} during both recordings: "
        f"{(rps[1] or rps[2]) if rps else '?'} req/s",
        "- py-spy: the process's own frames (Python functions, native symbols of compiled "
        "modules and C libraries); perf cpu-clock: the same process including the kernel",
        "",
        *table(f"py-spy --native, {args.seconds} s", spy),
    ]
    if kernel is not None:
        lines += table(f"perf record -e cpu-clock, {args.seconds} s", kernel)
    bl.write_report(f"profile-{args.scenario}-{bl.timestamp()}", "\n".join(lines))


if __name__ == "__main__":
    main()
