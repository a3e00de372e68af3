"""A real HTTP server that records what is POSTed to it and answers with scripted statuses
(for webhook tests)."""

from __future__ import annotations

import threading
import typing as tp
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class HttpSink:
    """Serves on 127.0.0.1:<free port> in a thread; ``statuses`` are answered in order, then
    ``default``. ``received`` holds every request, answered or not."""

    def __init__(self, statuses: tp.Iterable[int] = (), default: int = 200) -> None:
        self.statuses = deque(statuses)
        self.default = default
        self.received: list[Received] = []
        self.arrived = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with sink.arrived:
                    status = sink.statuses.popleft() if sink.statuses else sink.default
                    sink.received.append(Received(self.path, dict(self.headers.items()), body))
                    sink.arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: tp.Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"{len(self.received)} requests arrived, expected {count}")
            return list(self.received)

    def __enter__(self) -> HttpSink:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
