"""The ``influence`` command line: one dispatcher, subcommands registered by each package.

Each package owns its subcommands through a ``register(subparsers)`` function
(``indexer.cli``, ``service.commands``, ``evaluation.cli``, ``evaluation.demo``) that adds
parsers whose ``func`` takes the parsed args and returns an exit code. Project errors are
mapped to exit code 2 here, in one place; usage errors are argparse's own exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from encoder.errors import InfluenceError, safe_text
from service.logs import configure_logging

log = logging.getLogger("influence")

# Imported lazily so that `influence index ...` never imports FastAPI.
COMMAND_PROVIDERS = (
    "indexer.cli",
    "service.commands",
    "evaluation.cli",
    "evaluation.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="TrackStar influence search: index a training corpus, query it, serve it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_PROVIDERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that package has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InfluenceError as exc:
        print(f"influence: error [{exc.code}]: {safe_text(exc.message, 2000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("influence: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
