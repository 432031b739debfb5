"""Faults and bad input: nothing lost, nothing called twice, a clear word for each failure.

Each test drives the real job (in-process; as a subprocess where the process itself is
under test: signals, credentials) against the real MariaDB and the in-tests Cloud Tasks
server with fault knobs, then checks what the queue holds.
"""

from __future__ import annotations

import collections
import datetime as dt
import signal
import tempfile
import time

import grpc
import pymysql
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import main
from tests.conftest import (
    DB_SETTINGS,
    SCHEMA,
    Database,
    create_database,
    drop_database,
    finish_job,
    job_env,
    run_at,
    run_job,
    run_together,
    start_job,
)
from tests.fake_cloud_tasks import FakeCloudTasks
from tests.tcp_proxy import TcpProxy

NOW = "2026-11-30T09:00:00+09:00"  # Monday
UTC = dt.UTC


def daily_users(db: Database, count: int, at: str = "09:30") -> None:
    db.insert(
        [
            {"id": i, "call_weekdays": "daily", "call_time": at, "phone_number": f"+81901{i:07d}"}
            for i in range(1, count + 1)
        ]
    )


def assert_each_call_once(server: FakeCloudTasks, count: int) -> None:
    """The queue holds `count` tasks and no name was ever created twice."""
    names = server.created_names()
    assert len(names) == len(set(names)) == count
    assert len(server.tasks) == count


# -- Cloud Tasks errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
    ],
)
def test_transient_errors_are_retried(
    db: Database, tasks_server: FakeCloudTasks, code: grpc.StatusCode
) -> None:
    daily_users(db, 5)
    tasks_server.faults.fail_first, tasks_server.faults.fail_code = 4, code
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    assert result.summary["tasks_created"] == 5
    assert_each_call_once(tasks_server, 5)


def test_random_transient_failures_leave_each_call_once(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    daily_users(db, 60)
    tasks_server.faults.fail_fraction = 0.3
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    assert result.summary["tasks_created"] == 60
    assert_each_call_once(tasks_server, 60)


def test_timeout_after_the_server_stored_the_task_ends_as_one_task(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    daily_users(db, 6)
    tasks_server.faults.timeout_after_store = 3
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    # The retry met ALREADY_EXISTS: done, counted as existing, not created twice.
    assert (result.summary["tasks_created"], result.summary["tasks_existing"]) == (3, 3)
    assert_each_call_once(tasks_server, 6)


def test_retries_stop_at_the_deadline(db: Database, tasks_server: FakeCloudTasks) -> None:
    daily_users(db, 3)
    tasks_server.faults.fail_first = 10**6
    started = time.monotonic()
    result = run_at(NOW, job_env(db, tasks_server, ENQUEUE_DEADLINE_SECONDS="2"))
    assert time.monotonic() - started < 30
    assert result.code == 1
    assert result.summary["tasks_failed"] == 3
    assert "could not create task within 2s" in result.stderr


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    ],
)
def test_permanent_errors_are_not_retried_and_others_go_on(
    db: Database, tasks_server: FakeCloudTasks, code: grpc.StatusCode
) -> None:
    daily_users(db, 4)
    tasks_server.faults.permanent = {3: code}
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 1
    assert result.summary["tasks_failed"] == 1
    assert result.summary["tasks_created"] == 3
    attempts = [r for r in tasks_server.rpcs if "-anpi-3-" in r.name]
    assert [r.code for r in attempts] == [code.name]  # tried once
    assert "user_id=3" in result.stderr


def test_missing_queue_stops_with_one_message(db: Database, tasks_server: FakeCloudTasks) -> None:
    daily_users(db, 200)
    tasks_server.faults.missing_queue = True
    result = run_at(NOW, job_env(db, tasks_server, ENQUEUE_CONCURRENCY="4"))
    assert result.code == 1
    [message] = [line for line in result.stderr.splitlines() if "CRITICAL" in line]
    assert (
        "queue projects/test-project/locations/asia-northeast1/queues/anpi-call-queue not found"
        in message
    )
    assert "anpi-call-queue" in result.summary["error"]
    assert result.summary["tasks_not_attempted"] == 200
    assert len(tasks_server.rpcs) <= 8  # stopped at the first, not one per user


def test_missing_credentials_stop_with_one_message(db: Database) -> None:
    # A real run against the real API plans for the real clock (no --now): calls in 30 min.
    soon = dt.datetime.now(dt.timezone(dt.timedelta(hours=9))) + dt.timedelta(minutes=30)
    daily_users(db, 20, at=soon.strftime("%H:%M:%S"))
    with tempfile.TemporaryDirectory() as home:
        # No emulator: the real client asks google-auth, which finds nothing and, with
        # the offline settings from conftest, fails locally without probing the network.
        env = job_env(
            db,
            GOOGLE_CLOUD_PROJECT="p",
            ANPI_CALL_URL="https://example.invalid/call",
            HOME=home,
            CLOUDSDK_CONFIG=home,
        )
        refused = run_job(["--now", NOW], env)
        result = run_job([], env)
    assert refused.code == 2 and "--now needs --dry-run" in refused.stderr
    assert result.code == 1
    [message] = [line for line in result.stderr.splitlines() if "CRITICAL" in line]
    assert "no Google credentials" in message
    assert "credentials" in result.summary["error"]
    assert result.summary["tasks_not_attempted"] == 20


def test_a_dry_run_without_credentials_still_prints_the_plan(db: Database) -> None:
    daily_users(db, 5, at="09:30:00")
    with tempfile.TemporaryDirectory() as home:
        env = job_env(db, GOOGLE_CLOUD_PROJECT="p", HOME=home, CLOUDSDK_CONFIG=home)
        result = run_at(NOW, env, "--dry-run")
    assert result.code == 0, result.stderr
    assert result.summary["calls_planned"] == 5 and result.summary["error"] is None
    assert len([ln for ln in result.stdout.splitlines() if '"task_id"' in ln]) == 5
    [warning] = [ln for ln in result.stderr.splitlines() if "WARNING" in ln]
    assert "queue not read (no Google credentials)" in warning


# -- stopped mid-run ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_new_work_and_a_rerun_completes(
    db: Database, tasks_server: FakeCloudTasks, signum: int
) -> None:
    daily_users(db, 40)
    tasks_server.faults.latency = 0.3
    env = job_env(db, tasks_server, ENQUEUE_CONCURRENCY="2")
    proc = start_job(["--now", NOW], env)
    deadline = time.monotonic() + 30
    while len(tasks_server.rpcs) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    signalled = time.monotonic()
    first = finish_job(proc)
    assert time.monotonic() - signalled < 5  # in-flight creates finish, nothing new starts
    assert first.code == 1
    assert first.summary["interrupted"] is True
    assert 0 < first.summary["tasks_created"] < 40
    # What was planned (one record batch at most) was created or counted as not attempted.
    planned = first.summary["calls_planned"]
    assert first.summary["tasks_created"] + first.summary["tasks_not_attempted"] == planned <= 40
    assert first.summary["tasks_failed"] == 0
    assert "finishing in-flight tasks" in first.stderr

    tasks_server.faults.latency = 0
    second = run_job(["--now", NOW], env)
    assert second.code == 0, second.stderr
    assert second.summary["tasks_existing"] == first.summary["tasks_created"]
    assert_each_call_once(tasks_server, 40)


def test_two_concurrent_runs_leave_each_call_once(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    daily_users(db, 120)
    tasks_server.faults.latency = 0.01
    env = job_env(db, tasks_server, ENQUEUE_CONCURRENCY="4")
    results = run_together((["--now", NOW], env), (["--now", NOW], env))
    assert [r.code for r in results] == [0, 0]
    assert sum(r.summary["tasks_created"] for r in results) == 120
    assert sum(r.summary["tasks_existing"] for r in results) == 120
    assert_each_call_once(tasks_server, 120)


# -- database faults ---------------------------------------------------------------------


def test_database_down_at_start_is_retried_until_it_answers(db: Database) -> None:
    daily_users(db, 2)
    proxy = TcpProxy((DB_SETTINGS["host"], DB_SETTINGS["port"]), listen_after=2.0)
    try:
        env = job_env(db, DB_HOST="127.0.0.1", DB_PORT=str(proxy.port))
        result = run_at(NOW, env, "--dry-run")
    finally:
        proxy.close()
    assert result.code == 0, result.stderr
    assert result.summary["calls_planned"] == 2
    assert "database not reachable yet, retrying" in result.stderr


def test_database_unreachable_fails_in_bounded_time() -> None:
    started = time.monotonic()
    env = job_env(None, DB_HOST="127.0.0.1", DB_PORT="1", DB_RETRY_SECONDS="3")
    result = run_at(NOW, env, "--dry-run")
    assert time.monotonic() - started < 15
    assert result.code == 1
    # The stated bound: DB_RETRY_SECONDS plus one DB_CONNECT_TIMEOUT (10 s) attempt.
    assert "cannot connect to the database within 13s" in result.summary["error"]


def test_wrong_password_is_not_retried(db: Database) -> None:
    started = time.monotonic()
    env = job_env(db, DB_USER="anpi_nobody", DB_PASSWORD="wrong", DB_RETRY_SECONDS="30")
    result = run_at(NOW, env, "--dry-run")
    assert time.monotonic() - started < 10  # a permanent error: no 30 s of retries
    assert result.code == 1
    assert "Access denied" in result.summary["error"]
    assert "wrong" not in result.stdout + result.stderr.replace("wrong password", "")


def test_connection_killed_mid_read_exits_1_and_a_rerun_completes(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    # 80,000 rows due in the window's first quarter of an hour after now (09:00:01-09:14:59,
    # interleaved, so one query returns them all); every 200th asks for a call, the rest
    # (blank weekdays, padded so the result outgrows the kernel's socket buffers) for none.
    db.insert(
        [
            {
                "id": i,
                "call_weekdays": "daily" if i % 200 == 0 else " " * 64,
                "call_time": f"{9 + s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}",
            }
            for i in range(1, 80_001)
            for s in [1 + i % 899]  # 09:00:01-09:14:59: all ahead of now
        ]
    )
    proxy = TcpProxy((DB_SETTINGS["host"], DB_SETTINGS["port"]))
    proxy.budget = 150_000  # then hold the server's bytes: the job is part-way through
    env = job_env(db, tasks_server, DB_HOST="127.0.0.1", DB_PORT=str(proxy.port))
    try:
        proc = start_job(["--now", NOW], env)
        assert proxy.holding.wait(timeout=30)
        with pymysql.connect(**DB_SETTINGS, autocommit=True) as admin, admin.cursor() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST"
                " WHERE DB = %s AND COMMAND = 'Query' AND INFO LIKE 'SELECT id, phone_number%%'",
                (db.name,),
            )
            [(connection_id,)] = cur.fetchall()
            cur.execute(f"KILL CONNECTION {int(connection_id)}")
        proxy.release.set()
        first = finish_job(proc)
    finally:
        proxy.release.set()  # whatever happened, nothing stays held
        proxy.close()
        if proc.poll() is None:
            proc.kill()
    assert first.code == 1
    assert "lost the database while reading users" in first.stderr
    assert "lost the database" in first.summary["error"]
    # What was planned before the loss is on the queue; the rest is not.
    assert 0 < first.summary["tasks_created"] < 400
    assert "Exception ignored" not in first.stderr
    second = run_at(NOW, job_env(db, tasks_server))
    assert second.code == 0, second.stderr
    assert second.summary["tasks_existing"] == first.summary["tasks_created"]
    assert_each_call_once(tasks_server, 400)


# -- bad rows ----------------------------------------------------------------------------

BAD_ROWS = [
    {"call_weekdays": "mon-"},
    {"call_weekdays": "8"},
    {"call_weekdays": "月x"},
    {"call_weekdays": "'; DROP TABLE users; --"},
    {"call_weekdays": "🙂" * 16},
    {"call_weekdays": "x" * 64},
    {"call_time": "24:00:00"},
    {"call_time": "-01:00:00"},
    {"call_time": "838:59:59"},
    {"timezone": "Mars/Phobos"},
    {"timezone": "Robert'); DROP TABLE users;--"},
    {"timezone": "\u0000"},
    {"phone_number": "+81 90 1234 567"},
    {"phone_number": "+8190ABCD5678"},
    {"phone_number": ""},
    {"phone_number": "０９０１２３４"},
]


def test_bad_rows_are_counted_logged_once_and_never_stop_the_run(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    good = {"call_weekdays": "daily", "call_time": "09:30", "phone_number": "+819012345678"}
    rows = [{"id": 1, **good}] + [
        {"id": i, **good, **bad} for i, bad in enumerate(BAD_ROWS, start=2)
    ]
    db.insert(rows)
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    assert result.summary["rows_invalid"] == len(BAD_ROWS)
    assert result.summary["tasks_created"] == 1
    logged = collections.Counter(
        line.split("user_id=")[1].split()[0]
        for line in result.stderr.splitlines()
        if "invalid row" in line
    )
    assert logged == {str(i): 1 for i in range(2, len(BAD_ROWS) + 2)}
    assert "12345678" not in result.stderr
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM users")
        assert cur.fetchone() == (len(rows),)  # the SQL-looking text stayed text


def test_bytes_columns_are_decoded_or_reported() -> None:
    schema = SCHEMA.replace("call_weekdays VARCHAR(64) ", "call_weekdays VARBINARY(64) ")
    db = create_database(schema)
    try:
        db.insert(
            [
                {"id": 1, "call_weekdays": "月水金".encode(), "call_time": "09:30"},
                {"id": 2, "call_weekdays": b"\xff\xfe\x00", "call_time": "09:30"},
            ]
        )
        result = run_at(NOW, job_env(db), "--dry-run")
    finally:
        drop_database(db)
    assert result.code == 0, result.stderr
    assert [p["user_id"] for p in result.plan] == [1]
    assert result.summary["rows_invalid"] == 1
    assert "not valid UTF-8" in result.stderr


# -- the row parser and planner under arbitrary input --------------------------------------

any_value = st.one_of(
    st.none(),
    st.text(),
    st.text(alphabet="月火水木金土日曜毎平-〜~～, 、・/01234567890:monwedfriaysuthk"),
    st.binary(),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.timedeltas(min_value=dt.timedelta(hours=-900), max_value=dt.timedelta(hours=900)),
    st.times(),
)
zone_value = st.one_of(any_value, st.sampled_from(["Asia/Tokyo", "America/New_York", "", " "]))
phone_value = st.one_of(any_value, st.from_regex(r"\+[0-9]{8,15}", fullmatch=True))
instants = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 1, 1))


@settings(max_examples=1500, deadline=None)
@given(
    user_id=st.integers(-(2**63), 2**63 - 1),
    phone=phone_value,
    weekdays=any_value,
    call_time=any_value,
    zone=zone_value,
    now=instants,
)
def test_fuzz_parser_never_raises_and_plans_obey_the_rules(
    user_id: int, phone: object, weekdays: object, call_time: object, zone: object, now: dt.datetime
) -> None:
    row = main.UserRow(user_id, phone, weekdays, call_time, zone)
    tokyo = main.zoneinfo.ZoneInfo("Asia/Tokyo")
    try:
        setting = main.parse_row(row, tokyo)
    except main.InvalidRow as reason:
        assert str(reason)
        return
    if setting is None:
        return
    window = main.Window.around(
        now.replace(tzinfo=UTC), dt.timedelta(minutes=15), dt.timedelta(minutes=120)
    )
    calls = main.plan_calls(setting, window)
    local_dates = set()
    for call in calls:
        assert window.start <= call.instant < window.end
        local = call.instant.astimezone(setting.zone)
        assert local.weekday() in setting.weekdays
        assert local.time() == setting.call_time or local.time() > setting.call_time  # DST gap
        assert local.date() not in local_dates
        local_dates.add(local.date())
        assert main.TASK_ID_RE.fullmatch(call.task_id)
        assert call.user_id == user_id and call.phone_number == phone
    assert main.PHONE_RE.fullmatch(setting.phone_number)
