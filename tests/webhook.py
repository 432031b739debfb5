"""A local stand-in for the call webhook: records every POST Cloud Tasks delivers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple


class Delivery(NamedTuple):
    """One POST as it arrived: wall-clock arrival time, headers and JSON body."""

    arrived: float
    headers: dict[str, str]
    body: dict[str, Any]


class WebhookReceiver:
    """HTTP server on 127.0.0.1 that answers 200 and keeps each delivery."""

    def __init__(
        self, status: int = 200, on_delivery: Callable[[Delivery], None] | None = None
    ) -> None:
        self.deliveries: list[Delivery] = []
        self.status = status
        self._on_delivery = on_delivery
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                delivery = Delivery(time.time(), dict(self.headers), body)
                self.send_response(receiver.status)
                self.end_headers()
                if receiver._on_delivery is not None:
                    receiver._on_delivery(delivery)
                with receiver._cond:
                    receiver.deliveries.append(delivery)
                    receiver._cond.notify_all()

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/call"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float) -> list[Delivery]:
        """Block until `count` deliveries arrived or `timeout` passed; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.deliveries) < count and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return list(self.deliveries)
