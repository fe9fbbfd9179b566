"""The FastAPI application factory.

``create_app(settings)`` wires settings, the served index (``state.py``), the micro-batcher
(``batcher.py``), auth, error mapping, metrics and the request-id middleware; the routes live
in ``routes/``. The index loads in the background at startup, so ``/healthz`` answers at
once and ``/readyz`` turns 200 when the model and index are loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from api.errors import InfluenceError
from engine.protocols import Index
from engine.query import Limits
from service.admission import Admission
from service.batcher import MicroBatcher
from service.deps import Services, install
from service.errors import install_error_handlers
from service.guard import RequestGuardMiddleware
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.routes import include as include_routes
from service.settings import Settings
from service.state import IndexOpener, IndexState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

API_DESCRIPTION = """\
TrackStar influence search: which training examples made the model say this?

`POST /v1/influence` encodes a prompt + completion as a unit-norm gradient fingerprint
(Chang et al. 2024) and returns the training sequences with the highest influence score.
Errors are JSON `{"error": {"code", "message", "details"}}` with stable codes.
"""


def default_opener(settings: Settings) -> IndexOpener:
    """Opens an index directory with ``engine.index.InfluenceIndex`` per ``settings``."""

    def open_index(index_dir: Path) -> Index:
        from engine.index import InfluenceIndex, OpenOptions  # heavy: torch, faiss, the model
        from indexer.faiss_index import SearchParams
        from indexer.milvus import MilvusTarget

        milvus = (
            None
            if settings.milvus_uri is None
            else MilvusTarget(
                settings.milvus_uri, settings.milvus_collection, settings.milvus_timeout_s
            )
        )
        params = SearchParams(
            nprobe=settings.nprobe,
            ef_search=settings.ef_search,
            candidates=settings.rerank_candidates,
        )
        return InfluenceIndex.open(
            index_dir,
            OpenOptions(
                device=settings.device,
                model_dir=settings.model_dir,
                verify=settings.verify_index,
                search_params=params,
                placement=settings.search_placement,
                milvus=milvus,
            ),
        )

    return open_index


def create_app(
    settings: Settings | None = None,
    *,
    opener: IndexOpener | None = None,
    handle_sighup: bool = False,
) -> FastAPI:
    """Build the app.

    Args:
        settings: service settings (default: from the environment).
        opener: ``Path -> index`` (default: ``InfluenceIndex.open`` with the settings);
            tests pass their own.
        handle_sighup: reload the configured index on SIGHUP (``influence serve``; needs
            the main thread's event loop).
    Returns:
        The FastAPI app; the index loads when its lifespan starts.
    """
    settings = settings if settings is not None else Settings()
    _set_threads(settings)
    metrics = Metrics()
    opener = opener or default_opener(settings)
    state = IndexState(opener, settings.index_dir, freeze_heap=True, on_swap=metrics.observe_index)
    limits = Limits(
        settings.max_prompt_tokens, settings.max_completion_tokens, settings.max_new_tokens
    )
    batcher = MicroBatcher(
        state,
        limits,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
        observe=metrics.observe_batch,
    )
    metrics.queue_depth.set_function(lambda: batcher.depth)
    metrics.index_size.set_function(lambda: state.current.size if state.ready else 0)

    # /docs with its scripts served by this app (fastapi-offline's package data), not a CDN:
    # the docs work on a machine without internet. No /redoc: Redoc fetches its logo online.
    app = FastAPIOffline(
        redoc_url=None,
        title="Influence search",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=_lifespan(settings, state, batcher, metrics, handle_sighup=handle_sighup),
        openapi_tags=[
            {"name": "influence", "description": "Influence queries."},
            {"name": "examples", "description": "Training examples by id."},
            {"name": "index", "description": "The served index."},
            {"name": "admin", "description": "Operations; always need an API key."},
            {"name": "health", "description": "Liveness, readiness, metrics."},
        ],
    )
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    install(
        app, Services(settings, metrics, state, batcher, Admission(settings.max_explains), limits)
    )
    install_error_handlers(app, retry_after_s=settings.retry_after_s)
    include_routes(app)
    app.add_middleware(RequestGuardMiddleware, settings=settings)  # inside CORS: preflights pass
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    if STATIC_DIR.is_dir():
        _add_ui_routes(app, STATIC_DIR)
    return app


def _lifespan(
    settings: Settings,
    state: IndexState,
    batcher: MicroBatcher,
    metrics: Metrics,
    *,
    handle_sighup: bool,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the batcher and load the index in the background at startup (and on SIGHUP);
    stop the batcher and retire the index at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        loading = None
        if settings.index_dir is not None:
            loading = asyncio.create_task(_load(state, metrics))
        if handle_sighup:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(
                signal.SIGHUP, lambda: loop.create_task(_load(state, metrics, "SIGHUP"))
            )
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            await batcher.stop()
            state.close()

    return lifespan


SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`.",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`X-API-Key: <key>`.",
    },
}


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's document plus what generated clients and fuzzers need to know: the API-key
    schemes (a v1 route takes either, or none while auth is off; admin always needs one)
    and this server's token and generation limits (a schema-valid query over them gets 413)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    keyed: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
    for path, operations in schema["paths"].items():
        if path.startswith("/v1/"):
            for op in operations.values():
                op["security"] = keyed if path.startswith("/v1/admin/") else [*keyed, {}]
    components = schema["components"]["schemas"]
    if "GenerateOptions" in components:  # this server's bound (413 beyond), not the wire's cap
        components["GenerateOptions"]["properties"]["max_new_tokens"]["maximum"] = (
            settings.max_new_tokens
        )
    limits = {"prompt": settings.max_prompt_tokens, "completion": settings.max_completion_tokens}
    for name in ("InfluenceQuery", "ExplainRequest"):
        props = schema["components"]["schemas"].get(name, {}).get("properties", {})
        for field, limit in limits.items():
            if field in props:
                props[field]["description"] += (
                    f" At most {limit} tokens on this server (413 beyond)."
                )
                props[field]["x-max-tokens"] = limit
    app.openapi_schema = schema
    return schema


def _add_ui_routes(app: FastAPI, static_dir: Path) -> None:
    """Serve the web UI: ``GET /`` is ``index.html``, ``GET /<file>`` a top-level file.

    Routes rather than a catch-all mount at ``/``, which would answer 404 where the API
    answers 405 (a GET on a POST route).
    """
    files = StaticFiles(directory=static_dir, html=True)

    async def ui(request: Request) -> Response:
        name = request.path_params.get("filename", "")
        return await files.get_response(name or ".", request.scope)

    app.add_api_route("/", ui, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/{filename}", ui, methods=["GET", "HEAD"], include_in_schema=False)


def _set_threads(settings: Settings) -> None:
    """CPU threads of torch and FAISS in this process: as configured, else the cores shared
    out among the workers (oversubscribed OpenMP threads spin against each other)."""
    import faiss
    import torch

    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    threads = settings.torch_threads or max(1, cores // settings.workers)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    log.info("torch and FAISS threads: %d", threads)


async def _load(state: IndexState, metrics: Metrics, why: str = "startup") -> None:
    """(Re)load the configured index; a refused index is logged and counted."""
    log.info("%s: loading %s", why, state.index_dir)
    try:
        await state.reload()
        metrics.reloads.labels("ok").inc()
    except InfluenceError:
        metrics.reloads.labels("refused").inc()  # logged by state; /readyz reports it
