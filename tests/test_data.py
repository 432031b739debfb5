"""Real data from Japanese services, against the real MariaDB: pauses that end by
themselves, holidays, national phone numbers in the task body, migrations, and
`main.py --check`, the connection and data test before go-live."""

from __future__ import annotations

import collections.abc
import datetime as dt
import hashlib
import json

import pymysql
import pytest

from tests.conftest import (
    DB_SETTINGS,
    ROOT,
    Database,
    create_database,
    drop_database,
    job_env,
    run_at,
    run_main,
)
from tests.fake_cloud_tasks import FakeCloudTasks

JST = dt.timezone(dt.timedelta(hours=9))
NOW = "2026-11-30T08:00:00+09:00"  # Monday; window 07:45-10:00


def bodies(server: FakeCloudTasks) -> dict[int, dict[str, object]]:
    return {b["user_id"]: b for b in server.bodies()}  # type: ignore[misc]


# -- pauses -----------------------------------------------------------------------------


def test_a_pause_spanning_today_removes_the_queued_task(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(db, tasks_server)
    assert run_at(NOW, env).summary["tasks_created"] == 1
    db.execute("UPDATE users SET pause_from = '2026-11-29', pause_until = '2026-12-03'")
    result = run_at("2026-11-30T08:10:00+09:00", env)
    assert result.code == 0, result.stderr
    assert result.summary["tasks_deleted"] == 1
    assert tasks_server.tasks == {}
    [line] = [ln for ln in result.stderr.splitlines() if "deleted a stale task" in ln]
    assert "reason=paused" in line


def test_the_day_after_pause_until_the_call_is_back(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert(
        [{"id": 1, "call_weekdays": "daily", "call_time": "09:00", "pause_until": "2026-11-29"}]
    )
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.summary["tasks_created"] == 1  # 30 November: the pause is over


def test_an_open_ended_pause_holds_until_it_is_cleared(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert(
        [{"id": 1, "call_weekdays": "daily", "call_time": "09:00", "pause_from": "2026-11-01"}]
    )
    env = job_env(db, tasks_server)
    assert run_at(NOW, env).summary["calls_planned"] == 0
    db.execute("UPDATE users SET pause_from = NULL")
    assert run_at(NOW, env).summary["tasks_created"] == 1


def test_a_pause_in_another_zone_uses_its_local_dates(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    """08:00 JST Monday is 15:00 Sunday in Los Angeles: a pause of Monday there leaves
    Sunday's 16:00 call, and one of Sunday removes it."""
    db.insert(
        [
            {
                "id": 1,
                "call_weekdays": "daily",
                "call_time": "16:00",
                "timezone": "America/Los_Angeles",
                "pause_from": "2026-11-30",
            },
            {
                "id": 2,
                "call_weekdays": "daily",
                "call_time": "16:00",
                "timezone": "America/Los_Angeles",
                "pause_until": "2026-11-29",
            },
        ]
    )
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    assert list(bodies(tasks_server)) == [1]
    assert bodies(tasks_server)[1]["scheduled_at"] == "2026-11-29T16:00:00-08:00"


def test_holidays_and_national_numbers_reach_the_task(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    """23 November 2026 (Monday) is 勤労感謝の日."""
    db.insert(
        [
            {"id": 1, "call_weekdays": "平日(祝日除く)", "call_time": "09:00"},
            {
                "id": 2,
                "call_weekdays": "土日祝",
                "call_time": "09:00",
                "phone_number": "03-1234-5678",
            },
            {
                "id": 3,
                "call_weekdays": "平日",
                "call_time": "09:00",
                "phone_number": "０９０－１２３４－５６７８",
            },
        ]
    )
    result = run_at("2026-11-23T08:00:00+09:00", job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    assert sorted(bodies(tasks_server)) == [2, 3]
    assert bodies(tasks_server)[2]["phone_number"] == "+81312345678"
    assert bodies(tasks_server)[3]["phone_number"] == "+819012345678"


# -- schema: migrations and missing columns ----------------------------------------------

# schema.sql as it was before pauses and scheduled_calls: what a running service has.
OLD_USERS = """CREATE TABLE users (
  id BIGINT NOT NULL PRIMARY KEY, name VARCHAR(100) NULL, phone_number VARCHAR(32) NOT NULL,
  call_weekdays VARCHAR(64) NULL, call_time TIME NULL, timezone VARCHAR(64) NULL,
  is_active TINYINT NOT NULL DEFAULT 1,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  KEY idx_users_due (is_active, timezone, call_time, call_weekdays, phone_number)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"""


@pytest.fixture
def old_db() -> collections.abc.Iterator[Database]:
    database = create_database(OLD_USERS)
    try:
        yield database
    finally:
        drop_database(database)


def apply(db: Database, path: str) -> None:
    from tests.localdb import schema_statements

    with db.connect() as conn, conn.cursor() as cur:
        for statement in schema_statements((ROOT / path).read_text()):
            cur.execute(statement)


def shape(db: Database) -> dict[str, list[tuple[object, ...]]]:
    """Columns (name, type, null, default) and index columns of the job's tables."""
    found = {}
    with db.connect() as conn, conn.cursor() as cur:
        for table in ("users", "scheduled_calls", "job_runs"):
            cur.execute(
                "SELECT column_name, column_type, is_nullable, column_default"
                " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
                " ORDER BY column_name",
                (db.name, table),
            )
            found[table] = list(cur.fetchall())
            cur.execute(
                "SELECT index_name, seq_in_index, column_name FROM information_schema.statistics"
                " WHERE table_schema = %s AND table_name = %s ORDER BY index_name, seq_in_index",
                (db.name, table),
            )
            found[table + " indexes"] = list(cur.fetchall())
    return found


def test_the_migrations_bring_an_old_database_to_schema_sql(
    old_db: Database, db: Database, tasks_server: FakeCloudTasks
) -> None:
    old_db.execute("DROP TABLE IF EXISTS scheduled_calls")
    old_db.insert([{"id": 1, "call_weekdays": "daily", "call_time": "09:00"}])
    env = job_env(old_db, tasks_server)
    first = run_at(NOW, env)
    assert first.code == 2
    assert "migrations/001_scheduled_calls.sql" in first.stderr
    apply(old_db, "migrations/001_scheduled_calls.sql")
    second = run_at(NOW, env)
    assert second.code == 2
    assert "table users is missing or has old columns" in second.stderr
    assert "migrations/002_users_pauses.sql" in second.stderr
    assert tasks_server.rpcs == []  # nothing was done before the schema was right
    apply(old_db, "migrations/002_users_pauses.sql")
    third = run_at(NOW, env)
    assert third.code == 2
    assert "table scheduled_calls is missing or has old columns" in third.stderr
    assert "migrations/003_scheduled_calls_queue.sql" in third.stderr
    assert tasks_server.rpcs == []
    apply(old_db, "migrations/003_scheduled_calls_queue.sql")
    fourth = run_at(NOW, env)
    assert fourth.code == 2
    assert "table scheduled_calls is missing or has old columns" in fourth.stderr
    assert "migrations/004_quick_runs.sql" in fourth.stderr
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON" in fourth.stderr and ".job_runs" in fourth.stderr
    assert tasks_server.rpcs == []
    apply(old_db, "migrations/004_quick_runs.sql")
    assert shape(old_db) == shape(db)
    assert run_at(NOW, env).summary["tasks_created"] == 1


# -- --check ----------------------------------------------------------------------------


def check(
    db: Database, *args: str, **extra: str
) -> tuple[int, list[dict[str, object]], str]:
    result = run_main(["--check", *args], job_env(db, **extra))
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return result.code, lines, result.stderr


def checksum(db: Database) -> tuple[object, ...]:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("CHECKSUM TABLE users, scheduled_calls EXTENDED")
        return tuple(row[1] for row in cur.fetchall())


BAD = {
    2: {"phone_number": "03-1234"},
    3: {"phone_number": "090-abcd-5678"},
    4: {"call_weekdays": "月x"},
    5: {"call_weekdays": "祝・祝日除く"},
    6: {"call_time": "24:00"},
    7: {"timezone": "Asia/Tokio"},
    8: {"pause_from": "2026-12-10", "pause_until": "2026-12-01"},
}


def test_check_lists_every_bad_row_once_and_exits_1(db: Database) -> None:
    good = {"call_weekdays": "平日", "call_time": "09:00", "phone_number": "090-1234-5678"}
    db.insert([{"id": 1, **good}, *({"id": i, **good, **bad} for i, bad in BAD.items())])
    db.execute("ALTER TABLE users MODIFY call_time VARCHAR(16)")  # so 24:00 can be stored
    db.insert([{"id": 9, **good, "call_time": "24:00", "is_active": 0}])  # inactive: not checked
    before = checksum(db)
    code, lines, stderr = check(db)
    *invalid, summary = lines
    assert code == 1, stderr
    assert sorted(line["user_id"] for line in invalid) == sorted(BAD)  # type: ignore[type-var]
    columns = {line["user_id"]: line["column"] for line in invalid}
    assert columns == {i: next(iter(bad)) if i != 8 else "pause_until" for i, bad in BAD.items()}
    assert all(str(line["phone"]).startswith("***") for line in invalid)
    assert (summary["users_checked"], summary["rows_invalid"]) == (len(BAD) + 1, len(BAD))
    assert summary["invalid_by_column"] == {
        "phone_number": 2, "call_weekdays": 2, "call_time": 1, "timezone": 1, "pause_until": 1
    }  # fmt: skip
    assert summary["invalid_by_reason"] == {
        "phone_number … is too short": 1,
        "phone_number … holds something other than digits, a leading +, spaces, brackets and dashes": 1,
        "call_weekdays …: unknown word …": 1,
        "call_weekdays … both names and leaves out holidays": 1,
        "call_time … is not within …": 1,
        "timezone … is not an IANA time zone": 1,
        "pause_until … is before pause_from …": 1,
    }
    assert "12345678" not in json.dumps(lines)
    assert checksum(db) == before  # it wrote nothing


def test_check_of_a_clean_table_exits_0_and_contacts_no_cloud_tasks(db: Database) -> None:
    db.insert([{"id": i, "call_weekdays": "土日祝", "call_time": "10:00"} for i in range(1, 50)])
    # An unreachable endpoint: --check must not need it (nor a project or webhook).
    # Thursday 2026-11-26 09:00 JST: the next 24 hours hold no weekend day or holiday
    # 10:00; Saturday 09:00: all 49 share 10:00.
    code, lines, stderr = check(
        db, "--now", "2026-11-26T09:00:00", GOOGLE_CLOUD_PROJECT="p",
        CLOUD_TASKS_EMULATOR_HOST="127.0.0.1:9",
    )  # fmt: skip
    assert code == 0, stderr
    [summary] = lines
    assert summary.pop("peak_minute") is None  # type: ignore[union-attr]
    _, [saturday], _ = check(db, "--now", "2026-11-28T09:00:00")
    assert saturday["peak_minute"] == {  # type: ignore[index]
        "at": "2026-11-28T10:00:00+09:00", "calls": 49, "dispatch_seconds": 4.9
    }
    assert summary == {"users_checked": 49, "rows_invalid": 0, "invalid_by_column": {},
                       "invalid_by_reason": {}, "problems": [], "shard": "0/1", "error": None}  # fmt: skip


def test_check_names_a_missing_column_grant_or_index(db: Database) -> None:
    db.execute("ALTER TABLE users DROP INDEX idx_users_due")
    code, lines, _ = check(db)
    assert code == 1
    assert "index idx_users_due is missing" in lines[-1]["problems"][0]  # type: ignore[index]
    db.execute("ALTER TABLE users DROP COLUMN pause_until")
    code, lines, stderr = check(db)
    assert code == 2 and lines == []
    assert "pause_until" in stderr and "migrations/002_users_pauses.sql" in stderr
    name = "anpi_chk_" + hashlib.sha256(db.name.encode()).hexdigest()[:8]
    with pymysql.connect(**DB_SETTINGS, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE USER '{name}'@'%' IDENTIFIED BY 'pw'")
        cur.execute(f"GRANT SELECT ON {db.name}.* TO '{name}'@'%'")
    try:
        db.execute("ALTER TABLE users ADD COLUMN pause_until DATE NULL")
        code, _, stderr = check(db, DB_USER=name, DB_PASSWORD="pw")
        assert code == 2
        assert "may not INSERT on scheduled_calls" in stderr
    finally:
        with pymysql.connect(**DB_SETTINGS, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP USER '{name}'@'%'")


def test_check_with_the_database_down_exits_1() -> None:
    env = job_env(None, DB_HOST="127.0.0.1", DB_PORT="1", DB_RETRY_SECONDS="0")
    result = run_main(["--check"], env)
    assert result.code == 1
    assert "cannot connect" in json.loads(result.stdout.splitlines()[-1])["error"]


def test_check_covers_only_its_shard(db: Database) -> None:
    db.insert([{"id": i, "call_weekdays": "x", "call_time": "10:00"} for i in range(1, 11)])
    totals = []
    for index in range(3):
        _, lines, _ = check(db, CLOUD_RUN_TASK_INDEX=str(index), CLOUD_RUN_TASK_COUNT="3")
        totals.append(lines[-1]["users_checked"])
    assert totals == [3, 4, 3]


def test_check_and_changes_are_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--help"], {}).code == 0
    out = capsys.readouterr().out
    assert "--check" in out and "--changes" in out
