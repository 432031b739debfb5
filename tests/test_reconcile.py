"""Reconciling: each run removes the stale calls of its own shard and window.

Against the in-tests Cloud Tasks server, which has ListTasks with pagination, GetTask,
DeleteTask and tombstones that refuse a deleted name for an hour.
"""

from __future__ import annotations

import datetime as dt
import json

import grpc

import main
from tests.conftest import QUEUE_PATH, Database, job_env, run_at, run_together
from tests.fake_cloud_tasks import FakeCloudTasks

JST = dt.timezone(dt.timedelta(hours=9))
EIGHT = "2026-11-30T08:00:00+09:00"  # Monday; window 07:45-10:00


def at(hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, 30, hour, minute, tzinfo=JST)


def base(user_id: int, when: dt.datetime) -> str:
    return main.task_id(user_id, when.astimezone(dt.UTC))


def queue(server: FakeCloudTasks) -> list[str]:
    return server.task_ids()


def records(db: Database, user_id: int) -> list[tuple[dt.datetime, int, str, str | None]]:
    """The user's scheduled_calls rows: (instant, alternative, state, reason)."""
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT call_at, alternative, state, reason FROM scheduled_calls"
            " WHERE user_id = %s ORDER BY call_at, alternative",
            (user_id,),
        )
        return [(t.replace(tzinfo=dt.UTC), a, s, r) for t, a, s, r in cur.fetchall()]


def test_time_change_deactivation_weekday_removal_and_deletion(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert(
        [
            {"id": 1, "call_weekdays": "daily", "call_time": "09:00"},
            {"id": 2, "call_weekdays": "daily", "call_time": "09:10"},
            {"id": 3, "call_weekdays": "mon,tue", "call_time": "09:20"},
            {"id": 4, "call_weekdays": "daily", "call_time": "09:30"},
            {"id": 5, "call_weekdays": "daily", "call_time": "09:40"},
        ]
    )
    env = job_env(db, tasks_server)
    first = run_at(EIGHT, env)
    assert first.summary["tasks_created"] == 5
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 1")  # time changed
    db.execute("UPDATE users SET is_active = 0 WHERE id = 2")  # paused: in hospital
    db.execute("UPDATE users SET call_weekdays = 'tue' WHERE id = 3")  # Monday removed
    db.execute("DELETE FROM users WHERE id = 4")  # removed
    second = run_at(EIGHT, env)
    assert second.code == 0, second.stderr
    assert second.summary["tasks_deleted"] == 4
    assert second.summary["tasks_created"] == 1  # user 1 at 09:30
    assert second.summary["tasks_existing"] == 1  # user 5, untouched
    assert queue(tasks_server) == sorted([base(1, at(9, 30)), base(5, at(9, 40))])
    reasons = {
        line.split("user_id=")[1].split()[0]: line
        for line in second.stderr.splitlines()
        if "deleted a stale task" in line
    }
    assert "call time or weekday changed" in reasons["1"]
    assert "no call in the window" in reasons["2"]


def test_foreign_other_shard_and_out_of_window_tasks_survive(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 2, "call_weekdays": "daily", "call_time": "09:00"}])
    in_window = at(9, 15).timestamp()
    foreign = [
        f"{QUEUE_PATH}/tasks/someone-elses-task",
        f"{QUEUE_PATH}/tasks/deadbeef-anpi-2-20261130T001500Z",  # our shape, wrong hash
    ]
    stale_other_shard = f"{QUEUE_PATH}/tasks/{base(3, at(9, 15))}"  # user 3: shard 1 of 2
    stale_outside = f"{QUEUE_PATH}/tasks/{base(4, at(10, 30))}"  # after the window
    mine = f"{QUEUE_PATH}/tasks/{base(6, at(9, 15))}"  # user 6: shard 0, not in the table
    for name in [*foreign, stale_other_shard, mine]:
        tasks_server.add_task(name, in_window)
    tasks_server.add_task(stale_outside, at(10, 30).timestamp())
    env = job_env(db, tasks_server, CLOUD_RUN_TASK_INDEX="0", CLOUD_RUN_TASK_COUNT="2")
    result = run_at(EIGHT, env)
    assert result.code == 0, result.stderr
    assert result.summary["tasks_deleted"] == 1
    left = set(tasks_server.tasks)
    assert mine not in left
    assert {*foreign, stale_other_shard, stale_outside} <= left
    deletes = [r for r in tasks_server.rpcs if r.method == "DeleteTask"]
    assert [r.name for r in deletes] == [mine]


def test_nine_to_nine_thirty_and_back_ends_with_exactly_one_nine_oclock_task(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server)
    assert run_at(EIGHT, env).code == 0
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 1")
    assert run_at("2026-11-30T08:10:00+09:00", env).code == 0
    db.execute("UPDATE users SET call_time = '09:00' WHERE id = 1")
    third = run_at("2026-11-30T08:20:00+09:00", env)
    assert third.code == 0, third.stderr
    # The table says 09:00's base id was deleted: the call gets the next id, at once.
    r1 = main.task_id(1, at(9).astimezone(dt.UTC), alternative=1)
    assert queue(tasks_server) == [r1]
    [task] = tasks_server.tasks.values()
    assert task.schedule_time.timestamp() == at(9).timestamp()
    assert json.loads(task.http_request.body)["scheduled_at"] == "2026-11-30T09:00:00+09:00"
    assert records(db, 1) == [
        (at(9), 0, "deleted", "call time or weekday changed"),
        (at(9), 1, "planned", None),
        (at(9, 30), 0, "deleted", "call time or weekday changed"),
    ]
    assert "GetTask" not in [r.method for r in tasks_server.rpcs]  # confirmed deleted: no doubt
    # Later runs see the alternative on the queue: nothing new, nothing deleted.
    fourth = run_at("2026-11-30T08:30:00+09:00", env)
    assert (fourth.summary["tasks_created"], fourth.summary["tasks_existing"]) == (0, 1)
    assert fourth.summary["tasks_deleted"] == 0
    assert len(tasks_server.tasks) == 1


def test_a_past_call_that_already_ran_is_not_created_again(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server)
    assert run_at(EIGHT, env).code == 0
    assert tasks_server.run_due(at(9).timestamp())  # dispatched at 09:00
    late = run_at("2026-11-30T09:10:00+09:00", env)  # 09:00 is in the grace
    assert late.code == 0, late.stderr
    assert late.summary["tasks_existing"] == 1
    assert late.summary["tasks_created"] == 0
    assert tasks_server.created_names() == [f"{QUEUE_PATH}/tasks/{base(1, at(9))}"]
    assert len(tasks_server.tasks) == 0  # nothing new: no alternative, no probe left


def test_dry_run_prints_deletions_and_changes_nothing(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server)
    assert run_at(EIGHT, env).code == 0
    db.execute("UPDATE users SET call_time = '09:45' WHERE id = 1")
    before = list(tasks_server.rpcs)
    dry = run_at(EIGHT, env, "--dry-run")
    assert dry.code == 0, dry.stderr
    # The window is read in time order: the stale 09:00 is found before 09:45 is read.
    assert sorted(dry.plan, key=json.dumps) == sorted([
        {"task_id": base(1, at(9, 45)), "user_id": 1, "scheduled_at": "2026-11-30T09:45:00+09:00"},
        {"delete": base(1, at(9)), "user_id": 1, "reason": "call time or weekday changed"},
    ], key=json.dumps)
    new_rpcs = tasks_server.rpcs[len(before) :]
    assert {r.method for r in new_rpcs} == {"ListTasks"}  # read-only
    assert queue(tasks_server) == [base(1, at(9))]
    # Without a queue configured, a dry run only plans.
    plain = run_at(EIGHT, job_env(db), "--dry-run")
    assert [p.get("delete") for p in plain.plan] == [None]


def test_reconcile_off(db: Database, tasks_server: FakeCloudTasks) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server, RECONCILE="0")
    run_at(EIGHT, env)
    db.execute("UPDATE users SET is_active = 0")
    result = run_at(EIGHT, env)
    assert result.code == 0
    assert result.summary["tasks_deleted"] == 0
    assert len(tasks_server.tasks) == 1
    assert not [r for r in tasks_server.rpcs if r.method == "ListTasks"]


def test_an_invalid_row_keeps_its_tasks(db: Database, tasks_server: FakeCloudTasks) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server)
    run_at(EIGHT, env)
    db.execute("UPDATE users SET call_weekdays = 'mon-' WHERE id = 1")  # a typo
    result = run_at(EIGHT, env)
    assert result.summary["rows_invalid"] == 1
    assert result.summary["tasks_deleted"] == 0
    assert len(tasks_server.tasks) == 1
    assert "kept the tasks of an invalid row" in result.stderr


def test_a_second_pending_name_for_one_call_is_removed(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server)
    run_at(EIGHT, env)
    extra = main.task_id(1, at(9).astimezone(dt.UTC), alternative=1)
    tasks_server.add_task(f"{QUEUE_PATH}/tasks/{extra}", at(9).timestamp())
    result = run_at(EIGHT, env)
    assert result.summary["tasks_deleted"] == 1
    assert queue(tasks_server) == [base(1, at(9))]


def test_listing_denied_still_enqueues_and_reports(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    tasks_server.faults.list_error = grpc.StatusCode.PERMISSION_DENIED
    result = run_at(EIGHT, job_env(db, tasks_server))
    assert result.code == 1
    assert result.summary["tasks_created"] == 1
    assert "cannot list the queue" in result.summary["error"]


def test_pagination_over_many_tasks(db: Database, tasks_server: FakeCloudTasks) -> None:
    # 2,500 of this job's tasks on the queue: three pages of 1,000.
    for user_id in range(1, 2501):
        tasks_server.add_task(f"{QUEUE_PATH}/tasks/{base(user_id, at(9))}", at(9).timestamp())
    db.insert([{"id": i, "call_weekdays": "daily", "call_time": "09:00"} for i in range(1, 2401)])
    result = run_at(EIGHT, job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    assert result.summary["tasks_existing"] == 2400  # known from the listing
    assert result.summary["tasks_deleted"] == 100  # users 2401-2500 are not in the table
    assert len([r for r in tasks_server.rpcs if r.method == "ListTasks"]) == 3
    assert not [r for r in tasks_server.rpcs if r.method == "CreateTask"]


def test_two_shards_reconciling_at_once_leave_the_union_correct(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert(
        [{"id": i, "call_weekdays": "daily", "call_time": f"09:{i % 60:02d}"} for i in range(1, 81)]
    )
    env = job_env(db, tasks_server)
    assert run_at(EIGHT, env).code == 0
    db.execute("UPDATE users SET call_time = ADDTIME(call_time, '00:00:30') WHERE id % 3 = 0")
    db.execute("UPDATE users SET is_active = 0 WHERE id % 5 = 0")
    expected = sorted(p["task_id"] for p in run_at(EIGHT, job_env(db), "--dry-run").plan)
    results = run_together(
        *(
            (
                ["--now", EIGHT],
                job_env(db, tasks_server, CLOUD_RUN_TASK_INDEX=str(i), CLOUD_RUN_TASK_COUNT="2"),
            )
            for i in range(2)
        )
    )
    assert [r.code for r in results] == [0, 0], [r.stderr for r in results]
    assert queue(tasks_server) == expected
    stale = {i for i in range(1, 81) if i % 3 == 0 or i % 5 == 0}
    assert sum(r.summary["tasks_deleted"] for r in results) == len(stale)


def test_a_late_call_that_never_ran_is_created_once_under_its_base_id(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    late = run_at("2026-11-30T09:10:00+09:00", job_env(db, tasks_server))
    assert late.code == 0, late.stderr
    assert late.summary["tasks_created"] == 1
    assert queue(tasks_server) == [base(1, at(9))]  # no probes, no stand-ins
    assert [r.method for r in tasks_server.rpcs] == ["ListTasks", "CreateTask"]
    assert records(db, 1) == [(at(9), 0, "planned", None)]
    [task] = tasks_server.tasks.values()
    assert task.schedule_time.timestamp() == at(9).timestamp()
    assert json.loads(task.http_request.body)["phone_number"] == "+819012345678"


def test_a_late_run_does_not_repeat_a_call_that_ran_under_an_alternative_id(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    """The hole the spec's rules leave open: 9:00 deleted, recreated as -r1, -r1 runs, the
    original name's hour passes, and a late run still has 9:00 in its grace window."""
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server)
    assert run_at(EIGHT, env).code == 0
    db.execute("UPDATE users SET call_time = '09:30' WHERE id = 1")
    assert run_at("2026-11-30T08:10:00+09:00", env).code == 0  # deletes 9:00
    db.execute("UPDATE users SET call_time = '09:00' WHERE id = 1")
    assert run_at("2026-11-30T08:20:00+09:00", env).code == 0  # 9:00 as -r1
    fired = tasks_server.run_due(at(9).timestamp())
    assert [n.rsplit("/", 1)[1] for n in fired] == [
        main.task_id(1, at(9).astimezone(dt.UTC), alternative=1)
    ]
    del tasks_server.tombstones[f"{QUEUE_PATH}/tasks/{base(1, at(9))}"]  # its hour is over
    late = run_at("2026-11-30T09:10:00+09:00", env)
    assert late.code == 0, late.stderr
    assert (late.summary["tasks_created"], late.summary["tasks_existing"]) == (0, 1)
    assert tasks_server.tasks == {}  # no second 9:00 call


def test_a_late_create_whose_answer_was_lost_is_one_task(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    tasks_server.faults.timeout_after_store = 1  # stored, then the answer is lost
    late = run_at("2026-11-30T09:10:00+09:00", job_env(db, tasks_server))
    assert late.code == 0, late.stderr
    assert late.summary["tasks_existing"] == 1  # the retry met its own task
    assert tasks_server.created_names() == [f"{QUEUE_PATH}/tasks/{base(1, at(9))}"]
