"""Shared fixtures and helpers: a real MariaDB database per test, the in-tests Cloud Tasks
server, a virtual clock both the job and that server read, and the job run either
in-process (`run_main`, the fast default) or as a subprocess (`run_job`, where the
process itself is under test: exit codes, signals, SIGKILL, .env, JSON logs)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pymysql
import pytest
from hypothesis import settings

import main
from tests.fake_cloud_tasks import FakeCloudTasks
from tests.localdb import local_server, schema_statements

# In CI the property tests use a fixed seed, so a run can be reproduced exactly;
# locally they explore new examples every time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = (ROOT / "schema.sql").read_text()
PROJECT = "test-project"
QUEUE_PATH = f"projects/{PROJECT}/locations/asia-northeast1/queues/anpi-call-queue"
CALL_URL = "http://127.0.0.1:9/call"
JST = dt.timezone(dt.timedelta(hours=9))
UTC = dt.UTC


def at(hour: int, minute: int = 0, second: int = 0, day: int = 30) -> dt.datetime:
    """An instant on 2026-11-`day` in JST (the 30th is a Monday)."""
    return dt.datetime(2026, 11, day, hour, minute, second, tzinfo=JST)


def tid(user_id: int, when: dt.datetime, alternative: int = 0) -> str:
    """The job's task id of a call."""
    return main.task_id(user_id, when.astimezone(UTC), alternative)


class VirtualClock:
    """A settable clock: the job reads it as its `clock`, the in-tests server as seconds."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def seconds(self) -> float:
        return self.now.timestamp()

    def advance(self, **delta: float) -> dt.datetime:
        self.now += dt.timedelta(**delta)
        return self.now


def _database_server() -> dict[str, Any]:
    """TEST_DB_* if set; else 127.0.0.1:3306 as root if it answers; else a private
    mariadbd started for this session (tests/localdb.py), the same rule as make demo.
    Without TLS, as the job connects to a loopback address: PyMySQL's default (TLS if
    the server offers it) loads the CA bundle for each connection, 50 ms here."""
    if os.environ.get("TEST_DB_HOST"):
        server = {
            "host": os.environ["TEST_DB_HOST"],
            "port": int(os.environ.get("TEST_DB_PORT", "3306")),
            "user": os.environ.get("TEST_DB_USER", "root"),
            "password": os.environ.get("TEST_DB_PASSWORD", ""),
        }
    else:
        host, port, _private = local_server()  # a private server stops at exit
        server = {"host": host, "port": port, "user": "root", "password": ""}
    return {**server, "ssl_disabled": True}


DB_SETTINGS = _database_server()

# Keeps google-auth from probing the GCE metadata server or reading real credentials:
# without credentials on disk it would otherwise ask 169.254.169.254.
OFFLINE_ENV = {
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:1",
    "GCE_METADATA_IP": "127.0.0.1:1",
}


@dataclasses.dataclass
class Database:
    """One throwaway database on the real server, with helpers to fill it."""

    name: str

    def connect(self) -> pymysql.connections.Connection:
        return pymysql.connect(
            **DB_SETTINGS, database=self.name, charset="utf8mb4", autocommit=True
        )

    def execute(self, sql: str, args: Any = None) -> None:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(sql, args)

    def insert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert users; each dict may leave columns out (schema defaults apply). Rows
        with the same columns go in one executemany."""
        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        for row in rows:
            row = {"phone_number": "+819012345678", **row}
            groups.setdefault(tuple(row), []).append(list(row.values()))
        with self.connect() as conn, conn.cursor() as cur:
            for cols, values in groups.items():
                marks = ", ".join(["%s"] * len(cols))
                sql = f"INSERT INTO users ({', '.join(cols)}) VALUES ({marks})"
                cur.executemany(sql, values)

    def env(self) -> dict[str, str]:
        return {
            "DB_HOST": DB_SETTINGS["host"],
            "DB_PORT": str(DB_SETTINGS["port"]),
            "DB_USER": DB_SETTINGS["user"],
            "DB_PASSWORD": DB_SETTINGS["password"],
            "DB_NAME": self.name,
        }


def _admin() -> pymysql.connections.Connection:
    try:
        return pymysql.connect(**DB_SETTINGS, autocommit=True, connect_timeout=5)
    except pymysql.err.OperationalError as exc:
        # Never a skip: without the database the suite proves nothing.
        pytest.fail(f"MariaDB at {DB_SETTINGS['host']}:{DB_SETTINGS['port']} unreachable: {exc}")


def create_database(schema: str = SCHEMA) -> Database:
    name = f"anpi_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    db = Database(name)
    with db.connect() as conn, conn.cursor() as cur:
        for statement in schema_statements(schema):
            cur.execute(statement)
    return db


def drop_database(db: Database) -> None:
    with _admin() as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {db.name}")


@pytest.fixture
def db() -> Iterator[Database]:
    database = create_database()
    try:
        yield database
    finally:
        drop_database(database)


@pytest.fixture
def tasks_server() -> Iterator[FakeCloudTasks]:
    server = FakeCloudTasks().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> VirtualClock:
    """The job's clock (`--now`): 08:00 JST on Monday 2026-11-30, unless a file says otherwise."""
    return VirtualClock(at(8))


@pytest.fixture
def dispatching(clock: VirtualClock) -> Iterator[FakeCloudTasks]:
    """The in-tests Cloud Tasks server, running each task when `clock` reaches its time."""
    server = FakeCloudTasks(clock=clock.seconds, dispatch=True).start()
    try:
        yield server
    finally:
        server.stop()


def insert_record(
    db: Database, user_id: int, when: dt.datetime, alternative: int, state: str
) -> None:
    """A row of scheduled_calls, as an earlier run would have left it."""
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO scheduled_calls (call_at, user_id, alternative, task_id, state)"
            " VALUES (%s, %s, %s, %s, %s)",
            (
                when.astimezone(dt.UTC).replace(tzinfo=None),
                user_id,
                alternative,
                tid(user_id, when, alternative),
                state,
            ),
        )


@dataclasses.dataclass
class JobResult:
    code: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads(self.stdout.strip().splitlines()[-1])

    @property
    def plan(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.strip().splitlines()[:-1]]


def job_env(
    db: Database | None = None, server: FakeCloudTasks | None = None, **extra: str
) -> dict[str, str]:
    """A clean environment for the job: nothing inherited but PATH."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent", **OFFLINE_ENV}
    if db is not None:
        env.update(db.env())
    if server is not None:
        env.update(
            GOOGLE_CLOUD_PROJECT=PROJECT,
            ANPI_CALL_URL=CALL_URL,
            CLOUD_TASKS_EMULATOR_HOST=server.address,
        )
    env.update(extra)
    return env


def run_job(
    args: Sequence[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> JobResult:
    """Run `python main.py ARGS` as the scheduler would, in `cwd` (default: a temp dir)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        env=env,
        cwd=cwd or ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return JobResult(proc.returncode, proc.stdout, proc.stderr)


def run_main(
    args: Sequence[str],
    env: dict[str, str],
    clock: VirtualClock | None = None,
    tasks_client: Any = None,
) -> JobResult:
    """Run the job in this process through `main.main`, on `clock` when given."""
    out, err = io.StringIO(), io.StringIO()
    code = main.main(
        list(args), env=env, clock=clock, tasks_client=tasks_client, stdout=out, stderr=err
    )
    return JobResult(code, out.getvalue(), err.getvalue())


def run_together(*jobs: tuple[Sequence[str], dict[str, str]]) -> list[JobResult]:
    """Run jobs in-process at the same time, each in its own thread (as overlapping
    executions or parallel shards run); their results in order. Their logs interleave."""
    results: list[JobResult | None] = [None] * len(jobs)

    def one(i: int) -> None:
        results[i] = run_main(*jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert all(r is not None for r in results), "a job did not finish"
    return [r for r in results if r is not None]


def run_at(when: dt.datetime | str, env: dict[str, str], *args: str) -> JobResult:
    """The job in-process as if it were `when`: `--now` for text (without an offset it
    is DEFAULT_TIMEZONE's wall clock), else a virtual clock stopped at `when`."""
    if isinstance(when, str):
        return run_main(["--now", when, *args], env)
    return run_main(args, env, VirtualClock(when))


UNKNOWN_THREAD = 1094  # ER_NO_SUCH_THREAD


def kill_connections(db: Database) -> int:
    """KILL every connection to `db` but this helper's own: a network blip or a Cloud SQL
    failover as the job sees it. Returns how many were killed."""
    with _admin() as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID != CONNECTION_ID()",
            (db.name,),
        )
        killed = 0
        for (connection_id,) in cur.fetchall():
            try:
                cur.execute(f"KILL CONNECTION {int(connection_id)}")
                killed += 1
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != UNKNOWN_THREAD:  # else it closed meanwhile by itself
                    raise
    return killed


def start_job(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `python main.py ARGS` without waiting (signal and concurrency tests)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        env=env,
        cwd=ROOT / "tests",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_job(proc: subprocess.Popen[str], timeout: float = 120) -> JobResult:
    stdout, stderr = proc.communicate(timeout=timeout)
    return JobResult(proc.returncode, stdout, stderr)
