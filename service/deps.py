"""Typed dependencies of the routes: the app's parts, resolved from its one ``Services``.

``create_app`` builds a ``Services`` and ``install``s it; a route asks for what it needs
with the ``Annotated`` aliases below (``state: StateDep``), and nothing else reads the
app's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from starlette.requests import HTTPConnection

from engine.query import Limits
from service.admission import Admission
from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.settings import Settings
from service.state import IndexState


@dataclass(frozen=True)
class Services:
    """Everything a request may use, made once per app."""

    settings: Settings
    metrics: Metrics
    index_state: IndexState
    batcher: MicroBatcher
    explain_admission: Admission
    limits: Limits


def install(app: FastAPI, services: Services) -> None:
    app.state.services = services


def services(request: HTTPConnection) -> Services:
    """The app's ``Services`` (also for middleware and error handlers, given the request)."""
    found = request.app.state.services
    if not isinstance(found, Services):  # only create_app builds apps
        raise TypeError("the app was not built by service.app.create_app")
    return found


def _settings(request: Request) -> Settings:
    return services(request).settings


def _metrics(request: Request) -> Metrics:
    return services(request).metrics


def _state(request: Request) -> IndexState:
    return services(request).index_state


def _batcher(request: Request) -> MicroBatcher:
    return services(request).batcher


def _admission(request: Request) -> Admission:
    return services(request).explain_admission


def _limits(request: Request) -> Limits:
    return services(request).limits


SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
StateDep = Annotated[IndexState, Depends(_state)]
BatcherDep = Annotated[MicroBatcher, Depends(_batcher)]
AdmissionDep = Annotated[Admission, Depends(_admission)]
LimitsDep = Annotated[Limits, Depends(_limits)]
