"""Exactly once, case by case: the scheduled_calls record against the cases where what
Cloud Tasks remembers cannot tell a task that ran from a task that was deleted, and the
part-way failures a review reproduced.

Each test runs the job in-process (`run_main`) against the real MariaDB and the in-tests
Cloud Tasks server, on a virtual clock that both read; with `dispatch=True` that server
also runs the tasks when the clock reaches their time.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import hashlib
import socket
import threading
import time

import grpc
import pymysql
import pytest

import main
from tests.conftest import (
    DB_SETTINGS,
    QUEUE_PATH,
    SCHEMA,
    Database,
    JobResult,
    VirtualClock,
    at,
    create_database,
    drop_database,
    insert_record,
    job_env,
    kill_connections,
    run_main,
    tid,
)
from tests.fake_cloud_tasks import FakeCloudTasks
from tests.tcp_proxy import TcpProxy

JST = dt.timezone(dt.timedelta(hours=9))
UTC = dt.UTC


@pytest.fixture
def queue(clock: VirtualClock) -> collections.abc.Iterator[FakeCloudTasks]:
    """The server on the virtual clock, running no task by itself."""
    server = FakeCloudTasks(clock=clock.seconds).start()
    try:
        yield server
    finally:
        server.stop()


def users_at(db: Database, when: str, ids: range) -> None:
    db.insert(
        [
            {"id": i, "call_weekdays": "daily", "call_time": when, "phone_number": f"+81901{i:07d}"}
            for i in ids
        ]
    )


def executions(server: FakeCloudTasks) -> collections.Counter[tuple[int, str]]:
    """How often each call (user, scheduled_at) was delivered."""
    return collections.Counter(
        (e.body["user_id"], e.body["scheduled_at"]) for e in server.executions
    )


def records(db: Database) -> list[tuple[int, dt.datetime, int, str, str]]:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT user_id, call_at, alternative, task_id, state FROM scheduled_calls"
            " ORDER BY user_id, call_at, alternative"
        )
        return [(u, t.replace(tzinfo=UTC), a, i, s) for u, t, a, i, s in cur.fetchall()]


def job(
    db: Database, server: FakeCloudTasks, clock: VirtualClock, *args: str, **env: str
) -> JobResult:
    return run_main(args, job_env(db, server, **env), clock)


# -- late calls and outages ----------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_a_late_call_survives_an_outage_after_k_creates_and_a_retry(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock, k: int
) -> None:
    """The 08:00 run never happened; the 09:10 run creates the 09:00 calls late, meets
    an outage after k creates and fails; Cloud Run's retry completes them."""
    users_at(db, "09:00", range(1, 7))
    clock.now = at(9, 10)
    dispatching.faults.outage_methods = frozenset({"CreateTask"})
    dispatching.faults.outage_after = k
    first = job(db, dispatching, clock, ENQUEUE_DEADLINE_SECONDS="1", ENQUEUE_CONCURRENCY="8")
    assert first.code == 1, first.stderr
    assert first.summary["tasks_created"] == k
    assert len(dispatching.executions) == k  # created late: each ran at once

    dispatching.faults.outage_methods = frozenset()
    clock.now = at(9, 11)
    retry = job(db, dispatching, clock)
    assert retry.code == 0, retry.stderr
    assert (retry.summary["tasks_created"], retry.summary["tasks_existing"]) == (6 - k, k)
    assert executions(dispatching) == {(i, "2026-11-30T09:00:00+09:00"): 1 for i in range(1, 7)}
    assert {r[4] for r in records(db)} == {"planned"} and len(records(db)) == 6


def test_a_run_killed_between_recording_and_creating_is_completed_by_the_next(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    users_at(db, "09:00", range(1, 4))
    clock.now = at(9, 5)
    dispatching.faults.missing_queue = True  # every create fails: recorded, never created
    assert job(db, dispatching, clock).code == 1
    assert len(records(db)) == 3 and dispatching.executions == []
    dispatching.faults.missing_queue = False
    clock.now = at(9, 12)  # later, still within GRACE
    retry = job(db, dispatching, clock)
    assert retry.code == 0, retry.stderr
    assert retry.summary["tasks_created"] == 3
    assert executions(dispatching) == {(i, "2026-11-30T09:00:00+09:00"): 1 for i in range(1, 4)}


def test_a_call_wanted_again_after_its_task_was_deleted_is_made_even_late(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """9:00 → 9:30 (the 9:00 task is deleted, its name refused for an hour) → 9:00
    again just before nine, and the next run is late. The table says the base id was
    deleted, so the call gets the next id and runs at once: not taken for "ran"."""
    users_at(db, "09:00", range(1, 2))
    assert job(db, dispatching, clock).code == 0
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 1")
    clock.now = at(8, 10)
    assert job(db, dispatching, clock).summary["tasks_deleted"] == 1
    clock.now = at(8, 58)
    db.execute("UPDATE users SET call_time = '09:00' WHERE id = 1")
    clock.now = at(9, 6)
    dispatching.run_due()  # nothing at 09:00: it was deleted
    late = job(db, dispatching, clock)
    assert late.code == 0, late.stderr
    assert [e.task_id for e in dispatching.executions] == [tid(1, at(9), 1)]


def test_a_future_task_deleted_outside_the_job_is_created_again_under_the_next_id(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    users_at(db, "08:30", range(1, 2))
    call = at(8, 30)
    assert job(db, queue, clock, RECONCILE="0").summary["tasks_created"] == 1  # no listing:
    del queue.tasks[f"{QUEUE_PATH}/tasks/{tid(1, call)}"]  # GetTask must tell; an operator's delete
    queue.tombstones[f"{QUEUE_PATH}/tasks/{tid(1, call)}"] = clock.seconds() + 3600
    again = job(db, queue, clock, RECONCILE="0")
    assert again.code == 0, again.stderr
    assert again.summary["tasks_created"] == 1
    assert queue.task_ids() == [tid(1, call, 1)]
    assert "deleted outside the job" in again.stderr
    assert [(r[2], r[4]) for r in records(db)] == [(0, "deleted"), (1, "planned")]


# -- the database answering late ---------------------------------------------------------


def test_a_database_answering_35s_late_does_not_repeat_a_call_that_ran_meanwhile(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """The call is due 15 s after the run starts; the database answers 35 s later, when
    the task has run and left the listing. The recorded id's create was confirmed and
    its call is past: done, nothing created again."""
    start = at(9, 0, 2)
    call = start + dt.timedelta(seconds=15)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": call.time().isoformat()}])
    clock.now = start - dt.timedelta(hours=1)
    first = job(db, dispatching, clock)  # the previous run, an hour earlier
    assert first.summary["tasks_created"] == 1, first.stderr
    clock.now = start
    answered: list[bool] = []

    def late_answer() -> None:
        if not answered:
            answered.append(True)
            clock.advance(seconds=35)
            dispatching.run_due()

    proxy = TcpProxy((DB_SETTINGS["host"], DB_SETTINGS["port"]), on_answer=late_answer)
    try:
        env = job_env(db, dispatching, DB_HOST="127.0.0.1", DB_PORT=str(proxy.port))
        late = run_main([], env, clock)
    finally:
        proxy.close()
    assert late.code == 0, late.stderr
    assert clock.now > call + dt.timedelta(seconds=15)  # the database really answered late
    assert late.summary["tasks_existing"] == 1 and late.summary["tasks_created"] == 0
    assert [e.task_id for e in dispatching.executions] == [tid(1, call)]


def test_a_database_that_accepts_and_never_answers_is_given_up_within_the_bound() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel accepts; nobody ever speaks
    accepted: list[socket.socket] = []  # held open, never answered

    def hold_connections() -> None:
        while True:
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold_connections, daemon=True).start()
    env = job_env(
        None, DB_HOST="127.0.0.1", DB_PORT=str(silent.getsockname()[1]),
        DB_CONNECT_TIMEOUT="1", DB_RETRY_SECONDS="2", DB_READ_TIMEOUT="600",
    )  # fmt: skip
    started = time.monotonic()
    try:
        result = run_main(["--dry-run"], env, VirtualClock(at(9)))
    finally:
        for sock in [silent, *accepted]:
            sock.close()
    elapsed = time.monotonic() - started
    assert result.code == 1
    assert len(accepted) >= 2  # each attempt got through TCP and then heard nothing
    assert 2 < elapsed < 2 + 1 + 2  # DB_RETRY_SECONDS + one DB_CONNECT_TIMEOUT, plus slack
    assert result.stderr.count("database not reachable yet, retrying") >= 2
    assert "within 3s (DB_RETRY_SECONDS + DB_CONNECT_TIMEOUT)" in result.summary["error"]


# -- dry run, the record, grants ------------------------------------------------------


def test_dry_run_ids_are_the_real_runs_ids(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    users_at(db, "09:00", range(1, 4))
    users_at(db, "07:55", range(4, 5))  # due before now, within GRACE: a late call
    assert job(db, queue, clock).code == 0
    db.execute("DELETE FROM users WHERE id = 2")
    clock.now = at(8, 5)
    assert job(db, queue, clock).summary["tasks_deleted"] == 1
    users_at(db, "09:00", range(2, 3))  # re-added: its base id is refused for an hour
    users_at(db, "07:58", range(5, 6))  # another late call, never planned before

    clock.now = at(8, 10)
    dry = job(db, queue, clock, "--dry-run")
    assert dry.code == 0, dry.stderr
    before = records(db)
    real = job(db, queue, clock)
    assert real.code == 0, real.stderr
    planned = {(r[0], r[3]) for r in records(db) if r[4] == "planned"}
    assert {(p["user_id"], p["task_id"]) for p in dry.plan} == planned
    assert (2, tid(2, at(9), 1)) in planned and (5, tid(5, at(7, 58))) in planned
    assert set(before) < set(records(db))  # the dry run wrote nothing the real one did


def table_checksums(db: Database) -> tuple[object, ...]:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("CHECKSUM TABLE users, scheduled_calls, job_runs EXTENDED")
        return tuple(row[1] for row in cur.fetchall())


def test_dry_run_writes_nothing(db: Database, queue: FakeCloudTasks, clock: VirtualClock) -> None:
    users_at(db, "09:00", range(1, 4))
    assert job(db, queue, clock).code == 0
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 1")
    before = table_checksums(db), queue.task_ids()
    clock.now = at(8, 10)
    dry = job(db, queue, clock, "--dry-run")
    assert dry.code == 0, dry.stderr
    assert any("delete" in p for p in dry.plan)  # it would change something
    assert (table_checksums(db), queue.task_ids()) == before


def test_the_table_records_each_created_task(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    users_at(db, "09:00", range(1, 3))
    db.insert([{"id": 3, "call_weekdays": "daily", "call_time": "09:20", "timezone": "UTC"}])
    assert job(db, queue, clock).code == 0
    assert records(db) == [
        (1, at(9), 0, tid(1, at(9)), "planned"),
        (2, at(9), 0, tid(2, at(9)), "planned"),
    ]
    assert queue.task_ids() == sorted(r[3] for r in records(db))


@pytest.fixture
def limited_user(db: Database) -> collections.abc.Iterator[dict[str, str]]:
    """A database user with SELECT only, on the job's tables."""
    name = "anpi_ro_" + hashlib.sha256(db.name.encode()).hexdigest()[:8]
    with pymysql.connect(**DB_SETTINGS, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE USER '{name}'@'%' IDENTIFIED BY 'pw'")
        for table in ("users", "scheduled_calls", "job_runs"):
            cur.execute(f"GRANT SELECT ON {db.name}.{table} TO '{name}'@'%'")
    try:
        yield {"DB_USER": name, "DB_PASSWORD": "pw"}
    finally:
        with pymysql.connect(**DB_SETTINGS, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP USER '{name}'@'%'")


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_select_only_user_exits_2_before_any_task(
    db: Database,
    queue: FakeCloudTasks,
    clock: VirtualClock,
    limited_user: dict[str, str],
    dry_run: bool,
) -> None:
    users_at(db, "09:00", range(1, 3))
    result = job(db, queue, clock, *(["--dry-run"] if dry_run else []), **limited_user)
    assert result.code == 2
    assert result.stdout == ""
    assert "may not INSERT on scheduled_calls" in result.stderr
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{db.name}`.scheduled_calls" in result.stderr
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{db.name}`.job_runs" in result.stderr
    assert queue.rpcs == []


def test_a_missing_table_exits_2_naming_it(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    users_at(db, "09:00", range(1, 3))
    db.execute("DROP TABLE job_runs")
    without_runs = job(db, queue, clock)
    assert without_runs.code == 2
    assert "table job_runs is missing" in without_runs.stderr
    assert "migrations/004_quick_runs.sql" in without_runs.stderr
    db.execute("DROP TABLE scheduled_calls")
    result = job(db, queue, clock)
    assert result.code == 2
    assert "table scheduled_calls is missing" in result.stderr and "schema.sql" in result.stderr
    assert queue.rpcs == []


# -- reconciling near the call's time, retention -------------------------------------


def test_a_stale_task_due_within_60s_is_left_and_logged(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    users_at(db, "09:00:30", range(1, 2))
    users_at(db, "09:05", range(2, 3))
    assert job(db, queue, clock).code == 0
    db.execute("UPDATE users SET is_active = 0")
    clock.now = at(9)  # 09:00:30 may be firing; 09:05 may not be yet
    result = job(db, queue, clock)
    assert result.code == 0, result.stderr
    assert (result.summary["deletes_skipped"], result.summary["tasks_deleted"]) == (1, 1)
    assert "may be firing" in result.stderr
    assert queue.task_ids() == [tid(1, at(9, 0, 30))]
    assert [(r[0], r[4]) for r in records(db)] == [(1, "planned"), (2, "deleted")]


def test_old_rows_are_purged_in_batches(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    old = dt.datetime(2026, 10, 1, tzinfo=UTC)
    rows = [(old + dt.timedelta(minutes=i), i, 0, f"old-{i}", "planned") for i in range(12_000)] + [
        (dt.datetime(2026, 11, 20, tzinfo=UTC), 1, 0, "recent", "planned")
    ]
    with db.connect() as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO scheduled_calls (call_at, user_id, alternative, task_id, state)"
            " VALUES (%s, %s, %s, %s, %s)",
            [(t.replace(tzinfo=None), u, a, i, s) for t, u, a, i, s in rows],
        )
    result = job(db, queue, clock, SCHEDULED_CALLS_RETENTION_DAYS="35")
    assert result.code == 0, result.stderr
    assert result.summary["records_purged"] == 12_000
    assert [r[3] for r in records(db)] == ["recent"]
    dry = job(db, queue, clock, "--dry-run", SCHEDULED_CALLS_RETENTION_DAYS="2")
    assert dry.summary["records_purged"] == 0 and len(records(db)) == 1


# -- slow answers, unconfirmed deletes, old calls, overlap ---------------------------------


def slow(server: FakeCloudTasks, clock: VirtualClock, method: str, seconds: float) -> None:
    """`method` is answered `seconds` of the virtual clock after the job sent it."""

    def hook(name: str, _request: object) -> None:
        if name == method:
            clock.advance(seconds=seconds)

    server.before_rpc = hook


def test_a_slow_gettask_is_not_taken_for_a_delete_once_the_call_may_have_fired(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    """ALREADY_EXISTS 63 s ahead, then GetTask answers NOT_FOUND 5 s later: by then the
    call is within the firing margin, so it may have run. No new id."""
    call = clock.now + dt.timedelta(seconds=63)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": call.time().isoformat()}])
    insert_record(db, 1, call, 0, "planned")
    queue.tombstones[f"{QUEUE_PATH}/tasks/{tid(1, call)}"] = clock.seconds() + 3600
    slow(queue, clock, "GetTask", 5)
    result = job(db, queue, clock, RECONCILE="0")
    assert result.code == 0, result.stderr
    assert result.summary["tasks_existing"] == 1
    assert queue.created_names() == []
    assert [r.method for r in queue.rpcs] == ["CreateTask", "GetTask"]


def test_an_unconfirmed_delete_of_a_past_call_is_not_made_twice(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    """A run marked the 09:00 task deleting and died before DeleteTask; the task ran.
    The user wants 09:00 again and the run is late: it cannot tell, so it creates
    nothing and says so (exit 1), rather than call twice."""
    users_at(db, "09:00", range(1, 2))
    insert_record(db, 1, at(9), 0, "deleting")
    clock.now = at(9, 5)
    result = job(db, queue, clock)
    assert result.code == 1
    assert result.summary["tasks_failed"] == 1
    assert "cannot tell whether this call already ran" in result.stderr
    assert queue.created_names() == []


def test_an_unconfirmed_delete_of_a_due_call_whose_task_is_still_pending_is_kept(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    """The call is due within the margin: its task cannot be replaced (it may be
    firing), so the pending one is kept."""
    users_at(db, "09:00", range(1, 2))
    insert_record(db, 1, at(9), 0, "deleting")
    queue.add_task(f"{QUEUE_PATH}/tasks/{tid(1, at(9))}", at(9).timestamp())
    clock.now = at(8, 59, 30)
    result = job(db, queue, clock, RECONCILE="0")  # no listing: GetTask tells
    assert result.code == 0, result.stderr
    assert result.summary["tasks_existing"] == 1
    assert queue.created_names() == []
    assert [(r[2], r[4]) for r in records(db)] == [(0, "planned")]


def test_an_unconfirmed_delete_of_a_call_still_ahead_is_replaced(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    """A delete of the pending task may still land (the run that began it may be alive):
    the task is deleted now and the call gets the next id."""
    users_at(db, "09:00", range(1, 2))
    insert_record(db, 1, at(9), 0, "deleting")
    queue.add_task(f"{QUEUE_PATH}/tasks/{tid(1, at(9))}", at(9).timestamp())
    result = job(db, queue, clock, RECONCILE="0")
    assert result.code == 0, result.stderr
    assert (result.summary["tasks_created"], result.summary["tasks_deleted"]) == (1, 1)
    assert queue.task_ids() == [tid(1, at(9), 1)]
    assert [(r[2], r[4]) for r in records(db)] == [(0, "deleted"), (1, "planned")]


def test_an_unconfirmed_delete_of_a_future_call_gets_the_next_id(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    users_at(db, "09:00", range(1, 2))
    insert_record(db, 1, at(9), 0, "deleting")  # its task is gone, and 09:00 is ahead
    result = job(db, queue, clock)
    assert result.code == 0, result.stderr
    assert queue.task_ids() == [tid(1, at(9), 1)]


@pytest.mark.parametrize(
    ("answered_after", "state", "code", "deleted", "failed"),
    [(6, "deleted", 0, 1, 0), (70, "deleting", 1, 0, 1)],
)
def test_a_delete_is_confirmed_only_when_it_answered_before_the_call(
    db: Database,
    queue: FakeCloudTasks,
    clock: VirtualClock,
    answered_after: int,
    state: str,
    code: int,
    deleted: int,
    failed: int,
) -> None:
    """Deleted 65 s ahead. Answered 6 s later, inside the margin but before the call's
    time, the delete took effect before any dispatch: `deleted`. Answered 70 s later,
    after the call's time, the task may have run first: the record keeps `deleting`, and
    the run counts a failed delete and says so."""
    call = clock.now + dt.timedelta(seconds=65)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": call.time().isoformat()}])
    assert job(db, queue, clock).summary["tasks_created"] == 1
    db.execute("UPDATE users SET is_active = 0")
    slow(queue, clock, "DeleteTask", answered_after)
    result = job(db, queue, clock)
    assert result.code == code, result.stderr
    assert result.summary["tasks_deleted"] == deleted
    assert result.summary["deletes_failed"] == failed
    assert ("answered only after its time: it may have run" in result.stderr) == bool(failed)
    assert [r[4] for r in records(db)] == [state]


def test_no_delete_is_retried_into_the_firing_margin(db: Database, queue: FakeCloudTasks) -> None:
    """A delete may not land once its call may be firing: its retries stop at the margin
    (here 2 s of real time away), however long ENQUEUE_DEADLINE_SECONDS is."""
    clock = VirtualClock(dt.datetime.now(JST).replace(microsecond=0))
    call = clock.now + dt.timedelta(seconds=62)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": call.time().isoformat()}])
    assert job(db, queue, clock).summary["tasks_created"] == 1
    db.execute("UPDATE users SET is_active = 0")
    queue.faults.method_errors["DeleteTask"] = grpc.StatusCode.UNAVAILABLE
    started = time.monotonic()
    result = run_main([], job_env(db, queue, ENQUEUE_DEADLINE_SECONDS="60"))  # the real clock
    assert time.monotonic() - started < 10
    assert result.code == 1 and result.summary["deletes_failed"] == 1
    assert [r[4] for r in records(db)] == ["deleting"]


def test_a_recorded_call_older_than_50_minutes_is_not_created_again(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    """Cloud Tasks forgets names after about an hour: "ran" and "never created" look
    alike, so an old recorded call fails loudly instead of perhaps calling twice."""
    users_at(db, "09:00", range(1, 2))
    insert_record(db, 1, at(9), 0, "planned")
    clock.now = at(9, 55)
    result = job(db, queue, clock, GRACE_MINUTES="59")
    assert result.code == 1
    assert "too old to tell whether its task ran" in result.stderr
    assert queue.created_names() == []


def test_without_gettask_permission_a_pending_call_still_counts_as_existing(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    """An enqueuer-only account with RECONCILE=0: the second run's ALREADY_EXISTS cannot
    be checked, so it is taken to exist, with one warning, not a failure per call."""
    users_at(db, "09:00", range(1, 4))
    assert job(db, queue, clock, RECONCILE="0").summary["tasks_created"] == 3
    queue.faults.method_errors["GetTask"] = grpc.StatusCode.PERMISSION_DENIED
    clock.now = at(8, 30)
    again = job(db, queue, clock, RECONCILE="0")
    assert again.code == 0, again.stderr
    assert again.summary["tasks_existing"] == 3
    assert again.stderr.count("GetTask denied") == 1


def test_a_run_waits_for_another_run_of_its_shard(
    db: Database, queue: FakeCloudTasks, clock: VirtualClock
) -> None:
    """Runs of one shard never overlap: the second waits on the run lock (MySQL
    GET_LOCK, dropped when its holder's connection ends) and then plans for its time."""
    users_at(db, "09:00", range(1, 3))
    env = job_env(db, queue)
    name = main.run_lock_name(main.Config.from_env(env).db_name, main.Config.from_env(env).shard)
    holder = db.connect()

    def other_run_ends() -> None:
        clock.advance(seconds=3)
        holder.close()

    try:
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
            assert cur.fetchone() == (1,)
        threading.Timer(1.5, other_run_ends).start()
        started = time.monotonic()
        result = run_main([], env, clock)
    finally:
        with contextlib.suppress(pymysql.err.Error):  # closed already by the timer
            holder.close()
    assert result.code == 0, result.stderr
    assert time.monotonic() - started > 1.2
    assert "waited" in result.stderr and result.summary["tasks_created"] == 2
    assert dt.datetime.fromisoformat(result.summary["window_start"]) > at(7, 45, 2)


# -- part-way failures a fresh review reproduced ------------------------------------------
# Each runs the job in-process on a virtual clock that the dispatching server shares.


def on(db: Database, server: FakeCloudTasks, **env: str) -> dict[str, str]:
    return job_env(db, server, ENQUEUE_DEADLINE_SECONDS="1", **env)


def hold_first(server: FakeCloudTasks, method: str) -> tuple[threading.Event, threading.Event]:
    """Hold the first `method` call before it takes effect: (reached, release)."""
    reached, release = threading.Event(), threading.Event()
    held: list[bool] = []

    def hook(name: str, _request: object) -> None:
        if name == method and not held:
            held.append(True)
            reached.set()
            assert release.wait(30)

    server.before_rpc = hook
    return reached, release


def test_a_reshard_after_a_failed_delete_keeps_the_call(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """08:00 one shard creates user 7's 08:40 task; the user moves it to 09:30 and the
    08:05 delete fails; the user moves it back and the service goes to two shards with a
    queue each. The 08:10 run of shard 1/2 finds the 08:40 task on the old queue and
    keeps it: it must not then delete it as a duplicate of an id it never created."""
    users_at(db, "08:40", range(7, 8))
    assert run_main([], on(db, dispatching), clock).code == 0
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 7")
    clock.now = at(8, 5)
    dispatching.faults.method_errors["DeleteTask"] = grpc.StatusCode.UNAVAILABLE
    failed = run_main([], on(db, dispatching), clock)
    assert failed.code == 1 and failed.summary["deletes_failed"] == 1
    del dispatching.faults.method_errors["DeleteTask"]
    db.execute("UPDATE users SET call_time = '08:40' WHERE id = 7")
    clock.now = at(8, 10)
    shards = dict(CLOUD_RUN_TASK_COUNT="2", QUEUE_PER_SHARD="1")
    for index in (0, 1):
        result = run_main([], on(db, dispatching, CLOUD_RUN_TASK_INDEX=str(index), **shards), clock)
        assert result.code == 0, result.stderr
    clock.now = at(10)
    dispatching.run_due()
    assert executions(dispatching) == {(7, "2026-11-30T08:40:00+09:00"): 1}


def lose_the_lock_while_held(
    db: Database,
    dispatching: FakeCloudTasks,
    clock: VirtualClock,
    method: str,
    change: str,
    then: dt.datetime,
) -> list[JobResult]:
    """Run A is held at its first `method`; meanwhile the family's `change`, A's
    connections drop (its lock goes), and run B runs at `then` (it must exit 0); then
    A's request lands. A's result, once it ends."""
    reached, release = hold_first(dispatching, method)
    a_result: list[JobResult] = []
    a = threading.Thread(target=lambda: a_result.append(run_main([], on(db, dispatching), clock)))
    a.start()
    try:
        assert reached.wait(30)
        db.execute(change)
        assert kill_connections(db) >= 1
        clock.now = then
        b = run_main([], on(db, dispatching), clock)
        assert b.code == 0, b.stderr
    finally:
        release.set()
        a.join(60)
    return a_result


def test_a_run_that_lost_its_lock_cannot_leave_a_stale_call_behind(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """Run A records user 5's 09:00 call; its create is slow. The user moves the call to
    09:30 and A's connections drop, which frees its lock. Run B plans 09:30; then A's
    create lands. Nobody may be called at 09:00."""
    users_at(db, "09:00", range(5, 6))
    a_result = lose_the_lock_while_held(
        db, dispatching, clock, "CreateTask", "UPDATE users SET call_time = '09:30'", at(8, 1)
    )
    clock.now = at(10)
    dispatching.run_due()
    assert executions(dispatching) == {(5, "2026-11-30T09:30:00+09:00"): 1}
    assert a_result and a_result[0].code == 1  # it could not finish what it began


def test_a_run_that_lost_its_lock_cannot_delete_a_wanted_call(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """Run A marks user 5's 09:00 task deleting; its DeleteTask is slow. The user moves
    the call back to 09:00 and A's connections drop. Run B finds the task still listed;
    then A's delete lands. The 09:00 call must still be made, once."""
    users_at(db, "09:00", range(5, 6))
    assert run_main([], on(db, dispatching), clock).code == 0
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 5")
    clock.now = at(8, 5)
    lose_the_lock_while_held(
        db, dispatching, clock, "DeleteTask", "UPDATE users SET call_time = '09:00'", at(8, 6)
    )
    clock.now = at(10)
    dispatching.run_due()
    assert executions(dispatching) == {(5, "2026-11-30T09:00:00+09:00"): 1}


@pytest.mark.parametrize("typo", ["9時", "", "9:3"])
def test_a_typo_in_a_text_call_time_keeps_the_call_and_is_reported(
    clock: VirtualClock, dispatching: FakeCloudTasks, typo: str
) -> None:
    db = create_database(SCHEMA.replace("call_time     TIME", "call_time     VARCHAR(16)"))
    try:
        users_at(db, "09:00", range(1, 2))
        assert run_main([], on(db, dispatching), clock).summary["tasks_created"] == 1
        db.execute("UPDATE users SET call_time = %s WHERE id = 1", (typo,))
        clock.now = at(8, 10)
        result = run_main([], on(db, dispatching), clock)
    finally:
        drop_database(db)
    assert result.code == 0, result.stderr
    assert (result.summary["rows_invalid"], result.summary["tasks_deleted"]) == (1, 0)
    [line] = [ln for ln in result.stderr.splitlines() if "invalid row skipped" in ln]
    assert "ERROR" in line and "column=call_time" in line and "user_id=1" in line
    assert dispatching.task_ids() == [tid(1, at(9))]


def test_the_run_lock_wait_is_not_cut_short_by_the_read_timeout(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    """DB_READ_TIMEOUT bounds each query, not the wait for another run of the shard."""
    users_at(db, "09:00", range(1, 3))
    env = job_env(db, tasks_server, DB_READ_TIMEOUT="1")
    name = main.run_lock_name(main.Config.from_env(env).db_name, main.Config.from_env(env).shard)
    holder = db.connect()
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
        threading.Timer(2.5, holder.close).start()
        result = run_main([], env, VirtualClock(at(8)))
    finally:
        with contextlib.suppress(pymysql.err.Error):
            holder.close()
    assert result.code == 0, result.stderr
    assert "waited" in result.stderr and result.summary["tasks_created"] == 2


def test_a_time_moved_back_after_the_call_ran_gives_no_second_call_that_day(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """The 09:30 call runs; at 09:32 the family sets 09:20 and a run at 09:33 has 09:20
    in its grace. At most one call per row and local date."""
    users_at(db, "09:30", range(1, 2))
    clock.now = at(9)
    assert run_main([], on(db, dispatching), clock).code == 0
    clock.now = at(9, 32)
    dispatching.run_due()
    db.execute("UPDATE users SET call_time = '09:20' WHERE id = 1")
    clock.now = at(9, 33)
    result = run_main([], on(db, dispatching), clock)
    assert result.code == 0, result.stderr
    clock.now = at(12)
    dispatching.run_due()
    assert executions(dispatching) == {(1, "2026-11-30T09:30:00+09:00"): 1}


def test_a_stale_task_the_listing_misses_is_still_deleted(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """ListTasks can leave out tasks while others run between its pages: the record
    still names the task, so the run deletes it."""
    users_at(db, "09:00", range(1, 2))
    assert run_main([], on(db, dispatching), clock).code == 0
    db.execute("UPDATE users SET is_active = 0")
    dispatching.hidden.add(f"{QUEUE_PATH}/tasks/{tid(1, at(9))}")
    clock.now = at(8, 10)
    result = run_main([], on(db, dispatching), clock)
    assert result.code == 0, result.stderr
    assert result.summary["tasks_deleted"] == 1
    clock.now = at(10)
    dispatching.run_due()
    assert executions(dispatching) == {}
