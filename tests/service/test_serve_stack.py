"""How `serve` runs uvicorn: its own listener (TCP_NODELAY, bound before anything is
announced, a taken port a one-line error), httptools and uvloop."""

from __future__ import annotations

import socket

import uvicorn

from service.cli import main as influence_main
from service.commands import listen


def test_the_listener_gives_accepted_connections_tcp_nodelay():
    config = uvicorn.Config(
        "service.commands:worker_app", factory=True, workers=2, host="127.0.0.1", port=0
    )
    # What uvicorn binds on its own (proto 0): asyncio would leave Nagle on for its connections.
    plain = config.bind_socket()
    assert plain.proto == 0
    plain.close()

    listener = listen("127.0.0.1", 0)
    try:
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2], timeout=5):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        listener.close()


def test_serve_runs_the_c_http_parser_and_uvloop():
    """The pinned httptools and uvloop are what uvicorn loads for ``serve`` (not h11 and the
    stock loop, ~1.9 ms of GIL per request), and uvicorn's duplicate access line is off."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from service.commands import UVICORN_OPTIONS

    async def app(scope, receive, send):  # pragma: no cover - never called
        raise AssertionError

    config = uvicorn.Config(app, **UVICORN_OPTIONS)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    assert config.access_log is False
    factory = config.get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_a_taken_port_is_one_line_and_exit_2_before_any_announcement(tiny_index, capsys):
    """Before: "serving on http://127.0.0.1:8000" was printed, then uvicorn died (exit 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = influence_main(["serve", "--index", str(tiny_index), "--port", str(port)])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip() == (
        f"influence: error [port_in_use]: 127.0.0.1:{port} is already in use: pick another port with "
        "--port N (make demo PORT=N)"
    )
    assert "serving" not in captured.out + captured.err
