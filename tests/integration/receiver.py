"""A real HTTP server for webhook tests, on a free loopback port, that records every request
it gets. What it answers depends on the path's first segment:

    /ok/...          200
    /fail-twice/...  500 the first two times for that path, then 200
    /fail-once-each/...  500 the first time a body's ``id`` comes to that path, then 200
    /redirect/...    302 to /ok/... (which a deliverer must not follow)
    /slow/...        200 once ``release()`` is called; until then the request hangs
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when its body had arrived

    @property
    def body_id(self) -> object:
        try:
            return json.loads(self.body).get("id")
        except ValueError:
            return None


class Receiver:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.in_flight = 0  # requests being answered now
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def calls_to(self, path: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.path == path]

    def wait_for(self, path: str, count: int, *, timeout_s: float = 120) -> list[Call]:
        deadline = time.monotonic() + timeout_s
        while len(calls := self.calls_to(path)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {len(calls)} calls, not {count}, in {timeout_s}s")
            time.sleep(0.05)
        return calls

    def answer(self, call: Call, seen: int) -> tuple[int, dict[str, str]]:
        """Status and headers for ``call``, the ``seen``-th (from 1) to its path."""
        path = call.path
        kind = path.split("/")[1]
        if kind == "fail-twice" and seen <= 2:
            return 500, {}
        if kind == "fail-once-each" and self._first_with_id(call):
            return 500, {}
        if kind == "redirect":
            return 302, {"Location": path.replace("/redirect/", "/ok/", 1)}
        if kind == "slow":
            self._released.wait()
        return 200, {}

    def _first_with_id(self, call: Call) -> bool:
        return [c.body_id for c in self.calls_to(call.path)].count(call.body_id) == 1

    def record(self, call: Call) -> int:
        with self._lock:
            self.calls.append(call)
            return sum(1 for c in self.calls if c.path == call.path)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            call = Call(self.path, dict(self.headers), body)
            seen = receiver.record(call)
            with receiver._lock:
                receiver.in_flight += 1
            try:
                status, headers = receiver.answer(call, seen)
            finally:
                with receiver._lock:
                    receiver.in_flight -= 1
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test asserts on ``calls``."""

    return Handler
