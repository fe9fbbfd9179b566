"""``influence serve`` and ``influence openapi``: the service's CLI subcommands."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.errors import ConfigError, InfluenceError
from engine.choices import SEARCH_PLACEMENTS
from service.logs import WORKER_FORMAT, configure_logging, uvicorn_log_config

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "api" / "openapi.json"

# How ``serve`` runs uvicorn, one process or several. httptools and uvloop are pinned
# dependencies: with uvicorn's pure-Python h11 parser and the stock asyncio loop, HTTP work
# held the GIL for longer per request, time the encoder thread waited for (bench_service).
# uvicorn's own access
# line is off: the request-id middleware already logs one line per request, with its id.
UVICORN_OPTIONS: dict[str, Any] = {
    "http": "httptools",
    "loop": "uvloop",
    "access_log": False,
    "log_config": uvicorn_log_config(),  # uvicorn's own lines through SafeFormatter too
}


SERVE_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "--index",
        "index_dir",
        {"type": Path, "help": "published index directory (INFLUENCE_INDEX_DIR)"},
    ),
    ("--host", "host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", "port", {"type": int, "help": "port (default 8000)"}),
    ("--device", "device", {"help": "torch device for query encoding (default: auto)"}),
    ("--model-dir", "model_dir", {"type": Path, "help": "override the manifest's model directory"}),
    (
        "--search-placement",
        "search_placement",
        {
            "choices": SEARCH_PLACEMENTS,
            "help": "where search runs (default auto; torch: exact brute force on the GPUs)",
        },
    ),
    (
        "--milvus",
        "milvus_uri",
        {
            "metavar": "URI",
            "help": "search through a Milvus collection pushed by influence index push (a pymilvus URI)",
        },
    ),
    (
        "--collection",
        "milvus_collection",
        {
            "metavar": "NAME",
            "help": "with --milvus: the collection's name (default: influence_<index version>)",
        },
    ),
    (
        "--nprobe",
        "nprobe",
        {"type": int, "help": "IVF indexes: lists visited per query (default 16)"},
    ),
    (
        "--ef-search",
        "ef_search",
        {"type": int, "help": "HNSW indexes: search beam width (default 128)"},
    ),
    (
        "--rerank-candidates",
        "rerank_candidates",
        {
            "type": int,
            "help": "approximate indexes: hits re-ranked exactly per query (default 10 x k)",
        },
    ),
    (
        "--rescore",
        "rescore",
        {
            "type": int,
            "metavar": "C",
            "help": "candidates the exact second stage re-scores at most, unless a request says (0: off; "
            "default: the index's)",
        },
    ),
    (
        "--max-new-tokens",
        "max_new_tokens",
        {
            "type": int,
            "help": "the most tokens a generate-and-trace query may ask for (default 64)",
        },
    ),
    ("--max-batch-size", "max_batch_size", {"type": int, "help": "queries per encode pass"}),
    (
        "--max-wait-ms",
        "max_wait_ms",
        {"type": float, "help": "how long a query waits for batch mates"},
    ),
    ("--max-queue", "max_queue", {"type": int, "help": "waiting queries before 503"}),
    (
        "--workers",
        "workers",
        {"type": int, "help": "server processes, each with its own model and index (default 1)"},
    ),
    (
        "--torch-threads",
        "torch_threads",
        {"type": int, "help": "CPU threads per process (default: cores / workers)"},
    ),
    (
        "--reload-root",
        "reload_root",
        {
            "type": Path,
            "metavar": "DIR",
            "help": "admin reloads may open indexes under DIR (default: only the served index)",
        },
    ),
)
"""``influence serve``'s flags: (flag, the ``service.settings.Settings`` field it sets,
argparse options). One table for the parser and for ``_settings_from``; a flag left out
keeps the field's ``INFLUENCE_*`` value or default. (Flags are not generated from the
fields themselves: that would import pydantic-settings to print ``--help``, 0.3 s.)"""


def register(subparsers) -> None:
    """Add ``serve`` and ``openapi`` to the ``influence`` dispatcher."""
    serve = subparsers.add_parser("serve", help="serve an index over HTTP (FastAPI + uvicorn)")
    for flag, field, options in SERVE_FLAGS:
        metavar = None if "choices" in options else flag.lstrip("-").upper().replace("-", "_")
        serve.add_argument(flag, dest=field, **{"metavar": metavar, **options})
    serve.set_defaults(func=run_serve)

    openapi = subparsers.add_parser("openapi", help="export the API's OpenAPI schema")
    openapi.add_argument(
        "--out", type=Path, default=None, help="output file (default: stdout; - also stdout)"
    )
    openapi.set_defaults(func=run_openapi)


def openapi_text() -> str:
    """The app's OpenAPI schema as the committed ``api/openapi.json`` text."""
    from service.app import create_app
    from service.settings import Settings

    schema = create_app(Settings(index_dir=None)).openapi()
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def run_openapi(args: argparse.Namespace) -> int:
    text = openapi_text()
    if args.out is None or str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        log.info("wrote %s", args.out)
    return 0


def _settings_from(args: argparse.Namespace):
    from service.settings import Settings

    overrides = {field: getattr(args, field, None) for _, field, _ in SERVE_FLAGS}
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise ConfigError(
            f"invalid setting {field}: {first.get('msg')}", code="invalid_settings"
        ) from exc


def run_serve(args: argparse.Namespace) -> int:
    """Run uvicorn; SIGHUP reloads the configured index directory."""
    settings = _settings_from(args)
    if settings.index_dir is None:
        raise InfluenceError(
            "no index: pass --index DIR or set INFLUENCE_INDEX_DIR", code="no_index"
        )
    if not Path(settings.index_dir).is_dir():
        raise InfluenceError(f"{settings.index_dir} is not a directory", code="no_index")
    check_servable(settings)
    return serve(
        settings, announce=lambda url: log.info("serving %s on %s", settings.index_dir, url)
    )


def serve(settings, announce: Callable[[str], None]) -> int:
    """Bind ``settings.host:port``, call ``announce`` with the server's URL (only once the
    port is ours), then run uvicorn with one process or ``settings.workers``.

    Raises:
        InfluenceError: code ``port_in_use`` (or ``cannot_listen``) before anything is announced.
    """
    import uvicorn

    from service.app import create_app
    from service.settings import CSV_FIELDS

    sock = listen(settings.host, settings.port)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    announce(f"http://{host}:{sock.getsockname()[1]}")
    if settings.workers == 1:
        app = create_app(settings, handle_sighup=True)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="info", **UVICORN_OPTIONS
        )
        uvicorn.Server(config).run(sockets=[sock])
        return 0
    # Several processes: each worker builds its app from the environment (the command
    # line's settings are passed down as INFLUENCE_* variables); SIGHUP makes uvicorn's
    # supervisor restart the workers, which reload the configured index.
    for name, value in settings.model_dump(exclude_none=True).items():
        if name in CSV_FIELDS:
            value = ",".join(value)
        os.environ[f"INFLUENCE_{name.upper()}"] = str(value)
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "service.commands:worker_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_level="info",
        **UVICORN_OPTIONS,
    )
    try:
        Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass
    return 0


def check_servable(settings) -> None:
    """What would keep the service from ever becoming ready, refused before it starts
    (``serve`` exits 2) instead of a server answering 503 forever."""
    from encoder.model_loading import check_model_dir
    from indexer import manifest as mf

    manifest = mf.Manifest.read(Path(settings.index_dir))
    model_dir = settings.model_dir or Path(manifest.model.path)
    try:
        check_model_dir(model_dir)
    except InfluenceError as exc:
        where = (
            "--model-dir"
            if settings.model_dir
            else "the manifest's model path; pass --model-dir DIR (or INFLUENCE_MODEL_DIR)"
        )
        raise InfluenceError(f"{exc.message} ({where})", code=exc.code) from exc


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here so that a taken port is a clear error
    before anything is announced (uvicorn would log it and exit 3), with TCP_NODELAY set.

    TCP_NODELAY: asyncio's transports set it on accepted connections only when the socket's
    ``proto`` is IPPROTO_TCP, which a plain ``socket.socket(family)`` (uvicorn's own bind)
    is not; every response written in two sends (headers, then body) then waited for the
    client's delayed ACK, a ~40 ms floor on every request. Linux copies TCP_NODELAY from
    the listener to each accepted connection.

    Raises:
        InfluenceError: code ``port_in_use`` (say which port to pick instead) or
            ``cannot_listen`` (any other refusal: no such address, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            pick = "pick another port with --port N (make demo PORT=N)"
            raise InfluenceError(
                f"{host}:{port} is already in use: {pick}", code="port_in_use"
            ) from None
        raise InfluenceError(
            f"cannot listen on {host}:{port}: {exc.strerror}", code="cannot_listen"
        ) from None
    sock.set_inheritable(True)  # --workers: the worker processes share it
    return sock


def worker_app():
    """App factory of one ``--workers`` process: the CLI's log format (the process is
    spawned fresh, so errors would otherwise reach stderr unformatted), settings from the
    INFLUENCE_* environment that ``run_serve`` exported."""
    from service.app import create_app

    configure_logging(fmt=WORKER_FORMAT)
    return create_app()
