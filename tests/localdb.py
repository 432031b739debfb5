"""Find a MariaDB/MySQL for the demo and the tests, or start a private one.

The rule, shared by `make demo` and `make test`: a server at 127.0.0.1:3306 that lets
root in without a password is used if it answers; otherwise a throwaway `mariadbd` is
started from the machine's binaries, as the current user, in a temporary data
directory on a free port, and removed again when the process ends.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pymysql

from tests.processes import stop_process

APT_FIX = "sudo apt-get install -y mariadb-server"
SEARCH_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin:/usr/local/mysql/bin"


class NoDatabase(RuntimeError):
    """No server answers and none can be started; the message says how to fix it."""


def answers(host: str, port: int, user: str = "root", password: str = "") -> bool:
    """Whether a server at host:port lets `user` in."""
    try:
        pymysql.connect(
            host=host, port=port, user=user, password=password, connect_timeout=3
        ).close()
        return True
    except pymysql.err.MySQLError:
        return False


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name, path=SEARCH_PATH)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateMariaDB:
    """A throwaway mariadbd on 127.0.0.1:<free port>, root without a password."""

    def __init__(self) -> None:
        server = _which("mariadbd", "mysqld")
        install = _which("mariadb-install-db", "mysql_install_db")
        if server is None or install is None:
            raise NoDatabase(
                "no MariaDB/MySQL answers at 127.0.0.1:3306 and no mariadbd to start one."
                f" Install it with:\n    {APT_FIX}"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="anpi-mariadb-"))
        self.port = _free_port()
        # mariadbd refuses to run as root unless told to.
        as_user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [install, "--no-defaults", f"--datadir={self.dir / 'data'}", "--skip-test-db",
             "--auth-root-authentication-method=normal", *as_user],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        self._proc = subprocess.Popen(
            [server, "--no-defaults", f"--datadir={self.dir / 'data'}",
             f"--socket={self.dir / 'mysqld.sock'}", f"--pid-file={self.dir / 'mariadbd.pid'}",
             f"--log-error={self.dir / 'error.log'}", "--bind-address=127.0.0.1",
             f"--port={self.port}", *as_user],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        atexit.register(self.stop)
        deadline = time.monotonic() + 60
        while not answers("127.0.0.1", self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "error.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise NoDatabase(f"the private mariadbd did not start:\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        """End the server and remove its data directory (safe to call twice)."""
        stop_process(self._proc, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def schema_statements(schema: str) -> list[str]:
    """The SQL statements of schema.sql (comment lines dropped: they may hold `;`)."""
    code = "\n".join(line for line in schema.splitlines() if not line.lstrip().startswith("--"))
    return [s for s in code.split(";") if s.strip()]


def local_server() -> tuple[str, int, PrivateMariaDB | None]:
    """host, port and (when one had to be started) the private server to stop later."""
    if answers("127.0.0.1", 3306):
        return "127.0.0.1", 3306, None
    private = PrivateMariaDB()
    return "127.0.0.1", private.port, private
