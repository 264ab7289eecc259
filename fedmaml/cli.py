"""The ``fedmaml`` command. Each subcommand lives in ``fedmaml/commands/<name>.py`` and exposes
``register(subparsers)`` (which sets ``func`` on its parser); heavy imports happen inside ``func``
so that ``fedmaml --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import NoReturn

from fedmaml import __version__
from fedmaml.errors import FedmamlError

#: subcommand modules under fedmaml.commands, in the order ``--help`` lists them
COMMANDS = ("simulate", "personalize", "predict", "report", "client", "certs")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (the problem and where the help is)
    instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedmaml",
        description="Federated meta-learning (MAML, FOMAML, Meta-SGD, Reptile) on Flower: "
        "simulate, deploy and personalize.",
    )
    parser.add_argument("--version", action="version", version=f"fedmaml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"fedmaml.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedmamlError as exc:
        print(f"fedmaml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or processes.Stopped for SIGTERM / SIGHUP
        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"fedmaml {args.command}: stopped by {signal.Signals(signum).name}; every process "
            "it started was stopped",
            file=sys.stderr,
        )
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
