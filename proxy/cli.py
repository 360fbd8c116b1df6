"""The `turnout` command line: run, validate, demo.

Exit status: 0 success or clean shutdown; 1 a bad config file, a refused start or a forced exit
(second signal); 2 a usage error (argparse). Results go to stdout (the `validate` summary, the
demo's instructions, the access log); events and errors go to stderr, one per line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.config import summary
from proxy.supervisor import ConfigLoadError, load_config, run_supervisor

# The demo's table ships with the sources, next to the package.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


def setup_logging() -> None:
    """Events and errors on stderr, one line each."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # watchfiles logs every batch of file events at INFO; the supervisor logs what matters.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def _cmd_run(args: argparse.Namespace) -> int:
    return run_supervisor(args.config, access_log=not args.no_access_log)


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        _, spec = load_config(args.config)
    except ConfigLoadError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 1
    print(summary(spec, args.config))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: the demo pulls in the aiohttp client, which `run` does not need.
    from proxy.demo import run_demo

    access_log = not args.no_access_log and args.requests is None
    return run_demo(args.config, requests=args.requests, access_log=access_log)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `turnout` and `python -m proxy`."""
    parser = argparse.ArgumentParser(
        prog="turnout",
        description="Traffic-splitting reverse proxy: blue-green, canary, sticky, shadow.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve the routing table in CONFIG")
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
        "--no-access-log", action="store_true", help="do not write the JSON access log to stdout"
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `turnout` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()
    status: int = args.func(args)
    return status
