"""The HTTP routes, by concern: influence queries, examples, the served index and its
reload, explanations, health. Thin: validate (pydantic), hand off to the batcher or the
engine, format. Operation ids, tags and descriptions are written for generated clients
(``openapi-python-client`` turns ``query_influence`` into ``query_influence.sync(...)``).
"""

from __future__ import annotations

from fastapi import FastAPI

from service.routes import examples, explain, health, index, influence


def include(app: FastAPI) -> None:
    """Mount every route: the v1 API behind the query-key check, admin behind its own keys,
    health outside both."""
    for module in (influence, examples, index, explain):
        app.include_router(module.router)
    app.include_router(index.admin)
    app.include_router(health.router)
