"""A TCP proxy in front of the API that loses answers: for its first ``drops`` connections it
passes the request through, reads the API's whole answer, keeps it, and closes the client's
connection without sending a byte of it — what a client sees when a load balancer or the
network drops a response. Later connections are forwarded both ways."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress

from stack.services import free_port

BLOCK = 64 * 1024


class DroppingProxy:
    def __init__(self, upstream_port: int, *, drops: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.drops = drops
        self.dropped: list[bytes] = []  # the answers the client never saw
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop listening and end every connection."""
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        _close(*sockets)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                drop = len(self.dropped) < self.drops
                if drop:
                    self.dropped.append(b"")
                index = len(self.dropped) - 1
            threading.Thread(target=self._serve, args=(conn, drop, index), daemon=True).start()

    def _serve(self, client: socket.socket, drop: bool, index: int) -> None:
        upstream = socket.create_connection(self.upstream)
        with self._lock:
            self._sockets += [client, upstream]
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        if drop:
            self.dropped[index] = _read_answer(upstream)
        else:
            _pump(upstream, client)
        _close(client, upstream)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(BLOCK):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _read_answer(upstream: socket.socket) -> bytes:
    """One whole HTTP answer (headers and a Content-Length body)."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += _received(upstream)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += _received(upstream)
    return head + b"\r\n\r\n" + body


def _received(upstream: socket.socket) -> bytes:
    data = upstream.recv(BLOCK)
    if not data:
        raise ConnectionError("the API closed the connection before its answer was complete")
    return data
