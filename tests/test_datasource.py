"""Data source against the real MariaDB: decoding, prefiltering, sharding."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import main
from main import Config, RunSummary, Window
from tests.conftest import SCHEMA, Database, create_database, drop_database, job_env

UTC = dt.UTC
NOW = dt.datetime(2026, 11, 30, 0, 0, tzinfo=UTC)  # Monday 09:00 JST


def config(db: Database, **extra: str) -> Config:
    return Config.from_env(job_env(db, **extra), dry_run=True)


def planned(
    db: Database, now: dt.datetime = NOW, **extra: str
) -> tuple[list[main.Call], RunSummary]:
    cfg = config(db, **extra)
    window = Window.around(now, cfg.grace, cfg.lookahead)
    summary = RunSummary()
    conn = main.connect(cfg, streaming=True)
    try:
        with main.Snapshot(conn, cfg) as snapshot:
            planner = main.Planner(cfg, window, summary, threading.Event())
            plans = planner.plan(snapshot.rows(window), window)
            calls = [call for user in plans for call in user.calls]
    finally:
        conn.close()
    return calls, summary


def full_scan(db: Database, now: dt.datetime = NOW, **extra: str) -> list[main.Call]:
    """The reference: every row of the table, planned in Python alone."""
    cfg = config(db, **extra)
    window = Window.around(now, cfg.grace, cfg.lookahead)
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT {main.USER_COLUMNS} FROM users WHERE is_active = 1")
        rows = [main.UserRow(*r) for r in cur.fetchall()]
    calls = []
    for row in rows:
        try:
            setting = main.parse_row(row, cfg.default_timezone)
        except main.InvalidRow:
            continue
        if setting is not None and row.id % cfg.task_count == cfg.task_index:
            calls.extend(main.plan_calls(setting, window))
    return calls


def ids(calls: list[main.Call]) -> list[str]:
    return sorted(c.task_id() for c in calls)


def test_time_column_decoding_nulls_and_inactive(db: Database) -> None:
    db.insert(
        [
            {"id": 1, "call_weekdays": "月", "call_time": "09:30:00"},
            {"id": 2, "call_weekdays": "daily", "call_time": None},
            {"id": 3, "call_weekdays": None, "call_time": "09:00"},
            {"id": 4, "call_weekdays": "daily", "call_time": "09:00", "is_active": 0},
            {"id": 5, "call_weekdays": "daily", "call_time": "10:00", "timezone": None},
            {"id": 6, "call_weekdays": "daily", "call_time": "10:00", "timezone": ""},
            {"id": 7, "call_weekdays": "daily", "call_time": "-01:00:00"},
            {"id": 8, "call_weekdays": "daily", "call_time": "838:59:59"},
            {"id": 9, "call_weekdays": "daily", "call_time": "24:00:00"},
            {"id": 10, "call_weekdays": "daily", "call_time": "10:00", "timezone": "Mars/Olympus"},
        ]
    )
    calls, summary = planned(db)
    assert [(c.user_id, c.scheduled_at) for c in sorted(calls, key=lambda c: c.user_id)] == [
        (1, "2026-11-30T09:30:00+09:00"),
        (5, "2026-11-30T10:00:00+09:00"),
        (6, "2026-11-30T10:00:00+09:00"),
    ]
    # Out-of-day TIME values and the unknown zone are read and reported, not dropped.
    assert summary.rows_invalid == 4
    assert summary.calls_planned == 3


def test_text_call_times_in_a_varchar_column() -> None:
    db = create_database(SCHEMA.replace("call_time     TIME", "call_time     VARCHAR(16)"))
    try:
        db.insert(
            [
                {"id": 1, "call_weekdays": "daily", "call_time": "09:30"},
                {"id": 2, "call_weekdays": "daily", "call_time": "9:45"},
                {"id": 3, "call_weekdays": "daily", "call_time": "10:15:30"},
                {"id": 4, "call_weekdays": "daily", "call_time": "23:00"},
                {"id": 5, "call_weekdays": "daily", "call_time": "24:00"},
            ]
        )
        calls, summary = planned(db)
        assert sorted((c.user_id, c.scheduled_at) for c in calls) == [
            (1, "2026-11-30T09:30:00+09:00"),
            (2, "2026-11-30T09:45:00+09:00"),
            (3, "2026-11-30T10:15:30+09:00"),
        ]
        assert summary.rows_invalid == 1  # 24:00
    finally:
        drop_database(db)


def test_unicode_weekdays_round_trip(db: Database) -> None:
    db.insert([{"id": 1, "call_weekdays": "月曜日〜金曜日", "call_time": "09:00"}])
    calls, _ = planned(db)
    assert [c.user_id for c in calls] == [1]


def test_sql_uses_the_index(db: Database) -> None:
    db.insert(
        [{"id": i, "call_weekdays": "daily", "call_time": f"{i % 24:02d}:00"} for i in range(200)]
    )
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("ANALYZE TABLE users")
        cfg = config(db)
        window = Window.around(NOW, cfg.grace, cfg.lookahead)
        sql, args = main.zone_query(None, cfg, window)
        cur.execute("EXPLAIN " + sql, args)
        columns = [d[0] for d in cur.description]
        plan = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
    assert plan[0]["key"] == "idx_users_due", plan
    assert plan[0]["type"] == "range", plan


# -- properties --------------------------------------------------------------------------

ZONES = [
    None,
    "",
    "Asia/Tokyo",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "Nope/Zone",
]
WEEKDAYS = [None, "", "daily", "平日", "月水金", "sat-mon", "1,3,5", "土日", "mon-", "0-7"]

rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "call_weekdays": st.sampled_from(WEEKDAYS),
            "call_time": st.one_of(
                st.none(),
                st.times().map(lambda t: t.strftime("%H:%M:%S")),
                st.sampled_from(["-01:00:00", "24:00:00", "30:15:00"]),
            ),
            "timezone": st.sampled_from(ZONES),
            "is_active": st.sampled_from([0, 1, 1, 1]),
            "phone_number": st.sampled_from(["+819012345678", "+12125550100", "bad"]),
        }
    ),
    max_size=40,
)
instants = st.datetimes(min_value=dt.datetime(2025, 1, 1), max_value=dt.datetime(2028, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC)
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=rows_strategy, now=instants, grace=st.integers(0, 59), lookahead=st.integers(1, 2000))
def test_prefiltered_plan_equals_full_scan(
    db: Database, rows: list[dict[str, Any]], now: dt.datetime, grace: int, lookahead: int
) -> None:
    db.execute("DELETE FROM users")
    db.insert([{"id": i + 1, **r} for i, r in enumerate(rows)])
    extra = {"GRACE_MINUTES": str(grace), "LOOKAHEAD_MINUTES": str(lookahead)}
    calls, summary = planned(db, now, **extra)
    assert ids(calls) == ids(full_scan(db, now, **extra))
    assert summary.calls_planned == len(calls)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=rows_strategy, now=instants, count=st.integers(2, 5))
def test_shards_are_disjoint_and_cover_the_plan(
    db: Database, rows: list[dict[str, Any]], now: dt.datetime, count: int
) -> None:
    db.execute("DELETE FROM users")
    # Negative and large ids too: every id belongs to exactly one shard.
    db.insert([{"id": (i * 7919 - 50) * (1 if i % 3 else -1), **r} for i, r in enumerate(rows)])
    whole = ids(planned(db, now)[0])
    parts = [
        ids(planned(db, now, CLOUD_RUN_TASK_INDEX=str(i), CLOUD_RUN_TASK_COUNT=str(count))[0])
        for i in range(count)
    ]
    union = sorted(t for part in parts for t in part)
    assert union == whole  # no call lost, and (sorted with repeats kept) none twice
    for i, part in enumerate(parts):
        assert all(int(t.split("-anpi-")[1].rsplit("-", 1)[0]) % count == i for t in part)


def test_all_zone_queries_read_one_snapshot(db: Database) -> None:
    """A row whose timezone changes between the per-zone queries is read exactly once:
    moved into a zone already read, it would otherwise be read by none of them."""
    db.insert(
        [
            {"id": 1, "call_weekdays": "daily", "call_time": "09:30", "timezone": "Asia/Tokyo"},
            {"id": 2, "call_weekdays": "daily", "call_time": "00:30", "timezone": "UTC"},
        ]
    )
    cfg = config(db)
    window = Window.around(NOW, cfg.grace, cfg.lookahead)
    conn = main.connect(cfg, streaming=True)
    try:
        with main.Snapshot(conn, cfg) as snapshot:
            rows = snapshot.rows(window)
            first = next(rows)
            other = 2 if first.id == 1 else 1
            db.execute("UPDATE users SET timezone = %s WHERE id = %s", (first.timezone, other))
            rest = list(rows)
            # A row looked up by id later in the run is read in the same snapshot too.
            looked_up = snapshot.active([other])
    finally:
        conn.close()
    assert sorted([first.id, *(r.id for r in rest)]) == [1, 2]
    assert looked_up[other].timezone != first.timezone
