"""Run an app under a real uvicorn server on 127.0.0.1 (an ephemeral port) in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from service.commands import UVICORN_OPTIONS
from tests.tolerances import recompute_bound


@contextmanager
def live_server(app, *, ready_path: str = "/readyz", timeout_s: float = 120.0) -> Iterator[str]:
    """Serve ``app`` until the context exits; yields the base URL once ``ready_path`` is 200."""
    # The HTTP parser and event loop ``influence serve`` runs with.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **UVICORN_OPTIONS
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=5) as client:
            while client.get(base + ready_path).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_path} did not turn 200 in {timeout_s} s")
                time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def assert_same_results(got: list[dict], want: list[dict], *, atol: float | None = None) -> None:
    """Same ranked examples; scores equal up to float32 batch-shape noise (BLAS kernels
    differ with the number of rows: ``tests.tolerances.recompute_bound``)."""
    atol = recompute_bound() if atol is None else atol
    assert [(r["rank"], r["id"], r["text"], r["source"]) for r in got] == [
        (r["rank"], r["id"], r["text"], r["source"]) for r in want
    ]
    for a, b in zip(got, want, strict=True):
        assert abs(a["score"] - b["score"]) <= atol, (a, b)
