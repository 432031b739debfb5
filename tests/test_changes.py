"""Quick runs (`--changes`): a change reaches the queue within the minute; and every run
names the calls no complete run covered (`calls_missed`).

The job runs in-process on a virtual clock that the dispatching in-tests Cloud Tasks
server shares, so each test ends by letting the day run and counting who was called.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json

import pymysql
import pytest

import main
from tests.conftest import (
    QUEUE_PATH,
    Database,
    JobResult,
    VirtualClock,
    at,
    job_env,
    run_main,
    tid,
)
from tests.fake_cloud_tasks import FakeCloudTasks

UTC = dt.UTC


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(at(9))


@pytest.fixture
def server(dispatching: FakeCloudTasks) -> FakeCloudTasks:
    return dispatching


def hourly(db: Database, server: FakeCloudTasks, clock: VirtualClock, **env: str) -> JobResult:
    result = run_main([], job_env(db, server, **env), clock)
    assert result.code == 0, result.stderr
    return result


def quick(db: Database, server: FakeCloudTasks, clock: VirtualClock, **env: str) -> JobResult:
    return run_main(["--changes"], job_env(db, server, **env), clock)


def called(server: FakeCloudTasks) -> collections.Counter[tuple[int, str]]:
    return collections.Counter(
        (e.body["user_id"], e.body["scheduled_at"]) for e in server.executions
    )


def user(db: Database, user_id: int, when: str, **extra: object) -> None:
    db.insert(
        [
            {
                "id": user_id,
                "call_weekdays": "daily",
                "call_time": when,
                "phone_number": f"+81901{user_id:07d}",
                **extra,
            }
        ]
    )


# -- a change at 09:10 for a 09:40 call, then a quick run at 09:11 -------------------------


def test_changes_made_at_0910_reach_the_queue_by_the_quick_run_at_0911(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    user(db, 1, "10:50")  # moved earlier, to 09:40
    user(db, 2, "09:40")  # paused for today
    user(db, 4, "09:40")  # deleted
    user(db, 5, "09:40")  # deactivated
    db.insert([{"id": 6, "call_weekdays": "月水金", "call_time": "09:40"}])  # Monday removed
    user(db, 7, "09:40")  # untouched: the control
    hourly(db, server, clock)  # 09:00: everything up to 11:00 is queued
    assert len(server.tasks) == 6

    clock.now = at(9, 10)
    db.execute("UPDATE users SET call_time = '09:40' WHERE id = 1")
    db.execute(
        "UPDATE users SET pause_from = '2026-11-30', pause_until = '2026-11-30' WHERE id = 2"
    )
    user(db, 3, "09:40")  # a new person
    db.execute("DELETE FROM users WHERE id = 4")
    db.execute("UPDATE users SET is_active = 0 WHERE id = 5")
    db.execute("UPDATE users SET call_weekdays = '水金' WHERE id = 6")

    clock.now = at(9, 11)
    result = quick(db, server, clock)
    assert result.code == 0, result.stderr
    assert result.summary["changes"] is True
    assert (result.summary["tasks_created"], result.summary["tasks_deleted"]) == (2, 5)
    assert [r.method for r in server.rpcs].count("ListTasks") == 1  # the hourly run's only

    clock.now = at(12)
    server.run_due()
    assert called(server) == {
        (1, "2026-11-30T09:40:00+09:00"): 1,
        (3, "2026-11-30T09:40:00+09:00"): 1,
        (7, "2026-11-30T09:40:00+09:00"): 1,
    }


def test_a_quick_run_with_nothing_changed_makes_no_cloud_tasks_call(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    for user_id, when in enumerate(["08:50", "09:00:30", "09:40", "10:15", "10:59"], start=1):
        user(db, user_id, when)
    hourly(db, server, clock)
    before = len(server.rpcs)
    for minute in (1, 2, 30):
        clock.now = at(9, minute)
        server.run_due()
        result = quick(db, server, clock)
        assert result.code == 0, result.stderr
        assert result.summary["tasks_existing"] == result.summary["calls_planned"] > 0
    assert server.rpcs[before:] == []


def test_a_quick_run_leaves_calls_past_the_hourly_runs_horizon_to_the_next_hourly_run(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    user(db, 1, "10:30")
    hourly(db, server, clock)  # 09:00: its window ends at 11:00
    user(db, 2, "11:05")  # a new person, called after the horizon
    clock.now = at(9, 11)
    result = quick(db, server, clock)
    assert result.code == 0, result.stderr
    assert result.summary["window_end"] == at(11).astimezone(UTC).isoformat()
    assert result.summary["calls_planned"] == 1 and server.task_ids() == [tid(1, at(10, 30))]
    clock.now = at(10)
    hourly(db, server, clock)
    assert tid(2, at(11, 5)) in server.task_ids()


def test_a_quick_run_on_a_new_database_plans_the_whole_window(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    user(db, 1, "10:30")
    result = quick(db, server, clock)
    assert result.code == 0, result.stderr
    assert result.summary["tasks_created"] == 1


def test_a_recorded_id_whose_create_was_never_confirmed_is_created_by_the_quick_run(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    """A run died between recording an id and creating its task: the next run, quick or
    hourly, creates it."""
    user(db, 1, "09:40")
    hourly(db, server, clock)
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("UPDATE scheduled_calls SET created_at = NULL")
    server.tasks.clear()  # the create never happened
    clock.now = at(9, 1)
    result = quick(db, server, clock)
    assert result.code == 0, result.stderr
    assert result.summary["tasks_created"] == 1
    assert [r.method for r in server.rpcs[-1:]] == ["CreateTask"]
    clock.now = at(9, 2)
    assert quick(db, server, clock).summary["tasks_existing"] == 1  # confirmed now
    assert [r.method for r in server.rpcs[-1:]] == ["CreateTask"]


def test_a_quick_run_that_finds_the_lock_held_skips_and_exits_0(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    user(db, 1, "09:40")
    env = job_env(db, server, RUN_LOCK_WAIT_SECONDS="1")
    holder = db.connect()
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (main.run_lock_name(main.Config.from_env(env).db_name, main.Config.from_env(env).shard),))
        result = run_main(["--changes"], env, clock)
        held = run_main([], env, clock)  # an hourly run waits, then fails (exit 1)
    finally:
        with contextlib.suppress(pymysql.err.Error):
            holder.close()
    assert result.code == 0, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if "skipped" in ln]
    assert "INFO" in line and "quick run skipped" in line
    assert result.summary["calls_planned"] == 0 and server.rpcs == []
    assert held.code == 1 and "still held the run lock after 1s" in held.summary["error"]
    clock.now = at(9, 1)
    assert quick(db, server, clock).summary["tasks_created"] == 1  # the next one catches up


def test_a_quick_dry_run_prints_what_it_would_change(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    user(db, 1, "09:40")
    user(db, 2, "09:50")
    hourly(db, server, clock)
    db.execute("UPDATE users SET call_time = '09:45' WHERE id = 1")
    clock.now = at(9, 11)
    before = len(server.rpcs)
    result = run_main(["--changes", "--dry-run"], job_env(db, server), clock)
    assert result.code == 0, result.stderr
    assert {json.dumps(p, sort_keys=True) for p in result.plan} == {
        json.dumps(p, sort_keys=True)
        for p in [
            {
                "task_id": tid(1, at(9, 45)),
                "user_id": 1,
                "scheduled_at": "2026-11-30T09:45:00+09:00",
            },
            {
                "task_id": tid(2, at(9, 50)),
                "user_id": 2,
                "scheduled_at": "2026-11-30T09:50:00+09:00",
            },
            {"delete": tid(1, at(9, 40)), "user_id": 1, "reason": "call time or weekday changed"},
        ]
    }
    assert server.rpcs[before:] == []


# -- missed calls are named ----------------------------------------------------------------


def record_call(db: Database, user_id: int, when: dt.datetime, created: bool) -> None:
    """A scheduled_calls row as a run leaves it: created confirmed, or only recorded."""
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO scheduled_calls (call_at, user_id, alternative, task_id, state, created_at)"
            " VALUES (%s, %s, 0, %s, 'planned', %s)",
            (
                when.astimezone(UTC).replace(tzinfo=None),
                user_id,
                tid(user_id, when),
                when.astimezone(UTC).replace(tzinfo=None) if created else None,
            ),
        )


def test_after_an_outage_the_first_run_names_every_call_no_complete_run_covered(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    """Complete runs at 04:00 and 05:00, then none until 11:00: the 11:00 run names the
    calls of 07:00-10:45 that the table wants and no run surely placed, each once."""
    user(db, 1, "06:30")  # covered by the 05:00 run
    user(db, 2, "07:00")  # missed
    user(db, 3, "08:15")  # missed
    user(db, 4, "10:44:59")  # missed
    user(db, 5, "10:45")  # in the 11:00 run's own grace: created late, not missed
    user(db, 6, "09:00", pause_from="2026-11-30")  # paused: not wanted
    user(db, 7, "09:30", is_active=0)  # inactive: not wanted
    user(db, 8, "09:30", phone_number="03-1234")  # invalid: reported as such, not as missed
    user(db, 9, "08:00")  # placed by a run that did not complete: not named
    user(db, 10, "08:30")  # recorded by such a run, its create never confirmed: named
    clock.now = at(4)
    first = hourly(db, server, clock)
    assert first.summary["calls_missed"] == 0  # the first run on a new database audits nothing
    clock.now = at(5)
    assert hourly(db, server, clock).summary["calls_missed"] == 0
    record_call(db, 9, at(8), created=True)
    record_call(db, 10, at(8, 30), created=False)
    clock.now = at(11)
    server.run_due()
    late = hourly(db, server, clock)
    named = [ln for ln in late.stderr.splitlines() if "call missed" in ln]
    assert late.summary["calls_missed"] == len(named) == 4
    assert all("ERROR" in ln and "no complete run covered it" in ln for ln in named)
    assert sorted(ln.split("user_id=")[1].split()[0] for ln in named) == ["10", "2", "3", "4"]
    by_user = {ln.split("user_id=")[1].split()[0]: ln for ln in named}
    assert (
        "scheduled_at=2026-11-30T07:00:00+09:00" in by_user["2"] and "phone=***0002" in by_user["2"]
    )
    assert f"unconfirmed_task_id={tid(10, at(8, 30))}" in by_user["10"]
    assert "unconfirmed_task_id" not in by_user["2"]
    assert "+819010000002" not in late.stderr
    assert late.code == 0
    again = hourly(db, server, VirtualClock(at(11, 1)))
    assert again.summary["calls_missed"] == 0  # named once


def test_a_call_of_a_row_already_called_that_day_is_not_named(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    user(db, 1, "07:00")
    clock.now = at(6, 30)
    hourly(db, server, clock)  # 07:00 is created, and runs
    db.execute("UPDATE users SET call_time = '09:00' WHERE id = 1")  # then moved later
    clock.now = at(11)
    server.run_due()
    assert hourly(db, server, clock).summary["calls_missed"] == 0


def test_every_complete_run_notes_its_window_and_quick_runs_cover_too(
    db: Database, server: FakeCloudTasks, clock: VirtualClock
) -> None:
    user(db, 1, "11:30")
    hourly(db, server, clock)  # 09:00: [08:45, 11:00)
    for minute in range(1, 4):
        clock.now = at(9, minute)
        assert quick(db, server, clock).code == 0
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT kind, window_start, window_end, complete FROM job_runs ORDER BY id")
        rows = cur.fetchall()
    assert [(k, c) for k, _, _, c in rows] == [("hourly", 1)] + [("changes", 1)] * 3
    assert rows[1][2] == at(11).astimezone(UTC).replace(tzinfo=None)  # up to the horizon
    # The hourly runs stop; quick runs go on, but a call past every window is missed.
    clock.now = at(11, 46)
    result = quick(db, server, clock)
    assert result.summary["calls_missed"] == 1
    assert f"{QUEUE_PATH}/tasks/{tid(1, at(11, 30))}" not in server.created_names()
