"""Part-way failures a second review reproduced, each driven as it happens: a run that
could not note itself, two shard counts at once, a name taken just before a delete, a
connection cut off by the network, a verdict asked again every minute, a typo after a
failed create, a lost reader, and a long run with a stale call near its time; and, from
a third review, a delete answered late, a stop between parts, a slow name taken before a
delete, an audit after an outage, and what a dry run prints; and, from a fourth, a
replacement whose delete answers only after the call's time.

The job runs in-process on a virtual clock that the dispatching in-tests Cloud Tasks
server shares.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import os
import signal
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest

import main
from tests.conftest import (
    DB_SETTINGS,
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

UTC = dt.UTC


def on(db: Database, server: FakeCloudTasks, **env: str) -> dict[str, str]:
    return job_env(db, server, ENQUEUE_DEADLINE_SECONDS="1", **env)


def executions(server: FakeCloudTasks) -> collections.Counter[tuple[int, str]]:
    return collections.Counter(
        (e.body["user_id"], e.body["scheduled_at"]) for e in server.executions
    )


def states(db: Database) -> list[tuple[int, int, str]]:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT user_id, alternative, state FROM scheduled_calls ORDER BY call_at, user_id, alternative"
        )
        return list(cur.fetchall())


def test_a_run_that_could_not_finish_still_bounds_the_quick_runs_and_a_call_moved_back_is_made_once(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """The 07:01 hourly run creates 09:00 and then loses the database. The family moves
    the call to 07:30 (a quick run creates it, and it runs), then back to 09:00. The
    quick runs must have seen 09:00 (the run noted its window before creating), and
    the 08:01 run must not keep 09:00 after 07:30 ran: one call that day."""
    db.insert([{"id": 5, "call_weekdays": "daily", "call_time": "09:00"}])
    clock.now = at(6, 1)
    assert run_main([], on(db, dispatching), clock).code == 0

    def failover_after_the_create(method: str) -> None:
        if method == "CreateTask":
            kill_connections(db)

    clock.now = at(7, 1)
    dispatching.on_rpc = failover_after_the_create
    h1 = run_main([], on(db, dispatching), clock)
    dispatching.on_rpc = None
    assert h1.code == 1 and h1.summary["tasks_created"] == 1, h1.stderr
    clock.now = at(7, 5)
    db.execute("UPDATE users SET call_time = '07:30' WHERE id = 5")
    clock.now = at(7, 6)
    assert run_main(["--changes"], on(db, dispatching), clock).code == 0
    clock.now = at(7, 31)
    dispatching.run_due()  # 07:30 is called
    clock.now = at(7, 40)
    db.execute("UPDATE users SET call_time = '09:00' WHERE id = 5")
    clock.now = at(7, 41)
    assert run_main(["--changes"], on(db, dispatching), clock).code == 0
    clock.now = at(8, 1)
    assert run_main([], on(db, dispatching), clock).code == 0
    clock.now = at(10)
    dispatching.run_due()
    assert executions(dispatching) == {(5, "2026-11-30T07:30:00+09:00"): 1}


def shard_env(
    db: Database, server: FakeCloudTasks, index: int, count: int, **extra: str
) -> dict[str, str]:
    return job_env(
        db, server, CLOUD_RUN_TASK_INDEX=str(index), CLOUD_RUN_TASK_COUNT=str(count),
        QUEUE_PER_SHARD="1", ENQUEUE_DEADLINE_SECONDS="5", **extra,
    )  # fmt: skip


def test_a_run_of_another_shard_count_waits_its_turn_and_a_call_moved_and_back_is_made(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TASK_COUNT goes from 1 to 2 while a run of the old count, on an older snapshot,
    is part-way (its create held). The new count's run does nothing and fails (Cloud
    Run retries it after); X's call is moved to 09:30 and back to 09:00: made once."""
    monkeypatch.setattr(main, "RECORD_BATCH", 2)
    x = 1  # old shard 0/1 (queue-0), new shard 1/2 (queue-1)
    db.insert([{"id": x, "call_weekdays": "daily", "call_time": "09:00"}])
    assert run_main([], shard_env(db, dispatching, 0, 1), clock).summary["tasks_created"] == 1
    db.insert(
        [
            {"id": 2, "call_weekdays": "daily", "call_time": "08:30"},
            {"id": 4, "call_weekdays": "daily", "call_time": "08:31"},
        ]
    )
    clock.now = at(8, 5)
    reached, release = threading.Event(), threading.Event()

    def hold_user_2(method: str, request: object) -> None:
        if method == "CreateTask" and "-anpi-2-" in request.task.name:  # type: ignore[attr-defined]
            reached.set()
            assert release.wait(30)

    dispatching.before_rpc = hold_user_2
    old: list[JobResult] = []
    thread = threading.Thread(
        target=lambda: old.append(
            run_main([], shard_env(db, dispatching, 0, 1, ENQUEUE_CONCURRENCY="1"), clock)
        )
    )
    thread.start()
    try:
        assert reached.wait(30)
        db.execute("UPDATE users SET call_time = '09:30' WHERE id = %s", (x,))
        new = run_main([], shard_env(db, dispatching, 1, 2), clock)
        assert new.code == 1 and "another shard count" in new.summary["error"]
        assert new.summary["tasks_created"] == new.summary["tasks_deleted"] == 0
        quick = run_main(["--changes"], shard_env(db, dispatching, 1, 2), clock)
        assert quick.code == 0 and "quick run skipped" in quick.stderr
    finally:
        release.set()
        thread.join(60)
    dispatching.before_rpc = None
    assert old[0].code == 0, old[0].stderr
    retried = run_main([], shard_env(db, dispatching, 1, 2), clock)  # Cloud Run's retry
    assert retried.code == 0 and retried.summary["tasks_deleted"] == 1, retried.stderr
    clock.now = at(8, 10)
    db.execute("UPDATE users SET call_time = '09:00' WHERE id = %s", (x,))
    clock.now = at(8, 11)
    assert run_main(["--changes"], shard_env(db, dispatching, 1, 2), clock).code == 0
    clock.now = at(9, 5)
    assert run_main([], shard_env(db, dispatching, 1, 2), clock).code == 0
    clock.now = at(10)
    dispatching.run_due()
    assert executions(dispatching)[(x, "2026-11-30T09:00:00+09:00")] == 1


def test_a_deleted_id_never_becomes_planned_again(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """Whatever a run on an older snapshot writes: a `deleted` id surely never ran."""
    insert_record(db, 1, at(9), 0, "deleted")
    config = main.Config.from_env(job_env(db, dispatching))
    with contextlib.ExitStack() as stack:
        writer = main.open_database(config, stack)
        record = main.CallRecord(writer, config, clock)
        record.load(main.Window(at(8), at(10)))
        record.write(
            [main.Entry(main.CallKey(1, at(9).astimezone(UTC)), 0, main.PLANNED, created=True)]
        )
        assert record.ids(main.CallKey(1, at(9).astimezone(UTC)))[0].state is main.DELETED
    assert states(db) == [(1, 0, "deleted")]


def test_a_name_taken_just_before_its_delete_leaves_the_delete_outside_the_margin(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """A recorded, never confirmed id of an inactive user, 100 s ahead: its name is
    taken first (a create still in flight must not land after), and that create
    answers 50 s later. The delete must still be sent more than 60 s ahead, or not at
    all."""
    call = at(9)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00", "is_active": 0}])
    insert_record(db, 1, call, 0, "planned")
    clock.now = call - dt.timedelta(seconds=100)
    seen: list[tuple[str, float]] = []

    def slow_create(method: str, _request: object) -> None:
        if method == "CreateTask":
            clock.advance(seconds=50)
        seen.append((method, (call - clock.now).total_seconds()))

    dispatching.before_rpc = slow_create
    result = run_main([], job_env(db, dispatching, ENQUEUE_DEADLINE_SECONDS="60"), clock)
    assert all(ahead > 60 for method, ahead in seen if method == "DeleteTask"), seen
    # The create answered after its 20 s deadline (on a real queue it would not have
    # taken effect): the run says it could not delete the task, and fails.
    assert result.code == 1 and result.summary["deletes_failed"] == 1
    assert "no time was left to delete it" in result.stderr


def test_taking_a_name_never_outlasts_the_call(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """The same id 65 s ahead, and the create meets UNAVAILABLE three times, 20 s each:
    the create may not land once the call may be firing, so no call is made."""
    call = at(9)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00", "is_active": 0}])
    insert_record(db, 1, call, 0, "planned")
    clock.now = call - dt.timedelta(seconds=65)
    dispatching.faults.fail_first = 3
    dispatching.before_rpc = lambda method, _r: (
        clock.advance(seconds=20) if method == "CreateTask" else None
    )
    result = run_main([], job_env(db, dispatching), clock)
    # Too close to take the name within half the time left: left alone, and said so.
    assert result.summary["deletes_skipped"] == 1, result.stderr
    assert "stale task left on the queue" in result.stderr
    clock.now = at(10)
    dispatching.run_due()
    assert executions(dispatching) == {}


class Blackhole:
    """Forwards to the database until `frozen`; then drops every byte both ways and
    closes nothing (a network partition: the server never learns the client left)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(4096):
                if not self.frozen.is_set():
                    sink.sendall(data)

    def close(self) -> None:
        self._listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_run_cut_off_by_the_network_lets_go_of_its_lock_within_the_idle_bound(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run A's link to the database goes silent after it took the run lock; A gives up
    and exits. The server ends A's session (and its lock) after WRITER_IDLE_SECONDS
    (here 3 s), not MySQL's 8 hours, and the next run goes ahead."""
    monkeypatch.setattr(main, "WRITER_IDLE_SECONDS", 3)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    proxy = Blackhole((DB_SETTINGS["host"], DB_SETTINGS["port"]))
    try:
        dispatching.before_rpc = lambda method, _r: (
            proxy.frozen.set() if method == "ListTasks" else None
        )
        a_env = job_env(
            db, dispatching, DB_HOST="127.0.0.1", DB_PORT=str(proxy.port), DB_READ_TIMEOUT="2"
        )
        assert run_main([], a_env, clock).code == 1
        dispatching.before_rpc = None
        b = run_main([], job_env(db, dispatching, RUN_LOCK_WAIT_SECONDS="10"), clock)
        assert b.code == 0, b.summary["error"]
        assert b.summary["tasks_created"] == 1
    finally:
        proxy.close()


def test_cannot_tell_is_decided_once_not_every_minute(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """A delete begun and never confirmed; the task ran. The first quick run cannot tell
    and says so (exit 1); the next ones make no Cloud Tasks call and exit 0."""
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    insert_record(db, 1, at(9), 0, "deleting")
    results, calls = [], []
    for minute in range(1, 5):
        clock.now = at(9, minute)
        before = len(dispatching.rpcs)
        results.append(run_main(["--changes"], on(db, dispatching), clock))
        calls.append([r.method for r in dispatching.rpcs[before:]])
    assert [r.code for r in results] == [1, 0, 0, 0]
    assert calls == [["GetTask"], [], [], []]
    assert "cannot tell whether this call already ran" in results[0].stderr
    assert all(r.summary["calls_skipped"] == 1 for r in results[1:])


@pytest.mark.parametrize("changes", [False, True])
def test_a_typo_after_a_failed_create_still_gets_the_recorded_call_made(
    clock: VirtualClock, dispatching: FakeCloudTasks, changes: bool
) -> None:
    """08:00 records 09:00 but its create fails; the family then mistypes call_time. The
    row is invalid, but the call it asked for was recorded: it is created."""
    db = create_database(SCHEMA.replace("call_time     TIME", "call_time     VARCHAR(16)"))
    try:
        db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
        dispatching.faults.method_errors["CreateTask"] = grpc.StatusCode.UNAVAILABLE
        first = run_main([], on(db, dispatching), clock)
        assert first.code == 1 and first.summary["tasks_failed"] == 1
        del dispatching.faults.method_errors["CreateTask"]
        db.execute("UPDATE users SET call_time = '9時' WHERE id = 1")
        clock.now = at(8, 10)
        later = run_main(["--changes"] if changes else [], on(db, dispatching), clock)
        assert later.code == 0, later.stderr
        assert (later.summary["rows_invalid"], later.summary["tasks_created"]) == (1, 1)
        clock.now = at(10)
        dispatching.run_due()
        assert executions(dispatching) == {(1, "2026-11-30T09:00:00+09:00"): 1}
    finally:
        drop_database(db)


def test_a_reader_lost_while_looking_users_up_still_gives_a_summary_and_notes_the_run(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.insert(
        [
            {"id": 1, "call_weekdays": "daily", "call_time": "09:00"},
            {"id": 2, "call_weekdays": "daily", "call_time": "09:10"},
        ]
    )
    assert run_main([], on(db, dispatching), clock).code == 0
    db.execute("UPDATE users SET is_active = 0 WHERE id = 2")  # its 09:10 is looked up

    def lost(_self: object, _user_ids: object) -> None:
        raise main.DatabaseError("lost the database while looking users up: (2013, 'Lost')")

    monkeypatch.setattr(main.Snapshot, "active", lost)
    clock.now = at(8, 5)
    result = run_main([], on(db, dispatching), clock)
    assert (
        result.code == 1 and "lost the database while looking users up" in result.summary["error"]
    )
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT complete FROM job_runs ORDER BY id")
        assert [c for (c,) in cur.fetchall()] == [1, 0]


def test_a_long_run_retires_a_stale_call_near_its_time_before_creating_the_rest(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """09:03 is queued; the family moves it to 09:04; 200 people sign up for 10:30. The
    09:01 run's 200 creates take 100 s: 09:03 must be retired first, not left to fire."""
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:03"}])
    clock.now = at(8, 1)
    assert run_main([], on(db, dispatching), clock).code == 0
    db.execute("UPDATE users SET call_time = '09:04' WHERE id = 1")
    db.insert(
        [
            {
                "id": i,
                "call_weekdays": "daily",
                "call_time": "10:30",
                "phone_number": f"+81901{i:07d}",
            }
            for i in range(100, 300)
        ]
    )
    clock.now = at(9, 1)
    dispatching.before_rpc = lambda method, _r: (
        clock.advance(seconds=0.5) if method == "CreateTask" else None
    )
    result = run_main([], on(db, dispatching, ENQUEUE_CONCURRENCY="1"), clock)
    dispatching.before_rpc = None
    assert result.code == 0, result.stderr
    clock.now = at(9, 10)
    dispatching.run_due()
    assert {k: v for k, v in executions(dispatching).items() if k[0] == 1} == {
        (1, "2026-11-30T09:04:00+09:00"): 1
    }


def test_a_stale_call_left_on_another_queue_is_counted_and_logged(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """After 1 -> 2 shards, user 1's call sits on the old queue-0, which shard 1/2 does
    not list. Paused 40 s before the call, it may be firing: left on the queue, counted
    in deletes_skipped and logged, as on the run's own queue."""
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    assert run_main([], shard_env(db, dispatching, 0, 1), clock).summary["tasks_created"] == 1
    db.execute("UPDATE users SET pause_from = '2026-11-30' WHERE id = 1")
    clock.now = at(9) - dt.timedelta(seconds=40)
    result = run_main([], shard_env(db, dispatching, 1, 2), clock)
    assert result.code == 0, result.stderr
    assert result.summary["deletes_skipped"] == 1 and result.summary["tasks_deleted"] == 0
    assert "stale task left on the queue" in result.stderr


# -- a third review ----------------------------------------------------------------------


def test_a_delete_answered_late_still_marks_the_id_deleted_and_the_moved_call_is_made(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """09:00 moved to 09:30 just over a minute before: the quick run's DeleteTask takes
    effect 60.5 s before the call, its answer comes 59.5 s before: still before the call's
    time, so the id is `deleted`, and 09:30 is made."""
    env = job_env(db, dispatching)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    clock.now = at(8, 1)
    assert run_main([], env, clock).code == 0
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 1")
    clock.now = at(8, 58, 58) + dt.timedelta(milliseconds=500)

    def slow(method: str, *_: object) -> None:
        if method == "DeleteTask":
            clock.advance(seconds=1)

    dispatching.before_rpc, dispatching.on_rpc = slow, slow
    quick = run_main(["--changes"], env, clock)
    dispatching.before_rpc = dispatching.on_rpc = None
    assert quick.code == 0 and quick.summary["tasks_deleted"] == 1, quick.stderr
    assert (1, 0, "deleted") in states(db)
    for when, args in ((at(8, 59, 30), ["--changes"]), (at(9, 1), []), (at(9, 5), ["--changes"])):
        clock.now = when
        assert run_main(args, env, clock).code == 0
    clock.now = at(9, 45)
    dispatching.run_due()
    assert executions(dispatching) == {(1, "2026-11-30T09:30:00+09:00"): 1}


@pytest.mark.parametrize("args", [[], ["--changes"]])
def test_a_replacement_whose_delete_answers_after_the_call_makes_no_second_call(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock, args: list[str]
) -> None:
    """(A fourth review.) The 09:00 id was left `deleting` by a run that died before its
    DeleteTask, and 09:00 is wanted again. At 08:58 the run replaces it: the delete is
    sent ahead of the margin but answers after 09:00, when the task has run. The call
    may have been made, so no new id is created: "cannot tell", once, and exit 1."""
    env = job_env(db, dispatching)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    clock.now = at(8, 1)
    assert run_main([], env, clock).code == 0
    db.execute("UPDATE scheduled_calls SET state = 'deleting'")
    assert dispatching.task_ids() == [tid(1, at(9))]
    clock.now = at(8, 58)

    def late(method: str, _request: object) -> None:
        if method == "DeleteTask":  # the task runs at 09:00 meanwhile
            clock.advance(seconds=130)

    dispatching.before_rpc = late
    result = run_main(args, env, clock)
    dispatching.before_rpc = None
    assert result.code == 1, result.stderr
    assert result.summary["tasks_created"] == 0 and result.summary["deletes_failed"] == 1
    assert "cannot tell whether this call already ran" in result.stderr
    clock.now = at(9, 30)
    dispatching.run_due()
    assert executions(dispatching) == {(1, "2026-11-30T09:00:00+09:00"): 1}


def test_a_run_stopped_between_parts_is_not_noted_complete(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM between two parts of the window: the run says interrupted and exit 1, and
    job_runs does not call it complete, so the audit does not take its window as covered."""
    env = job_env(db, dispatching)
    clock.now = at(7, 1)
    assert run_main([], env, clock).code == 0
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "08:30"}])
    whole = main.slices

    def then_stopped(window: main.Window, size: dt.timedelta = main.SLICE) -> Iterator[main.Window]:
        for n, part in enumerate(whole(window, size)):
            if n == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # Cloud Run stops the task here
            yield part

    monkeypatch.setattr(main, "slices", then_stopped)
    clock.now = at(8, 1)
    quick = run_main(["--changes"], env, clock)
    assert quick.code == 1 and quick.summary["interrupted"], quick.stderr
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT kind, complete FROM job_runs ORDER BY id DESC LIMIT 1")
        assert cur.fetchone() == ("changes", 0)


def test_taking_a_stale_name_is_retried_only_within_the_enqueue_deadline(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """A stale id never confirmed (its run died), in a CreateTask outage: taking its name
    before the delete gives up within ENQUEUE_DEADLINE_SECONDS (2 s here), not within half
    the hour before its call, so the run does not hold its shard meanwhile."""
    env = job_env(db, dispatching, ENQUEUE_DEADLINE_SECONDS="2")
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00", "is_active": 0}])
    insert_record(db, 1, at(9), 0, "planned")
    clock.now = at(8, 1)
    dispatching.faults.method_errors["CreateTask"] = grpc.StatusCode.UNAVAILABLE
    results: list[JobResult] = []
    run = threading.Thread(target=lambda: results.append(run_main([], env, clock)))
    run.start()
    run.join(15)
    held = run.is_alive()
    del dispatching.faults.method_errors["CreateTask"]  # lets a run still retrying end
    run.join(60)
    assert not held, "taking the name outlasted ENQUEUE_DEADLINE_SECONDS"
    assert results[0].code == 1 and results[0].summary["deletes_failed"] == 1, results[0].stderr


def test_the_audit_names_a_moved_call_whose_earlier_id_was_never_created(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """In a CreateTask outage, 09:00 is recorded but never created; the call moves to
    09:10, which fails too. Nobody was called: 09:10 is named missed, not hidden by the
    09:00 id that never became a task."""
    env = job_env(db, dispatching, ENQUEUE_DEADLINE_SECONDS="1")
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    clock.now = at(6, 1)
    assert run_main([], env, clock).code == 0  # audits from here on (09:00 not yet in its window)
    dispatching.faults.method_errors["CreateTask"] = grpc.StatusCode.UNAVAILABLE
    clock.now = at(7, 1)
    assert run_main([], env, clock).code == 1  # 09:00 recorded, its create fails
    db.execute("UPDATE users SET call_time = '09:10' WHERE id = 1")
    clock.now = at(8, 58, 39)
    assert run_main(["--changes"], env, clock).code == 1  # 09:00 retired (fails), 09:10 fails
    del dispatching.faults.method_errors["CreateTask"]
    clock.now = at(9, 30)
    after = run_main(["--changes"], env, clock)  # audits up to 09:15
    clock.now = at(9, 40)
    dispatching.run_due()
    assert dispatching.executions == []
    assert after.summary["calls_missed"] == 1, after.stderr
    assert "call missed: no complete run covered it" in after.stderr


@pytest.mark.parametrize("args", [["--changes"], []], ids=["quick", "hourly"])
def test_a_dry_run_prints_no_call_that_rule_4_turns_away(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock, args: list[str]
) -> None:
    """09:00 was called, then moved to 09:40: the real run makes no second call that day,
    and the dry run prints none either, but the deletion of nothing."""
    env = job_env(db, dispatching)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    clock.now = at(8, 1)
    assert run_main([], env, clock).code == 0
    clock.now = at(9, 1)
    dispatching.run_due()
    db.execute("UPDATE users SET call_time = '09:40' WHERE id = 1")
    clock.now = at(9, 6)
    dry = run_main([*args, "--dry-run"], env, clock)
    real = run_main(args, env, clock)
    assert real.summary["calls_skipped"] == 1 and real.summary["tasks_created"] == 0
    assert [line for line in dry.plan if "task_id" in line] == [], dry.plan


def test_a_dry_run_prints_no_call_an_earlier_run_could_not_tell_about(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """An earlier run recorded "cannot tell whether it ran": the real run does not ask
    again and makes no call, and the dry run prints no `-r1` for it."""
    env = job_env(db, dispatching)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO scheduled_calls (call_at, user_id, alternative, task_id, state, reason)"
            " VALUES (%s, 1, 0, %s, 'deleting', %s)",
            (at(9).astimezone(UTC).replace(tzinfo=None), tid(1, at(9)), main.CANNOT_TELL),
        )
    clock.now = at(9, 2)
    dry = run_main(["--changes", "--dry-run"], env, clock)
    real = run_main(["--changes"], env, clock)
    assert real.summary["calls_skipped"] == 1 and real.summary["tasks_created"] == 0
    assert [line for line in dry.plan if "task_id" in line] == [], dry.plan


def test_a_dry_run_prints_the_deletes_a_replacement_makes(
    db: Database, dispatching: FakeCloudTasks, clock: VirtualClock
) -> None:
    """An id left `deleting` while its call is ahead: the real run retires it, then gives
    the call the next id; the dry run prints both, the delete and the `-r1`."""
    env = job_env(db, dispatching)
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    clock.now = at(8, 1)
    assert run_main([], env, clock).code == 0
    db.execute("UPDATE scheduled_calls SET state = 'deleting' WHERE user_id = 1")
    clock.now = at(8, 5)
    dry = run_main(["--changes", "--dry-run"], env, clock)
    assert {"delete": tid(1, at(9)), "user_id": 1, "reason": main.REPLACED} in [
        {k: line.get(k) for k in ("delete", "user_id", "reason")} for line in dry.plan
    ], dry.plan
    assert tid(1, at(9), 1) in [line.get("task_id") for line in dry.plan]
    real = run_main(["--changes"], env, clock)
    assert real.summary["tasks_deleted"] == 1 and real.summary["tasks_created"] == 1
    assert dispatching.task_ids() == [tid(1, at(9), 1)]
