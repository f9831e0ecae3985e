"""What one webhook attempt (keeper/webhook_delivery.py ``post``) promises in docs/security.md,
against local sockets: it connects to the address that was checked while the Host header and the TLS
name stay the URL's (so a name that re-resolves elsewhere later, DNS rebinding, changes
nothing), it gives up after WEBHOOK_TIMEOUT_S to connect and to read, and it reads at most
64 KiB of the answer."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError, SSLError

from keeper.webhook_delivery import MAX_RESPONSE_BYTES, post
from shared.settings import Settings
from shared.webhooks import Target

TIMEOUT_S = 0.5
SETTINGS = Settings(webhook_timeout_s=TIMEOUT_S)
NAME = "hooks.example.test"


@contextmanager
def listener(answer: Callable[[socket.socket], None], *, backlog: int = 8) -> Iterator[int]:
    """A loopback port whose first connection ``answer`` handles in a thread."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(backlog)

    def serve() -> None:
        try:
            connection, _ = server.accept()
        except OSError:
            return
        with connection:
            answer(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(timeout=5)


def target(port: int, scheme: str = "http") -> Target:
    """``NAME`` checked and resolved to the loopback address (the listener)."""
    return Target(scheme=scheme, host=NAME, port=port, path="/hook?x=1", address="127.0.0.1")


def read_request(connection: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_it_connects_to_the_checked_address_with_the_url_s_host_header():
    seen = {}

    def answer(connection: socket.socket) -> None:
        seen["request"] = read_request(connection)
        connection.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    with listener(answer) as port:
        status, _ = post(target(port), b"{}", {"Content-Type": "application/json"}, SETTINGS)
    assert status == 204
    head = seen["request"].decode().split("\r\n")
    assert head[0] == "POST /hook?x=1 HTTP/1.1"
    hosts = [line for line in head if line.lower().startswith("host:")]
    assert hosts == [f"Host: {NAME}:{port}"]


def test_tls_names_the_url_s_host_not_the_address():
    """The ClientHello's server name (SNI) is the URL's host, sent to the checked address;
    the handshake then fails (no server here), and the certificate would be checked for the
    name too (``assert_hostname``)."""
    seen = {}

    def answer(connection: socket.socket) -> None:
        connection.settimeout(5)
        seen["hello"] = connection.recv(65536)

    with listener(answer) as port, pytest.raises(SSLError):
        post(target(port, "https"), b"{}", {}, SETTINGS)
    assert NAME.encode() in seen["hello"]
    assert b"127.0.0.1" not in seen["hello"]


def test_at_most_64_kib_of_the_answer_is_read():
    def answer(connection: socket.socket) -> None:
        read_request(connection)
        body = b"x" * (4 * MAX_RESPONSE_BYTES)
        head = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body)
        # The client stops reading and closes: the rest of the body may not get through.
        try:
            connection.sendall(head + body)
        except OSError:
            return

    with listener(answer) as port:
        status, answer_bytes = post(target(port), b"{}", {}, SETTINGS)
    assert status == 500
    assert len(answer_bytes) == MAX_RESPONSE_BYTES == 64 * 1024


def test_a_receiver_that_never_answers_is_given_up_after_the_read_timeout():
    release = threading.Event()

    def answer(connection: socket.socket) -> None:
        read_request(connection)
        release.wait(10)

    with listener(answer) as port:
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            post(target(port), b"{}", {}, SETTINGS)
        elapsed = time.monotonic() - started
        release.set()
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2


def test_an_address_that_never_accepts_is_given_up_after_the_connect_timeout():
    # A listen backlog of 0 is full after one pending connection: Linux then drops the SYNs
    # of the next, whose connect hangs, as with a host that drops packets.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectTimeoutError):
            post(target(port), b"{}", {}, SETTINGS)
        elapsed = time.monotonic() - started
    finally:
        filler.close()
        server.close()
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_receiver_dripping_its_answer_is_cut_at_the_call_s_deadline(where):
    """A byte every 0.3 s keeps every read under the 0.5 s timeout: only the call's total
    deadline ends it (before, one such receiver held a deliverer as long as it liked)."""
    finished = threading.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nX-Padding: " + b"p" * 40 + b"\r\n\r\n"

    def answer(connection: socket.socket) -> None:
        read_request(connection)
        if where == "body":
            connection.sendall(head)
        try:
            for byte in head if where == "headers" else b"b" * 40:
                connection.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:
            return  # the client shut the call
        finished.set()

    with listener(answer) as port, pytest.raises(TimeoutError, match=r"deadline of 1\.5s"):
        post(target(port), b"{}", {}, SETTINGS, deadline_s=3 * TIMEOUT_S)
    assert not finished.is_set(), "the whole answer was read: no deadline"
