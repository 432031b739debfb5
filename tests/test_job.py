"""The job against the real MariaDB and the in-tests Cloud Tasks server: in-process, and
as a process where the process is what is tested (exit codes, .env, JSON logs)."""

from __future__ import annotations

import datetime as dt
import json
import re

import grpc
import pytest

import main
from tests.conftest import CALL_URL, QUEUE_PATH, Database, job_env, run_at, run_job, run_main
from tests.fake_cloud_tasks import FakeCloudTasks

UTC = dt.UTC
# Monday 2026-11-30 09:00 JST.
NOW = "2026-11-30T09:00:00+09:00"
PHONE = "+819012345678"
PASSWORD = "s3cret-Passw0rd"


def users(db: Database, count: int = 3, at: str = "09:30", zone: str | None = None) -> None:
    db.insert(
        [
            {
                "id": i,
                "call_weekdays": "daily",
                "call_time": at,
                "phone_number": f"+81901{i:07d}",
                "timezone": zone,
            }
            for i in range(1, count + 1)
        ]
    )


def test_dry_run_needs_no_queue_settings_and_prints_the_plan(db: Database) -> None:
    db.insert(
        [
            {"id": 1, "call_weekdays": "月水金", "call_time": "09:30"},
            {"id": 2, "call_weekdays": "平日", "call_time": "10:45:30", "timezone": "Asia/Tokyo"},
            {"id": 3, "call_weekdays": "sun", "call_time": "19:15", "timezone": "America/New_York"},
            {"id": 4, "call_weekdays": "火", "call_time": "09:30"},
        ]
    )
    result = run_at(NOW, job_env(db), "--dry-run")
    assert result.code == 0, result.stderr
    assert sorted((p["user_id"], p["scheduled_at"]) for p in result.plan) == [
        (1, "2026-11-30T09:30:00+09:00"),
        (2, "2026-11-30T10:45:30+09:00"),
        (3, "2026-11-29T19:15:00-05:00"),
    ]
    assert all(
        re.fullmatch(r"[0-9a-f]{8}-anpi-\d+-\d{8}T\d{6}Z", p["task_id"]) for p in result.plan
    )
    assert result.summary == {
        **result.summary,
        "users_scanned": 4,
        "calls_planned": 3,
        "tasks_created": 0,
        "tasks_existing": 0,
        "tasks_failed": 0,
        "rows_invalid": 0,
    }


def test_now_without_offset_is_default_timezone_wall_clock(db: Database) -> None:
    users(db, 1, zone="Asia/Tokyo")
    with_offset = run_at(NOW, job_env(db), "--dry-run")
    naive = run_at("2026-11-30T09:00:00", job_env(db), "--dry-run")
    utc = run_at("2026-11-30T00:00:00Z", job_env(db), "--dry-run")
    assert with_offset.plan == naive.plan == utc.plan
    assert len(naive.plan) == 1
    ny = run_at(
        "2026-11-30T09:00:00", job_env(db, DEFAULT_TIMEZONE="America/New_York"), "--dry-run"
    )
    assert ny.plan == []  # 09:00 in New York is 23:00 in Tokyo: no call due


def test_every_task_field(db: Database, tasks_server: FakeCloudTasks) -> None:
    db.insert([{"id": 7, "call_weekdays": "daily", "call_time": "09:30", "phone_number": PHONE}])
    account = "anpi-invoker@test-project.iam.gserviceaccount.com"
    result = run_at(NOW, job_env(db, tasks_server, TASKS_OIDC_SERVICE_ACCOUNT=account))
    assert result.code == 0, result.stderr
    assert result.summary["tasks_created"] == 1
    [(name, task)] = tasks_server.tasks.items()
    task_id = name.rsplit("/", 1)[1]
    assert name == f"{QUEUE_PATH}/tasks/{task_id}"
    assert re.fullmatch(r"[0-9a-f]{8}-anpi-7-20261130T003000Z", task_id)
    assert (
        task.schedule_time.timestamp() == dt.datetime(2026, 11, 30, 0, 30, tzinfo=UTC).timestamp()
    )
    request = task.http_request
    assert request.url == CALL_URL
    assert request.http_method.name == "POST"
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.body)
    assert body["user_id"] == 7 and isinstance(body["user_id"], int)
    assert body["phone_number"] == PHONE
    assert body["scheduled_at"] == "2026-11-30T09:30:00+09:00"
    assert request.oidc_token.service_account_email == account
    assert request.oidc_token.audience == CALL_URL


def test_no_oidc_token_unless_configured(db: Database, tasks_server: FakeCloudTasks) -> None:
    users(db, 1)
    assert run_at(NOW, job_env(db, tasks_server)).code == 0
    [task] = tasks_server.tasks.values()
    assert not task.http_request.oidc_token.service_account_email


def test_second_identical_run_creates_nothing(db: Database, tasks_server: FakeCloudTasks) -> None:
    users(db, 5)
    first = run_at(NOW, job_env(db, tasks_server))
    second = run_at(NOW, job_env(db, tasks_server))
    assert (first.code, second.code) == (0, 0)
    assert first.summary["tasks_created"] == 5
    assert second.summary["tasks_created"] == 0
    assert second.summary["tasks_existing"] == 5
    assert len(tasks_server.tasks) == 5


def test_missed_hourly_run_loses_nothing_and_doubles_nothing(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    # A call every 5 minutes of the day, for one user each.
    db.insert(
        [
            {"id": i, "call_weekdays": "daily", "call_time": f"{i // 12:02d}:{i % 12 * 5:02d}"}
            for i in range(24 * 12)
        ]
    )
    ten = dt.datetime(2026, 11, 30, 10, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    assert run_at(ten.isoformat(), job_env(db, tasks_server)).code == 0
    # 11:00's run never happens; by 12:00 the calls due before it have been dispatched.
    fired = tasks_server.run_due((ten + dt.timedelta(hours=2)).timestamp())
    twelve = run_at((ten + dt.timedelta(hours=2)).isoformat(), job_env(db, tasks_server))
    assert twelve.code == 0, twelve.stderr
    fired += list(tasks_server.tasks)  # dispatched, or still to be dispatched
    calls = [main.parse_task_id(n.rsplit("/", 1)[1]) for n in fired]
    instants = sorted(c.instant for c in calls if c is not None)
    assert len(instants) == len(fired) == len(set(instants))  # nobody is called twice
    # Every 5-minute call from 09:45 (10:00 - GRACE) to 13:55 is made once.
    assert instants[0] == dt.datetime(2026, 11, 30, 0, 45, tzinfo=dt.UTC)
    assert instants[-1] == dt.datetime(2026, 11, 30, 4, 55, tzinfo=dt.UTC)
    assert len(instants) == (4 * 60 + 15) // 5


def test_transient_errors_are_retried(db: Database, tasks_server: FakeCloudTasks) -> None:
    users(db, 4)
    tasks_server.faults.fail_first = 3
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 0, result.stderr
    assert result.summary["tasks_created"] == 4
    assert len(tasks_server.tasks) == 4


def test_a_failed_task_fails_the_run_but_not_the_others(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    users(db, 3)
    tasks_server.faults.permanent = {2: grpc.StatusCode.PERMISSION_DENIED}
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 1
    assert result.summary["tasks_created"] == 2
    assert result.summary["tasks_failed"] == 1
    assert "PermissionDenied" in result.stderr


def test_invalid_rows_are_counted_logged_and_do_not_fail_the_run(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert(
        [
            {"id": 1, "call_weekdays": "daily", "call_time": "09:30"},
            {
                "id": 2,
                "call_weekdays": "月x",
                "call_time": "09:30",
                "phone_number": "+819011112222",
            },
            {
                "id": 3,
                "call_weekdays": "daily",
                "call_time": "09:30",
                "phone_number": "090 3333 444",
            },
            {"id": 4, "call_weekdays": "daily", "call_time": "09:30", "timezone": "Asia/Tokio"},
        ]
    )
    result = run_at(NOW, job_env(db, tasks_server))
    assert result.code == 0
    assert result.summary["rows_invalid"] == 3
    assert result.summary["tasks_created"] == 1
    for user_id, reason in [(2, "call_weekdays"), (3, "phone_number"), (4, "timezone")]:
        [line] = [ln for ln in result.stderr.splitlines() if f"user_id={user_id} " in ln + " "]
        assert reason in line
    assert "***2222" in result.stderr and "***3444" in result.stderr
    assert all("ERROR" in ln for ln in result.stderr.splitlines() if "invalid row" in ln)
    assert "column=phone_number" in result.stderr


def test_no_full_phone_number_or_password_in_any_output(
    db: Database, tasks_server: FakeCloudTasks
) -> None:
    db.insert(
        [
            {"id": 1, "call_weekdays": "daily", "call_time": "09:30", "phone_number": PHONE},
            {
                "id": 2,
                "call_weekdays": "bad",
                "call_time": "09:30",
                "phone_number": "+819087654321",
            },
        ]
    )
    env = job_env(db, tasks_server, LOG_LEVEL="DEBUG", LOG_FORMAT="json")
    for args in (["--now", NOW], ["--dry-run", "--now", NOW]):
        result = run_main(args, env)
        assert PHONE not in result.stdout + result.stderr
        assert "819087654321" not in result.stdout + result.stderr
    # A wrong password: the error names the failure, never the password.
    bad = run_at(NOW, {**env, "DB_PASSWORD": PASSWORD, "DB_RETRY_SECONDS": "0"})
    assert bad.code == 1
    assert PASSWORD not in bad.stdout + bad.stderr
    assert "cannot connect to the database" in bad.stderr


def test_logs_are_json_on_cloud_run(db: Database) -> None:
    users(db, 1)
    db.insert([{"id": 99, "call_weekdays": "x", "call_time": "09:30"}])
    result = run_job(
        ["--dry-run", "--now", NOW], job_env(db, CLOUD_RUN_JOB="anpi-call-create-task-job")
    )
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"severity", "message"} <= set(entries[0])
    [invalid] = [e for e in entries if e.get("user_id") == 99]
    assert invalid["severity"] == "ERROR"  # loud: alerting counts these
    assert invalid["column"] == "call_weekdays"
    assert "call_weekdays" in invalid["message"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            {"GOOGLE_CLOUD_PROJECT": "", "ANPI_CALL_URL": ""},
            ["GOOGLE_CLOUD_PROJECT", "ANPI_CALL_URL"],
        ),
        ({"ANPI_CALL_URL": "http://example.com/call"}, ["ANPI_CALL_URL"]),
        ({"ANPI_CALL_URL": "ftp://example.com/call"}, ["ANPI_CALL_URL"]),
        (
            {"GRACE_MINUTES": "60", "LOOKAHEAD_MINUTES": "two hours", "DEFAULT_TIMEZONE": "JST"},
            ["GRACE_MINUTES", "LOOKAHEAD_MINUTES", "DEFAULT_TIMEZONE"],
        ),
        (
            {
                "CLOUD_RUN_TASK_INDEX": "4",
                "CLOUD_RUN_TASK_COUNT": "4",
                "DB_PORT": "x",
                "LOG_LEVEL": "LOUD",
            },
            ["CLOUD_RUN_TASK_INDEX", "DB_PORT", "LOG_LEVEL"],
        ),
        ({"TASKS_OIDC_SERVICE_ACCOUNT": "not-an-email"}, ["TASKS_OIDC_SERVICE_ACCOUNT"]),
        ({"DB_HOST": ""}, ["DB_HOST"]),
    ],
)
def test_configuration_errors_exit_2_naming_every_variable_before_any_side_effect(
    db: Database, tasks_server: FakeCloudTasks, extra: dict[str, str], named: list[str]
) -> None:
    users(db, 2)
    result = run_at(NOW, job_env(db, tasks_server, **extra))
    assert result.code == 2
    assert result.stdout == ""
    for name in named:
        assert name in result.stderr
    assert result.stderr.count("\n") == 1  # one message
    assert tasks_server.rpcs == []


def test_usage_errors_exit_2(db: Database) -> None:
    assert run_main(["--now", "yesterday", "--dry-run"], job_env(db)).code == 2
    assert run_main(["--bogus"], job_env(db)).code == 2
    assert run_main(["--check", "--dry-run"], job_env(db)).code == 2
    assert run_main(["--check", "--changes"], job_env(db)).code == 2
    assert run_job(["--dry-run", "--check"], job_env(db)).code == 2  # the process too


def test_http_webhook_allowed_on_loopback_only(db: Database, tasks_server: FakeCloudTasks) -> None:
    users(db, 1)
    for url in ("http://localhost:8080/call", "http://127.0.0.1/call", "https://example.com/call"):
        assert run_at(NOW, job_env(db, tasks_server, ANPI_CALL_URL=url)).code == 0


def test_database_unreachable_exits_1(tmp_path: object) -> None:
    env = job_env(None, DB_HOST="127.0.0.1", DB_PORT="1", DB_RETRY_SECONDS="2")
    result = run_job(["--dry-run", "--now", NOW], env)
    assert result.code == 1
    assert "cannot connect to the database" in result.stderr
    assert result.summary["error"].startswith("cannot connect to the database")


def test_env_file_is_read_and_real_variables_win(db: Database, tmp_path: object) -> None:
    from pathlib import Path

    users(db, 1, zone="Asia/Tokyo")
    cwd = Path(str(tmp_path))
    lines = [f"{k}={v}" for k, v in db.env().items()] + ["DEFAULT_TIMEZONE=America/New_York"]
    (cwd / ".env").write_text("\n".join(lines) + "\n")
    env = job_env(None)
    from_file = run_job(["--dry-run", "--now", "2026-11-30T09:00:00"], env, cwd=cwd)
    assert from_file.code == 0, from_file.stderr
    assert from_file.plan == []  # New York from .env
    overridden = run_job(
        ["--dry-run", "--now", "2026-11-30T09:00:00"],
        {**env, "DEFAULT_TIMEZONE": "Asia/Tokyo"},
        cwd=cwd,
    )
    assert len(overridden.plan) == 1
