"""The peak minute: the busiest minute of the next 24 hours, in the summary of --check,
with a WARNING when its queue needs over PEAK_WARN_MINUTES for it. A dry run reads only
its window, so its summary's peak_minute is null."""

from __future__ import annotations

import pytest

from tests.conftest import Database, job_env, run_at, run_main

NOW = "2026-11-30T08:00:00+09:00"  # a Monday


def fill(db: Database, at_nine: int) -> None:
    """`at_nine` users called daily at 09:00 (one at 09:00:40: the same minute), and a
    few at other times."""
    rows = [
        (i, f"+81901{i:07d}", "daily", "09:00:40" if i == 1 else "09:00:00")
        for i in range(1, at_nine + 1)
    ]
    rows += [(100_000 + i, f"+81902{i:07d}", "平日", f"{10 + i}:30") for i in range(5)]
    with db.connect() as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO users (id, phone_number, call_weekdays, call_time) VALUES (%s, %s, %s, %s)",
            rows,
        )


def test_3600_calls_at_nine_take_360s_at_10_per_second_and_warn(db: Database) -> None:
    fill(db, 3600)
    result = run_at(NOW, job_env(db), "--check")
    assert result.code == 0, result.stderr
    assert result.summary["peak_minute"] == {
        "at": "2026-11-30T09:00:00+09:00",
        "calls": 3600,
        "dispatch_seconds": 360,
    }
    warnings = [line for line in result.stderr.splitlines() if "busiest minute" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert "QUEUE_MAX_DISPATCHES_PER_SECOND" in warnings[0] and "add shards" in warnings[0]


def test_2400_calls_take_240s_and_do_not_warn(db: Database) -> None:
    fill(db, 2400)
    result = run_at(NOW, job_env(db), "--check")
    assert result.code == 0, result.stderr
    assert result.summary["peak_minute"]["calls"] == 2400
    assert result.summary["peak_minute"]["dispatch_seconds"] == 240
    assert "busiest minute" not in result.stderr


def test_the_rate_shards_and_the_threshold_move_it(db: Database) -> None:
    fill(db, 3600)
    faster = run_at(NOW, job_env(db, QUEUE_MAX_DISPATCHES_PER_SECOND="20"), "--check")
    assert faster.summary["peak_minute"]["dispatch_seconds"] == 180
    assert "busiest minute" not in faster.stderr
    env = job_env(db, CLOUD_RUN_TASK_COUNT="4", CLOUD_RUN_TASK_INDEX="1", QUEUE_PER_SHARD="1")
    own_queue = run_at(NOW, env, "--check").summary["peak_minute"]
    assert own_queue == {"at": "2026-11-30T09:00:00+09:00", "calls": 900, "dispatch_seconds": 90}
    env["QUEUE_PER_SHARD"] = "0"  # four shards' calls share one queue
    shared = run_at(NOW, env, "--check").summary["peak_minute"]
    assert shared["calls"] == 900 and shared["dispatch_seconds"] == 360
    strict = run_at(NOW, job_env(db, PEAK_WARN_MINUTES="1.5"), "--check")
    assert "busiest minute" in run_at(NOW, job_env(db), "--check").stderr
    assert "PEAK_WARN_MINUTES=1.5" in strict.stderr


def test_a_dry_run_reads_only_its_window_and_reports_no_peak(db: Database) -> None:
    fill(db, 3600)
    result = run_at(NOW, job_env(db), "--dry-run")
    assert result.code == 0, result.stderr
    assert result.summary["peak_minute"] is None
    assert "busiest minute" not in result.stderr


def test_the_peak_counts_only_calls_that_would_be_made(db: Database) -> None:
    """An invalid row and a row paused today are not called: they do not count."""
    db.insert(
        [
            {"id": 1, "call_weekdays": "daily", "call_time": "09:00"},
            {"id": 2, "call_weekdays": "daily", "call_time": "09:00", "phone_number": "03-1234"},
            {"id": 3, "call_weekdays": "daily", "call_time": "09:00", "pause_from": "2026-11-30"},
        ]
    )
    result = run_at(NOW, job_env(db), "--check")
    assert result.summary["rows_invalid"] == 1
    assert result.summary["peak_minute"] == {
        "at": "2026-11-30T09:00:00+09:00",
        "calls": 1,
        "dispatch_seconds": 0.1,
    }


def test_no_calls_no_peak(db: Database) -> None:
    result = run_at(NOW, job_env(db), "--check")
    assert result.code == 0 and result.summary["peak_minute"] is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUEUE_PER_SHARD", "2"),
        ("QUEUE_MAX_DISPATCHES_PER_SECOND", "0"),
        ("QUEUE_MAX_DISPATCHES_PER_SECOND", "501"),
        ("QUEUE_MAX_DISPATCHES_PER_SECOND", "fast"),
        ("PEAK_WARN_MINUTES", "-1"),
        ("PEAK_WARN_MINUTES", "nan"),
    ],
)
def test_bad_values_exit_2_naming_the_variable(db: Database, name: str, value: str) -> None:
    result = run_main(["--check"], job_env(db, **{name: value}))
    assert result.code == 2
    assert f"{name}=" in result.stderr
