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
import os
import sys

from api.errors import InfluenceError, safe_text
from service.logs import configure_logging

log = logging.getLogger("influence")

# Imported lazily so that `influence index ...` never imports FastAPI.
COMMAND_PROVIDERS = (
    "indexer.cli",
    "engine.cli",
    "service.commands",
    "evaluation.cli",
    "evaluation.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="TrackStar influence search: index a training corpus, query it, serve it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_PROVIDERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that package has no commands yet
                continue
            raise
        module.register(sub)
    _verbose_everywhere(parser)
    return parser


VERBOSE_HELP = "debug logging, and the third-party libraries' own logs and progress bars"
OWN_LOGGERS = (
    "influence",
    "encoder",
    "indexer",
    "engine",
    "service",
    "evaluation",
    "api",
    "deploy",
    "benchmarks",
)
"""Loggers at INFO by default; every other library's at WARNING unless -v."""


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` after any subcommand too (``influence index build ... -v``); SUPPRESS keeps a
    subcommand without it from resetting the top-level flag."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--verbose" in a.option_strings for a in child._actions):
                    child.add_argument(
                        "-v",
                        "--verbose",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help=VERBOSE_HELP,
                    )
                _verbose_everywhere(child)


def _quiet_libraries(verbose: bool) -> None:
    """Quiet by default: the project's INFO lines, other libraries' warnings only (FAISS's
    loader, bm25s, transformers' weight-loading bar); everything under -v."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers loads
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    configure_logging(logging.DEBUG if verbose else logging.INFO)
    _quiet_libraries(verbose)
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
    except BrokenPipeError:  # `influence index info X | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
