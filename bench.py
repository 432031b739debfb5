"""Benchmark of the job: enqueue throughput and dry-run cost as the table grows.

Seeds throwaway databases on the real MariaDB (TEST_DB_* or 127.0.0.1:3306 as root),
runs `main.py` as a subprocess against the in-tests Cloud Tasks server with 20 ms of
added latency per RPC, and prints one Markdown table measured in this one run. Every
real run records its calls in scheduled_calls, so the enqueue rows include that cost.

Run: make bench   (or .venv/bin/python bench.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pymysql

from tests.conftest import DB_SETTINGS, SCHEMA, job_env
from tests.fake_cloud_tasks import FakeCloudTasks
from tests.localdb import schema_statements

ROOT = Path(__file__).resolve().parent
NOW = "2026-11-30T09:00:00+09:00"  # Monday 09:00 JST: window 08:45-11:00
EMPTY_NOW = "2026-11-30T21:00:00+09:00"  # 20:45-23:00: no call of the "empty" table
LATENCY = 0.020


@dataclasses.dataclass
class Measured:
    wall: float
    peak_rss_mb: float
    summary: dict[str, int]


def run_job(args: list[str], env: dict[str, str]) -> Measured:
    """Run the job once; wall time and the child's own peak RSS (wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        env=env,
        cwd=ROOT / "tests",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    last = b""
    for line in proc.stdout:  # the plan can be large: read it as it comes
        last = line
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}): {last!r}")
    return Measured(wall, usage.ru_maxrss / 1024, json.loads(last))


def seed(name: str, users: int, call_time_sql: str, mixed: bool = True) -> None:
    """A database `name` with `users` rows at `call_time_sql`.

    mixed: the weekday spellings users write, 5% inactive, 10% in New York; otherwise
    every row is an active daily call in DEFAULT_TIMEZONE.
    """
    weekdays, zone, active = (
        ("ELT(1 + seq % 4, 'daily', '月水金', '平日', 'mon-fri')",
         "IF(seq % 10 = 0, 'America/New_York', NULL)", "IF(seq % 20 = 7, 0, 1)")
        if mixed else ("'daily'", "NULL", "1")
    )  # fmt: skip
    with pymysql.connect(**DB_SETTINGS, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
        cur.execute(f"USE {name}")
        for statement in schema_statements(SCHEMA):
            cur.execute(statement)
        cur.execute(
            "INSERT INTO users (id, phone_number, call_weekdays, call_time, timezone, is_active)"
            # Half as typed in Japan (090-1xxx-xxxx), half E.164.
            " SELECT seq, IF(seq % 2, CONCAT('+81901', LPAD(seq, 7, '0')),"
            " CONCAT('090-1', LPAD(seq DIV 10000, 3, '0'), '-', LPAD(seq % 10000, 4, '0'))),"
            f" {weekdays}, {call_time_sql}, {zone}, {active}"
            f" FROM seq_1_to_{users}"
        )
        cur.execute("ANALYZE TABLE users")


def drop(name: str) -> None:
    with pymysql.connect(**DB_SETTINGS, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")


def db_env(name: str) -> dict[str, str]:
    return {
        "DB_HOST": DB_SETTINGS["host"],
        "DB_PORT": str(DB_SETTINGS["port"]),
        "DB_USER": DB_SETTINGS["user"],
        "DB_PASSWORD": DB_SETTINGS["password"],
        "DB_NAME": name,
    }


def enqueue_run(db: str, concurrency: int) -> tuple[Measured, Measured]:
    """A first run on an empty queue and record, then the same run again: it lists
    what the first made, finds every call recorded and pending, and creates nothing."""
    with pymysql.connect(**DB_SETTINGS, database=db, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM scheduled_calls")
    server = FakeCloudTasks().start()
    server.faults.latency = LATENCY
    try:
        env = job_env(None, server, **db_env(db))
        env.update(ENQUEUE_CONCURRENCY=str(concurrency), ENQUEUE_MAX_PER_SECOND="0")
        first = run_job(["--now", NOW], env)
        assert first.summary["tasks_created"] == len(server.tasks)
        again = run_job(["--now", NOW], env)
        assert again.summary["tasks_existing"] == len(server.tasks) == len(server.stored)
        return first, again
    finally:
        server.stop()


def main() -> None:
    import main as job

    default_concurrency = job.Config.from_env({"DB_HOST": "x"}, dry_run=True).enqueue_concurrency
    uniform = "SEC_TO_TIME(FLOOR(RAND(seq) * 86400))"
    print("seeding (1,000,000 + 1,000,000 + 100,000 + 5,000 rows) ...", file=sys.stderr)
    started = time.perf_counter()
    seed("anpi_bench_5k", 5000, "'09:30:00'", mixed=False)
    seed("anpi_bench_100k", 100_000, uniform)
    seed("anpi_bench_1m", 1_000_000, uniform)
    seed("anpi_bench_1m_empty", 1_000_000, "SEC_TO_TIME(FLOOR(RAND(seq) * 21600))")  # 00-06h
    print(f"seeded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        print("enqueueing 5,000 calls serially ...", file=sys.stderr)
        serial, _ = enqueue_run("anpi_bench_5k", 1)
        print("enqueueing 5,000 calls concurrently ...", file=sys.stderr)
        parallel, rerun = enqueue_run("anpi_bench_5k", default_concurrency)
        dry = {}
        for name in ("anpi_bench_100k", "anpi_bench_1m"):
            print(f"dry run over {name} ...", file=sys.stderr)
            dry[name] = run_job(["--dry-run", "--now", NOW], job_env(None, **db_env(name)))
        print("--check over anpi_bench_1m ...", file=sys.stderr)
        checked = run_job(["--check"], job_env(None, **db_env("anpi_bench_1m")))
        print("dry run over an empty window ...", file=sys.stderr)
        empty = run_job(
            ["--dry-run", "--now", EMPTY_NOW], job_env(None, **db_env("anpi_bench_1m_empty"))
        )
    finally:
        for name in ("anpi_bench_5k", "anpi_bench_100k", "anpi_bench_1m", "anpi_bench_1m_empty"):
            drop(name)

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    with pymysql.connect(**DB_SETTINGS) as conn, conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        (version,) = cur.fetchone()
    print(
        f"\nMachine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()},"
        f" MariaDB {version};\nCloud Tasks: the in-tests gRPC server,"
        f" +{LATENCY * 1000:.0f} ms per RPC.\n"
    )
    print("| run | rows read | calls | wall time | tasks/s | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")

    def row(label: str, m: Measured, rate: bool = False) -> None:
        s = m.summary
        tps = f"{s['tasks_created'] / m.wall:,.0f}" if rate else "-"
        print(
            f"| {label} | {s['users_scanned']:,} | {s['calls_planned']:,} | {m.wall:.2f} s"
            f" | {tps} | {m.peak_rss_mb:.0f} MB |"
        )

    row("enqueue 5,000 due calls, `ENQUEUE_CONCURRENCY=1`, cap lifted", serial, rate=True)
    row(
        f"enqueue 5,000 due calls, `ENQUEUE_CONCURRENCY={default_concurrency}` (default),"
        " cap lifted",
        parallel,
        rate=True,
    )
    row("the same run again: 5,000 calls recorded and listed, none created", rerun)
    row("`--dry-run`, 100,000 users, calls spread over the day", dry["anpi_bench_100k"])
    row("`--dry-run`, 1,000,000 users, calls spread over the day", dry["anpi_bench_1m"])
    row("`--dry-run`, 1,000,000 users, no call in the window", empty)
    c = checked.summary
    print(
        f"| `--check`, 1,000,000 users: every active row validated | {c['users_checked']:,}"
        f" | - | {checked.wall:.2f} s | - | {checked.peak_rss_mb:.0f} MB |"
    )
    rss_100k, rss_1m = dry["anpi_bench_100k"].peak_rss_mb, dry["anpi_bench_1m"].peak_rss_mb
    print(
        f"\nConcurrent vs serial: {serial.wall / parallel.wall:.1f}x faster."
        f" Peak RSS at 1,000,000 users is {100 * (rss_1m / rss_100k - 1):+.0f}% of that at 100,000."
    )


if __name__ == "__main__":
    main()
