"""A TCP forwarder on 127.0.0.1 for database fault tests.

It can start listening late (a database that comes up after the job started), accept
at once but reach the database only `answer_after` seconds after the proxy started (a
Cloud SQL failover: the proxy accepts, then the server answers late; `on_answer` lets a
test move a virtual clock by that much instead), and hold the server's bytes after a
budget (so a test can kill the job's connection while the job is part-way through
reading rows).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable


class TcpProxy:
    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen_after: float = 0.0,
        answer_after: float = 0.0,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        self.target = target
        self.answer_at = time.monotonic() + answer_after
        self.on_answer = on_answer  # runs before each connection reaches the server
        self.budget: int | None = None  # server->client bytes forwarded before holding
        self.holding = threading.Event()  # set once the budget is spent
        self.release = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._serve, args=(listen_after,), daemon=True).start()

    def _serve(self, listen_after: float) -> None:
        time.sleep(listen_after)
        self._listener.listen()
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        time.sleep(max(0.0, self.answer_at - time.monotonic()))
        if self.on_answer is not None:
            self.on_answer()
        server = socket.socket()
        # A small window keeps the server's rows on its side while the proxy holds.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        server.connect(self.target)
        threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        sent = 0
        try:
            while data := source.recv(4096):
                if from_server and self.budget is not None and sent + len(data) > self.budget:
                    self.holding.set()
                    self.release.wait(timeout=60)
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
