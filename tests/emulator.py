"""Run the third-party `gcloud-tasks-emulator` as a separate process.

It pins protobuf<5, which cannot share an environment with google-cloud-tasks 2.26, so
it lives in its own virtualenv (`.venv-emulator`, made by `make`/.ci/run). It really
POSTs each HTTP task to its URL at schedule_time, which the in-tests server does not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from tests.processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = Path(
    os.environ.get("TASKS_EMULATOR_BIN", ROOT / ".venv-emulator" / "bin" / "gcloud-tasks-emulator")
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Emulator:
    """One emulator process with one fresh queue; stop() ends it."""

    def __init__(self, queue_path: str, max_retries: int = 3) -> None:
        if not EMULATOR.exists():
            raise RuntimeError(
                f"{EMULATOR} is missing: run `make test` (or .ci/run), which installs it"
            )
        self.port = free_port()
        self.queue_path = queue_path
        # -q: its default logging writes megabytes a minute; -r: bounded retries of a
        # failed dispatch (it retries every 0.1 s forever otherwise).
        self._proc = subprocess.Popen(
            [str(EMULATOR), "start", "-p", str(self.port), "-q", "-d", queue_path,
             "-r", str(max_retries)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        self._wait_ready(timeout=30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"gcloud-tasks-emulator exited: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gcloud-tasks-emulator did not listen on {self.address}")

    def stop(self) -> None:
        stop_process(self._proc, timeout=5)
        if self._proc.stderr:
            self._proc.stderr.close()
