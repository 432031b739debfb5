"""Throughput features keep correctness: concurrency, the rate cap, shards, the index.

Speed itself is measured by bench.py, not asserted here; the only timing below is a
generous lower bound for the rate cap.
"""

from __future__ import annotations

import time

import grpc
import pytest

import main
from tests.conftest import Database, job_env, run_at, run_together
from tests.fake_cloud_tasks import FakeCloudTasks

NOW = "2026-11-30T09:00:00+09:00"


def spread_users(db: Database, count: int) -> None:
    """Users with calls spread over 08:45-11:00 JST in several zones and formats."""
    zones = [None, "Asia/Tokyo", "", None]
    weekdays = ["daily", "月水金", "平日", "mon-fri", "1,3,5"]
    db.insert(
        [
            {
                "id": i,
                "call_weekdays": weekdays[i % len(weekdays)],
                "call_time": f"{8 + (45 + i) // 60 % 3:02d}:{(45 + i) % 60:02d}:{i % 60:02d}",
                "timezone": zones[i % len(zones)],
                "phone_number": f"+81901{i:07d}",
            }
            for i in range(1, count + 1)
        ]
    )


def test_concurrent_enqueue_gives_the_serial_result_even_with_faults(db: Database) -> None:
    spread_users(db, 80)
    results = {}
    for concurrency in ("1", "16"):
        db.execute("DELETE FROM scheduled_calls")  # both start from the same record
        server = FakeCloudTasks(seed=7).start()
        server.faults.fail_fraction = 0.2
        server.faults.timeout_after_store = 5
        server.faults.permanent = {
            10: grpc.StatusCode.PERMISSION_DENIED,
            77: grpc.StatusCode.INVALID_ARGUMENT,
        }
        try:
            result = run_at(NOW, job_env(db, server, ENQUEUE_CONCURRENCY=concurrency))
            assert result.code == 1  # the two permanent failures
            results[concurrency] = (result.summary, server.task_ids(), server.created_names())
        finally:
            server.stop()
    (serial, serial_ids, _), (parallel, parallel_ids, parallel_names) = (
        results["1"],
        results["16"],
    )
    assert parallel_ids == serial_ids
    assert len(parallel_names) == len(set(parallel_names))
    for key in ("calls_planned", "tasks_failed", "tasks_not_attempted", "rows_invalid"):
        assert parallel[key] == serial[key], key
    # Which creates time out after storing depends on order; the sum does not.
    assert (
        parallel["tasks_created"] + parallel["tasks_existing"]
        == serial["tasks_created"] + serial["tasks_existing"]
        == serial["calls_planned"] - 2
    )
    assert serial["tasks_failed"] == 2


def test_four_shards_at_once_make_the_unsharded_plan_without_overlap(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    spread_users(db, 200)
    whole = run_at(NOW, job_env(db), "--dry-run")
    expected = sorted(p["task_id"] for p in whole.plan)
    assert len(expected) > 100
    results = run_together(
        *(
            (
                ["--now", NOW],
                job_env(db, tasks_server, CLOUD_RUN_TASK_INDEX=str(i), CLOUD_RUN_TASK_COUNT="4"),
            )
            for i in range(4)
        )
    )
    assert [r.code for r in results] == [0, 0, 0, 0]
    names = tasks_server.created_names()
    assert len(names) == len(set(names))  # no overlap
    # Calls already due (08:45-09:00) carry the late id (-r4); each call is there once.
    on_queue = [main.parse_task_id(t) for t in tasks_server.task_ids()]
    assert sorted(main.task_id(*n.key) for n in on_queue if n is not None) == expected

    def user_of(task_id: str) -> int:
        return int(main.TASK_ID_RE.fullmatch(task_id)[2])  # type: ignore[index]

    for index, result in enumerate(results):
        assert result.summary["shard"] == f"{index}/4"
        mine = [t for t in expected if user_of(t) % 4 == index]
        assert result.summary["tasks_created"] == len(mine) > 0


def test_rate_cap_holds(db: Database, tasks_server: FakeCloudTasks) -> None:
    db.insert([{"id": i, "call_weekdays": "daily", "call_time": "09:30"} for i in range(1, 101)])
    started = time.monotonic()
    result = run_at(NOW, job_env(db, tasks_server, ENQUEUE_MAX_PER_SECOND="50"))
    elapsed = time.monotonic() - started
    assert result.code == 0, result.stderr
    assert result.summary["tasks_created"] == 100
    assert elapsed >= 1.9  # 100 creates at 50/s: at least ~2 s (a lower bound only)


def test_rate_limiter_spaces_starts() -> None:
    clock = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    limiter = main.RateLimiter(4.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(9):
        limiter.wait()
    assert clock[0] == pytest.approx(102.0)  # 9 starts at 4/s: the last at t+2 s
    assert slept == pytest.approx([0.25] * 8)
    unlimited = main.RateLimiter(0, clock=lambda: 0.0, sleep=sleep)
    unlimited.wait()
    assert len(slept) == 8


@pytest.mark.parametrize("zone", [None, "America/New_York"])
def test_every_zone_query_is_an_index_range_scan(db: Database, zone: str | None) -> None:
    db.insert(
        [
            {"id": i, "call_weekdays": "daily", "call_time": f"{i % 24:02d}:{i % 60:02d}",
             "timezone": [None, "America/New_York", "Asia/Tokyo"][i % 3]}
            for i in range(3000)
        ]
    )  # fmt: skip
    cfg = main.Config.from_env(
        job_env(db, CLOUD_RUN_TASK_COUNT="4", CLOUD_RUN_TASK_INDEX="1"), dry_run=True
    )
    window = main.Window.around(main.parse_now(NOW, cfg.default_timezone), cfg.grace, cfg.lookahead)
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("ANALYZE TABLE users")
        cur.execute(
            "EXPLAIN " + main.zone_query(zone, cfg, window)[0],
            main.zone_query(zone, cfg, window)[1],
        )
        columns = [d[0] for d in cur.description]
        [plan] = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
    assert plan["key"] == "idx_users_due"
    assert plan["type"] == "range"
    assert "Using index" in plan["Extra"]  # covering: the table rows are never visited
