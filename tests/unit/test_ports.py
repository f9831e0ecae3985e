"""The free-port check against the kernel's real socket states: a port whose previous server
closed its connections first (TIME_WAIT) is free for a server that binds with SO_REUSEADDR, as
gunicorn, redis-server and SeaweedFS do; a port something listens on is not."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from stack.services import free_port, port_is_free, port_is_listening


def _listener(port: int) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    return server


def _bind(port: int, *, reuse: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


@pytest.fixture
def port_in_time_wait() -> Iterator[int]:
    """A port whose server is gone, with the server's side of a connection in TIME_WAIT: what
    a keep-alive client (a browser, requests.Session) leaves behind when the server stops."""
    port = free_port()
    server = _listener(port)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = server.accept()
    accepted.close()  # the server closes first: its side goes to TIME_WAIT once the client...
    assert client.recv(1) == b""
    client.close()  # ...closes too
    server.close()
    yield port


def test_a_port_left_in_time_wait_is_free_for_a_server_that_reuses_addresses(port_in_time_wait):
    port = port_in_time_wait
    assert not port_is_listening(port)
    # The situation reproduced: a plain bind (the old check) is refused for a minute...
    with pytest.raises(OSError):
        _bind(port, reuse=False)
    # ...while the servers we start bind with SO_REUSEADDR, which works, and so says the check.
    assert port_is_free(port)
    _bind(port, reuse=True)
    server = _listener(port)
    server.close()


def test_a_port_something_listens_on_is_not_free():
    port = free_port()
    server = _listener(port)
    try:
        assert port_is_listening(port)
        assert not port_is_free(port)
    finally:
        server.close()
    assert port_is_free(port)


def test_a_port_bound_without_address_reuse_is_not_free():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        assert not port_is_free(port)
