"""``python -m indexer build ...`` / ``torchrun --nproc-per-node N -m indexer build ...``.

Same options as ``influence index build``; under torchrun every rank runs this entry point
and the build splits its shards across the ranks. (Kept free of ``service`` imports: the
indexer sits below the service in the dependency order.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from api.errors import InfluenceError
from indexer.cli import register


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("build", "info", "verify"):
        argv = ["index", *argv]
    parser = argparse.ArgumentParser(prog="python -m indexer")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except InfluenceError as exc:
        print(f"influence: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
