"""One queue per shard (QUEUE_PER_SHARD=1), and changing TASK_COUNT within one window.

Each run is the real job, in-process, against the real MariaDB and the in-tests Cloud
Tasks server, which keeps every queue apart (a task name is unique per queue) and, on a
virtual clock, runs each task when its time comes.
"""

from __future__ import annotations

import collections
import datetime as dt

import pytest

import main
from tests.conftest import PROJECT, Database, job_env, run_at, run_together
from tests.fake_cloud_tasks import FakeCloudTasks

JST = dt.timezone(dt.timedelta(hours=9))
UTC = dt.UTC
QUEUES = f"projects/{PROJECT}/locations/asia-northeast1/queues/"


def at(hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, 30, hour, minute, tzinfo=JST)  # a Monday


def queue_of(name: str) -> str:
    """`anpi-call-queue-2` of a full task or queue name."""
    return name.removeprefix(QUEUES).split("/", 1)[0]


def shard_env(db: Database, server: FakeCloudTasks, index: int, count: int) -> dict[str, str]:
    return job_env(
        db,
        server,
        CLOUD_RUN_TASK_INDEX=str(index),
        CLOUD_RUN_TASK_COUNT=str(count),
        QUEUE_PER_SHARD="1",
        ENQUEUE_MAX_PER_SECOND="0",
        LOG_LEVEL="WARNING",
    )


Job = tuple[list[str], dict[str, str]]


def start_shards(db: Database, server: FakeCloudTasks, count: int, now: dt.datetime) -> list[Job]:
    """One execution of `count` shards (run by `finish`, with any other started beside it)."""
    return [(["--now", now.isoformat()], shard_env(db, server, i, count)) for i in range(count)]


def finish(jobs: list[Job]) -> None:
    """Run the executions' shards at once; Cloud Run retries a shard that exits 1 (a run
    of the other shard count was still running), here at once, until it exits 0."""
    for _ in range(4):
        results = run_together(*jobs)
        jobs = [job for job, result in zip(jobs, results, strict=True) if result.code != 0]
        assert all("another shard count" in r.summary["error"] for r in results if r.code), [
            r.stderr for r in results if r.code
        ]
        if not jobs:
            return
    raise AssertionError(f"{len(jobs)} shard runs never completed")


def test_each_shard_creates_lists_and_reconciles_only_its_own_queue(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert(
        [{"id": i, "call_weekdays": "daily", "call_time": f"09:{i % 60:02d}"} for i in range(1, 61)]
    )
    now = at(8).isoformat()

    def plan() -> list[str]:
        return sorted(p["task_id"] for p in run_at(now, job_env(db), "--dry-run").plan)

    def run_each_shard() -> None:
        for i in range(4):
            before = len(tasks_server.rpcs)
            result = run_at(now, shard_env(db, tasks_server, i, 4))
            assert result.code == 0, result.stderr
            touched = {queue_of(r.name) for r in tasks_server.rpcs[before:]}
            assert touched == {f"anpi-call-queue-{i}"}

    run_each_shard()
    assert tasks_server.task_ids() == plan()
    db.execute("UPDATE users SET call_time = ADDTIME(call_time, '00:00:30') WHERE id % 3 = 0")
    db.execute("UPDATE users SET is_active = 0 WHERE id % 7 = 0")
    run_each_shard()  # lists its queue, deletes what changed there, creates the new
    assert any(r.method == "DeleteTask" for r in tasks_server.rpcs)
    by_queue = collections.defaultdict(set)
    for name in tasks_server.tasks:
        task = main.parse_task_id(name.rsplit("/", 1)[1])
        assert task is not None
        by_queue[queue_of(name)].add(task.user_id)
    for queue, users in by_queue.items():
        assert {u % 4 for u in users} == {int(queue.rsplit("-", 1)[1])}, queue
    assert tasks_server.task_ids() == plan()  # the union is the unsharded plan
    lists = [r for r in tasks_server.rpcs if r.method == "ListTasks"]
    assert len(lists) == 8  # one page per shard per run, each of its own queue only


def executed(server: FakeCloudTasks) -> collections.Counter[tuple[int, dt.datetime]]:
    return collections.Counter(
        (e.body["user_id"], dt.datetime.fromisoformat(e.body["scheduled_at"]))
        for e in server.executions
    )


class Clock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now.timestamp()


@pytest.mark.parametrize("counts", [(4, 3, 3, 4), (3, 4, 4, 3)])
def test_resharding_within_one_window_calls_everyone_exactly_once(
    db: Database, counts: tuple[int, int, int, int]
) -> None:
    """Hourly runs at 08:00 (first count), 09:00 (second count, overlapping a retry of
    the whole first-count execution), 10:00 and 11:00, with users changing their time
    and leaving between runs, a new user added, and a first-count run that died after
    recording a call and before creating it. Every call of 08:05-11:55 executes exactly
    once, the stale ones never, the leftover queue's tasks fire from there."""
    clock = Clock(at(8))
    server = FakeCloudTasks(clock=clock, dispatch=True).start()
    minutes = {i: 5 + (i * 7) % 230 for i in range(1, 61)}  # 08:05 ... 11:55

    def time_of(minute: int) -> str:
        return f"{8 + minute // 60:02d}:{minute % 60:02d}:00"

    def advance(to: dt.datetime) -> None:
        clock.now = to
        server.run_due()

    # user -> [(from, minute or None)]: the setting in effect from that instant.
    history: dict[int, list[tuple[dt.datetime, int | None]]] = {}

    def set_user(user_id: int, minute: int | None) -> None:
        if minute is None:
            db.execute("UPDATE users SET is_active = 0 WHERE id = %s", (user_id,))
        else:
            db.execute(
                "REPLACE INTO users (id, phone_number, call_weekdays, call_time)"
                " VALUES (%s, %s, 'daily', %s)",
                (user_id, f"+81901{user_id:07d}", time_of(minute)),
            )
        history.setdefault(user_id, []).append((clock.now, minute))

    try:
        first, second, third, fourth = counts
        for user_id, minute in minutes.items():
            set_user(user_id, minute)
        finish(start_shards(db, server, first, at(8)))
        advance(at(8, 30))
        # Changes that only the second count's runs can act on: old and new times
        # after 09:00, so the old tasks sit on the first count's queues.
        for user_id in range(6, 61, 6):
            if 65 <= minutes[user_id] < 230:
                set_user(user_id, minutes[user_id] + 3)
        for user_id in range(10, 61, 10):
            if minutes[user_id] >= 65:
                set_user(user_id, None)
        # A first-count run died after recording user 101's 09:40 call on its queue,
        # before creating it.
        set_user(101, 100)
        db.execute(
            "INSERT INTO scheduled_calls (call_at, user_id, alternative, task_id, state, queue)"
            " VALUES (%s, 101, 0, %s, 'planned', %s)",
            (
                at(9, 40).astimezone(UTC).replace(tzinfo=None),
                main.task_id(101, at(9, 40).astimezone(UTC)),
                f"anpi-call-queue-{101 % first}",
            ),
        )
        set_user(102, 110)  # new, no record: both counts may plan it at once
        advance(at(9))
        finish(start_shards(db, server, first, at(9)) + start_shards(db, server, second, at(9)))
        advance(at(9, 30))
        finish(start_shards(db, server, third, at(10)))
        advance(at(10, 10))
        # Changes that only the fourth count's runs can act on, on the third's queues.
        for user_id in range(1, 61, 2):
            if minutes[user_id] >= 190 and user_id % 10:
                set_user(user_id, minutes[user_id] - 4 if user_id % 3 else None)
        advance(at(11))
        finish(start_shards(db, server, fourth, at(11)))
        advance(at(14))

        expected = set()
        for user_id, changes in history.items():
            for minute in {m for _, m in changes if m is not None}:
                instant = at(8) + dt.timedelta(minutes=minute)
                in_effect = [m for since, m in changes if since <= instant][-1]
                if in_effect == minute:
                    expected.add((user_id, instant))
        calls = executed(server)
        doubles = {call: n for call, n in calls.items() if n > 1}
        assert not doubles
        assert set(calls) == expected, (
            f"lost {sorted(expected - set(calls))}, stale {sorted(set(calls) - expected)}"
        )
        assert not server.tasks
        queues = {queue_of(name) for name in server.stored}
        assert len(queues) == max(counts)
        # The leftover queue's tasks fired from there, after the count that had it.
        leftover = f"anpi-call-queue-{max(counts) - 1}"
        ran = {e.task_id: e for e in server.executions}
        since = (at(9) if counts[0] == 4 else at(11)).timestamp()
        fired = [
            n for n in server.stored
            if queue_of(n) == leftover and n.rsplit("/", 1)[1] in ran
            and ran[n.rsplit("/", 1)[1]].at > since
        ]  # fmt: skip
        assert fired
    finally:
        server.stop()
