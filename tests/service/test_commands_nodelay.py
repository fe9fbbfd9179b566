"""`serve --workers N`: the shared listening socket hands TCP_NODELAY to every connection."""

from __future__ import annotations

import socket

import uvicorn

from service.commands import bind_nodelay


def test_workers_listener_gives_accepted_connections_tcp_nodelay():
    config = uvicorn.Config("service.commands:worker_app", factory=True, workers=2, host="127.0.0.1", port=0)
    # What uvicorn binds on its own (proto 0): asyncio would leave Nagle on for its connections.
    plain = config.bind_socket()
    assert plain.proto == 0
    plain.close()

    listener = bind_nodelay(config)
    try:
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2], timeout=5):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        listener.close()
