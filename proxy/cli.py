"""The `turnout` command line: run, validate, demo, and the admin API's client.

Exit status: 0 success or clean shutdown; 1 a bad config file, a refused start, a forced exit
(second signal), a call the admin API refused or an admin API that does not answer, or a missing
dependency; 2 a usage error (argparse). Results go to stdout (the `validate` summary, the demo's
instructions, the access log, the client's answers); events and errors go to stderr, one per line.

Only the standard library is imported up front: each command imports what it needs when it runs,
so `--help` and the client commands start fast, and a Python without Turnout's dependencies gets
one line saying how to install them instead of a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The demo's table ships with the sources, next to the package.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
# Import names of the dependencies that differ from the name to install.
DISTRIBUTIONS = {"yaml": "pyyaml", "prometheus_client": "prometheus-client"}
# The admin API's rollout actions (proxy.control.rollouts.ACTIONS, which imports far more; a
# test keeps them equal).
ROLLOUT_ACTIONS = ("start", "pause", "resume", "abort", "promote")
# How long the client commands wait for an answer (seconds). A container runtime kills a slow
# health check anyway (Docker's HEALTHCHECK --timeout): `healthcheck` answers before that.
CLIENT_TIMEOUT = 10.0
HEALTHCHECK_TIMEOUT = 2.0

EPILOG = """\
signals (to the process of `turnout run`, or to `turnout demo`):
  SIGTERM, SIGINT  drain: /readyz answers 503, requests in flight finish, then exit 0
  a second one     exit at once, with status 1
  SIGHUP           reload the config file (as POST /admin/reload does)

environment:
  TURNOUT_ADMIN_TOKEN    the admin API's token: `run` and `demo` require it when `admin` is
                         not a loopback address, and then ask every /admin call for it
                         (Authorization: Bearer); status, split, rollout and reload send it.
                         /healthz, /readyz and /metrics need none.
  TURNOUT_GRAFANA_TOKEN  the Grafana token `run` sends with its deployment annotations
                         (`annotations: {grafana: URL}` in the config)
  TURNOUT_REDIS_PASSWORD the fleet's Redis password, when `fleet.redis` has none
                         (`fleet: {name, redis}` in the config; docs/fleet.md)

exit status:
  0  success, or a clean shutdown
  1  an invalid config, a refused start, a forced exit (second signal), a call the admin API
     refused (its message is printed), an admin API that does not answer, a missing dependency
  2  a usage error

`turnout COMMAND --help` describes a command."""

CLIENT_EPILOG = """\
The admin API is found at --admin URL, else at the `admin` address of --config FILE, else at
http://127.0.0.1:9901. TURNOUT_ADMIN_TOKEN, when set, is sent as the bearer token.
Exit status: 0 done; 1 refused by the server (its message is printed) or no answer; 2 usage."""


def setup_logging() -> None:
    """Events and errors on stderr, one line each."""
    import logging  # here: the client commands log nothing

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # watchfiles logs every batch of file events at INFO; the supervisor logs what matters.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def _cmd_run(args: argparse.Namespace) -> int:
    from proxy.control.supervisor import run_supervisor

    setup_logging()
    return run_supervisor(args.config, access_log=not args.no_access_log)


def _cmd_validate(args: argparse.Namespace) -> int:
    from proxy.control.certificates import certificate_warnings
    from proxy.control.supervisor import ConfigLoadError, load_config
    from proxy.core.config import summary

    try:
        _, spec = load_config(args.config)
    except ConfigLoadError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 1
    print(summary(spec, args.config))
    # Certificates that expire soon are valid today: a warning, not an error.
    for line in certificate_warnings(spec):
        print(f"{args.config}: warning: {line}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    setup_logging()
    return run_demo(
        args.config, requests=args.requests, rollout=args.rollout, access_log=args.access_log
    )


def _run_client(name: str, args: argparse.Namespace) -> int:
    """Run the command `name` of proxy.client; its ClientError is printed, exit status 1."""
    from proxy import client

    try:
        status: int = getattr(client, name)(args)
    except client.ClientError as exc:
        for line in str(exc).splitlines():
            print(f"turnout: {line}", file=sys.stderr)
        return 1
    return status


def _cmd_split(args: argparse.Namespace) -> int:
    names = [name for name, _ in args.weights]
    if bool(names) == args.reset:
        args.usage_error("give UPSTREAM=WEIGHT pairs (e.g. blue=90 canary=10), or --reset")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        args.usage_error(f"upstream given twice: {', '.join(twice)}")
    return _run_client("cmd_split", args)


class _Version(argparse.Action):
    """`--version`: the version and build /metrics reports in turnout_build_info, imported on
    demand.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from proxy.control.metrics import BUILD_VERSION, DATA_PLANE_BUILD

        print(f"turnout {BUILD_VERSION} ({DATA_PLANE_BUILD} data plane)")
        parser.exit()


def _admin_url(text: str) -> str:
    from proxy.client import admin_url

    try:
        return admin_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _weight(text: str) -> tuple[str, float]:
    from proxy.client import parse_weight

    return parse_weight(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, more than 0 and below 3600")
    return seconds


def _client_options(*, json: bool = True) -> argparse.ArgumentParser:
    """The options every client command takes (a parent parser)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--admin",
        type=_admin_url,
        metavar="URL",
        help="the admin API, e.g. http://127.0.0.1:9901 (default: the `admin` of --config, "
        "else http://127.0.0.1:9901)",
    )
    options.add_argument(
        "--config", metavar="FILE", help="read the admin address from this routing table"
    )
    options.add_argument(
        "--timeout",
        type=_seconds,
        default=CLIENT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on an answer after this long (default: {CLIENT_TIMEOUT:g}; "
        f"healthcheck: {HEALTHCHECK_TIMEOUT:g})",
    )
    if json:
        options.add_argument("--json", action="store_true", help="print the server's JSON")
    return options


def _add_client_commands(commands: Any) -> None:
    with_json = _client_options()
    status = commands.add_parser(
        "status",
        parents=[with_json],
        help="routes, effective splits, their source, rollouts and their last verdict",
        description="One line about the process (readiness, generation, config file, last "
        "reload error), then per route the effective split, where it comes from (file, "
        "runtime, rollout) and the rollout's state and last verdict; the fleet when there is "
        "one. --json prints GET /admin/routes with a `fleet` key (null without a fleet).",
        epilog=CLIENT_EPILOG,
    )
    status.set_defaults(func=functools.partial(_run_client, "cmd_status"))

    split = commands.add_parser(
        "split",
        parents=[with_json],
        help="put a runtime split in force on ROUTE (blue=90 canary=10), or --reset it",
        description="PUT /admin/routes/ROUTE/split with the weights (upstreams left out get "
        "0; weights are relative), in force in every worker and kept in the state file when "
        "the command returns. --reset: DELETE it, the file's split is in force again.",
        epilog=CLIENT_EPILOG,
    )
    split.add_argument("route", metavar="ROUTE")
    split.add_argument("weights", nargs="*", type=_weight, metavar="UPSTREAM=WEIGHT")
    split.add_argument("--reset", action="store_true", help="back to the file's split")
    split.set_defaults(func=_cmd_split, usage_error=split.error)

    rollout = commands.add_parser(
        "rollout",
        parents=[with_json],
        help="drive ROUTE's canary rollout: start, pause, resume, abort, promote",
        description="POST /admin/routes/ROUTE/rollout/ACTION. A call the rollout's state does "
        "not allow (resume when not paused, ...) is refused with the reason: exit 1.",
        epilog=CLIENT_EPILOG,
    )
    rollout.add_argument("route", metavar="ROUTE")
    rollout.add_argument("action", choices=ROLLOUT_ACTIONS)
    rollout.set_defaults(func=functools.partial(_run_client, "cmd_rollout"))

    reload = commands.add_parser(
        "reload",
        parents=[with_json],
        help="reload the config file now (as SIGHUP does)",
        description="POST /admin/reload: the new generation, or every error of the file "
        "(exit 1; the config in force stays).",
        epilog=CLIENT_EPILOG,
    )
    reload.set_defaults(func=functools.partial(_run_client, "cmd_reload"))

    healthcheck = commands.add_parser(
        "healthcheck",
        parents=[_client_options(json=False)],
        help="exit 0 when /readyz answers 200, else 1 (a container HEALTHCHECK)",
        description="GET /readyz (no token needed): prints `ready` and exits 0, or the reason "
        "and exits 1 (not ready, draining, no answer).",
        epilog=CLIENT_EPILOG,
    )
    healthcheck.set_defaults(
        func=functools.partial(_run_client, "cmd_healthcheck"), timeout=HEALTHCHECK_TIMEOUT
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `turnout` and `python -m proxy`."""
    parser = argparse.ArgumentParser(
        prog="turnout",
        description="Traffic-splitting reverse proxy: blue-green, canary, sticky, shadow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="serve the routing table in CONFIG",
        description="Serve until SIGTERM or SIGINT (a drain; a second signal exits at once); "
        "SIGHUP reloads CONFIG.",
    )
    run.add_argument("config", metavar="CONFIG", help="routing table file (YAML)")
    run.add_argument(
        "--no-access-log", action="store_true", help="do not write the JSON access log to stdout"
    )
    run.set_defaults(func=_cmd_run)

    validate = commands.add_parser(
        "validate", help="check CONFIG: a one-line summary (exit 0) or every error (exit 1)"
    )
    validate.add_argument("config", metavar="CONFIG", help="routing table file (YAML)")
    validate.set_defaults(func=_cmd_validate)

    demo = commands.add_parser(
        "demo", help="start demo upstreams and the proxy, and print what to try"
    )
    demo.add_argument(
        "--config",
        default=str(DEMO_CONFIG),
        metavar="PATH",
        help="demo routing table (default: config/demo.yaml of the source tree)",
    )
    demo.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="send N requests through the proxy, print the count per upstream, and stop",
    )
    demo.add_argument(
        "--rollout",
        action="store_true",
        help="start the rollout of the first route that has one, send it 25 requests/s, "
        "print each step and the final state, and stop (exit 0 when it succeeded)",
    )
    demo.add_argument(
        "--access-log",
        action="store_true",
        help="write the JSON access log to stdout (off by default: it would bury the hints)",
    )
    demo.set_defaults(func=_cmd_demo)

    _add_client_commands(commands)
    return parser


def missing_dependency(name: str) -> str:
    """The one line printed when the module `name` cannot be imported."""
    top = name.partition(".")[0]
    package = DISTRIBUTIONS.get(top)
    origin = f" (from the package {package})" if package else ""
    return (
        f"turnout: cannot run: the Python module '{top}'{origin} is missing for "
        f"{sys.executable}; install Turnout's dependencies with `./dev setup` in the source "
        "tree (then run .venv/bin/turnout), or `pip install .` there"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `turnout` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        status: int = args.func(args)
    except ModuleNotFoundError as exc:
        # A module of Turnout itself missing is a broken package, not a setup step to explain.
        if not exc.name or exc.name.partition(".")[0] == "proxy":
            raise
        print(missing_dependency(exc.name), file=sys.stderr)
        return 1
    return status
