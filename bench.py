"""Benchmark of the job: enqueue throughput, dry-run cost as the table grows, and
real hourly runs over 1,000,000 users, on one queue and on four shards' own queues.

Seeds throwaway databases on the real MariaDB (TEST_DB_* or 127.0.0.1:3306 as root),
runs `main.py` as a subprocess against the in-tests Cloud Tasks server with 20 ms of
added latency per RPC, and prints Markdown tables measured in this one run. Every
real run records its calls in scheduled_calls, so the enqueue rows include that cost.
Each 1,000,000-user real run is checked against the plan: every wanted call on the
server (pending, or run) exactly once, and nothing else in the window.

Run: make bench   (or .venv/bin/python bench.py)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pymysql

import main as job
from tests.conftest import DB_SETTINGS, SCHEMA, job_env
from tests.fake_cloud_tasks import FakeCloudTasks
from tests.localdb import schema_statements

ROOT = Path(__file__).resolve().parent
NOW = "2026-11-30T09:00:00+09:00"  # Monday 09:00 JST: window 08:45-11:00
NEXT = "2026-11-30T10:00:00+09:00"  # the next hourly run: 09:45-12:00
QUICK_NOW = "2026-11-30T10:01:00+09:00"  # a quick run after it, nothing changed
QUICK_CHANGED = "2026-11-30T10:02:00+09:00"  # and one after 1% of users changed
TOKYO = dt.timezone(dt.timedelta(hours=9))
EMPTY_NOW = "2026-11-30T21:00:00+09:00"  # 20:45-23:00: no call of the "empty" table
LATENCY = 0.020
# Runs main.py and, at its exit, writes its peak RSS (VmHWM) to stderr. wait4's ru_maxrss
# would not do: Linux keeps across exec the RSS the child had when forked from this
# process, which holds the server's tasks.
RUNNER = (
    "import atexit, runpy, sys;"
    "atexit.register(lambda: sys.stderr.write(next("
    "l for l in open('/proc/self/status') if l.startswith('VmHWM'))));"
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@dataclasses.dataclass
class Measured:
    wall: float
    peak_rss_mb: float
    summary: dict[str, Any]
    record_seconds: float = 0.0  # time in scheduled_calls statements (the job's log)
    listed: list[str] = dataclasses.field(default_factory=list)  # queues it listed (its log)
    plan: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    cpu: float = 0.0  # user + system seconds of the job process
    server_cpu: float = 0.0  # the in-tests server's (this process's) during the run


def run_job(args: list[str], env: dict[str, str], keep_plan: bool = False) -> Measured:
    """Run the job once; wall time and its peak RSS."""
    return run_jobs([(args, env)], keep_plan)[0]


# PyMySQL's floor: the dry run's own queries (the window's rows, zone by zone) read through
# the same unbuffered cursor, and nothing done with them; nothing imported but PyMySQL.
FLOOR = """
import json, sys, pymysql
settings, queries = json.loads(sys.argv[1]), json.loads(sys.argv[2])
conn = pymysql.connect(**settings, cursorclass=pymysql.cursors.SSCursor)  # ssl_disabled in it
rows = 0
with conn.cursor() as cur:
    for sql, args in queries:
        cur.execute(sql, args)
        rows += sum(1 for _ in cur)
print(json.dumps({"users_scanned": rows, "calls_planned": 0}))
"""
# The naive job: every active row read and planned with the job's own parsing.
NAIVE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import main as job
config = job.Config.from_env(json.loads(sys.argv[2]), dry_run=True)
now = job.parse_now(sys.argv[3], config.default_timezone)
window = job.Window.around(now, config.grace, config.lookahead)
conn = job.connect(config, streaming=True)
rows = planned = 0
for values in job.stream(conn, f"SELECT {job.USER_COLUMNS} FROM users WHERE is_active = 1"):
    rows += 1
    try:
        setting = job.parse_row(job.UserRow(*values), config.default_timezone, config.phone_region)
    except job.InvalidRow:
        continue
    planned += len(job.plan_calls(setting, window)) if setting else 0
print(json.dumps({"users_scanned": rows, "calls_planned": planned}))
"""


def run_baseline(code: str, db: str, now: str) -> Measured:
    """Run `FLOOR` or `NAIVE` over `db` at `now`, measured as the job is."""
    config = job.Config.from_env(db_env(db), dry_run=True)
    instant = job.parse_now(now, config.default_timezone)
    window = job.Window.around(instant, config.grace, config.lookahead)
    if code is FLOOR:
        with pymysql.connect(**DB_SETTINGS, database=db) as conn, conn.cursor() as cur:
            cur.execute("SELECT DISTINCT timezone FROM users WHERE is_active = 1")
            queries = [job.zone_query(zone, config, window) for (zone,) in cur.fetchall()]
        args = [json.dumps({**DB_SETTINGS, "database": db}), json.dumps(queries)]
    else:
        args = [str(ROOT), json.dumps(db_env(db)), now]
    with tempfile.NamedTemporaryFile("w", suffix=".py") as script:
        script.write(code)
        script.flush()
        return run_jobs([(args, {"PATH": os.environ.get("PATH", "")})], script=script.name)[0]


def run_jobs(
    jobs: list[tuple[list[str], dict[str, str]]], keep_plan: bool = False, script: str = "main.py"
) -> list[Measured]:
    """Run jobs at once; each one's wall time, peak RSS and CPU time, its summary and
    the time its log says it spent in the job's tables."""
    with contextlib.ExitStack() as files:
        return _run_jobs(jobs, keep_plan, files, script)


def _run_jobs(
    jobs: list[tuple[list[str], dict[str, str]]],
    keep_plan: bool,
    files: contextlib.ExitStack,
    script: str,
) -> list[Measured]:
    started = time.perf_counter()
    running = []
    for args, env in jobs:
        out = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - closed by files
        err = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(ROOT / script), *args],
            env={**env, "LOG_FORMAT": "json"},
            cwd=ROOT / "tests",
            stdout=out,
            stderr=err,
        )
        running.append((proc, out, err))
    results = []
    for proc, out, err in running:
        _, status, usage = os.wait4(proc.pid, 0)
        cpu = usage.ru_utime + usage.ru_stime
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        lines = out.read().decode().splitlines()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"job failed ({code}): {lines[-1:]!r}\n{err.read().decode()[-3000:]}")
        record_seconds, listed, peak_kb = 0.0, [], 0
        for line in err.read().decode().splitlines():
            if line.startswith("VmHWM:"):
                peak_kb = int(line.split()[1])
                continue
            entry = json.loads(line)
            if "record_seconds" in entry:
                record_seconds = entry["record_seconds"]
            if entry["message"] == "listed the queue":
                listed.append(entry["queue"])
        plan = [json.loads(line) for line in lines[:-1]] if keep_plan else []
        summary = json.loads(lines[-1])
        results.append(Measured(wall, peak_kb / 1024, summary, record_seconds, listed, plan, cpu))
    return results


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


def enqueue_run(db: str, concurrency: int, cap: str = "0") -> tuple[Measured, Measured]:
    """A first run on an empty queue and record, then the same run again: it lists
    what the first made, finds every call recorded and pending, and creates nothing.
    `cap`: ENQUEUE_MAX_PER_SECOND ("0" lifts it; None: the default)."""
    forget(db)
    server = FakeCloudTasks().start()
    server.faults.latency = LATENCY
    try:
        env = job_env(None, server, **db_env(db))
        env.update(ENQUEUE_CONCURRENCY=str(concurrency), ENQUEUE_MAX_PER_SECOND=cap)
        first = run_job(["--now", NOW], env)
        assert first.summary["tasks_created"] == len(server.tasks)
        again = run_job(["--now", NOW], env)
        assert again.summary["tasks_existing"] == len(server.tasks) == len(server.stored)
        return first, again
    finally:
        server.stop()


def forget(db: str) -> None:
    """An empty record and run history: as on a new database."""
    with pymysql.connect(**DB_SETTINGS, database=db, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM scheduled_calls")
        cur.execute("DELETE FROM job_runs")


@dataclasses.dataclass
class Pair:
    """Two hourly runs; with one shard, two quick runs after them."""

    first: list[Measured]
    second: list[Measured]
    pages: dict[str, list[int]]  # ListTasks pages per queue, per hourly run
    quick: list[tuple[Measured, collections.Counter[str]]]  # with its RPCs by method


def hourly_pair(db: str, shards: int) -> Pair:
    """Two hourly real runs over `db` with `shards` shards at once (each on its own queue
    when more than one): 09:00 on an empty queue and record, then 10:00 after 1% of
    users moved their call 7 minutes later (and the calls due before 10:00 ran). With
    one shard, then two quick runs: 10:01 with nothing changed, 10:02 after that 1%
    moved back. Each run is checked against the plan. Returns the measurements, the
    ListTasks pages each queue was read with, and each quick run's RPCs."""
    forget(db)
    server = FakeCloudTasks().start(max_workers=64 * shards)
    server.faults.latency = LATENCY
    pages: dict[str, list[int]] = collections.defaultdict(list)
    try:
        base = job_env(None, server, **db_env(db), ENQUEUE_MAX_PER_SECOND="0")
        if shards > 1:
            base.update(CLOUD_RUN_TASK_COUNT=str(shards), QUEUE_PER_SHARD="1")

        def run_at(now: str) -> list[Measured]:
            before = len(server.rpcs)
            envs = [{**base, "CLOUD_RUN_TASK_INDEX": str(i)} for i in range(shards)]
            server_before = _cpu_self()
            measured = run_jobs([(["--now", now], env) for env in envs])
            measured[0].server_cpu = _cpu_self() - server_before
            listed = collections.Counter(
                r.name.rsplit("/", 1)[1] for r in server.rpcs[before:] if r.method == "ListTasks"
            )
            for queue in sorted(listed):
                pages[queue].append(listed[queue])
            own = [
                [f"anpi-call-queue-{i}" if shards > 1 else "anpi-call-queue"] for i in range(shards)
            ]
            if [m.listed for m in measured] != own or sorted(listed) != sorted(q for [q] in own):
                raise SystemExit(f"a shard listed another's queue: {[m.listed for m in measured]}")
            check_against_plan(db, server, now, max(m.wall for m in measured))
            return measured

        def quick_at(now: str) -> tuple[Measured, collections.Counter[str]]:
            before = len(server.rpcs)
            [measured] = run_jobs([(["--changes", "--now", now], base)])
            rpcs = collections.Counter(r.method for r in server.rpcs[before:])
            check_against_plan(db, server, now, measured.wall, quick=True)
            return measured, rpcs

        def move(sign: str) -> None:
            with (
                pymysql.connect(**DB_SETTINGS, database=db, autocommit=True) as conn,
                conn.cursor() as cur,
            ):
                cur.execute(MOVE_ONE_PERCENT.format(sign=sign))

        first = run_at(NOW)
        move("+")
        server.run_due(dt.datetime.fromisoformat(NEXT).timestamp())
        second = run_at(NEXT)
        quick = []
        if shards == 1:
            quick.append(quick_at(QUICK_NOW))
        move("-")  # as it was: the quick run's change, and the next pair's start
        if shards == 1:
            quick.append(quick_at(QUICK_CHANGED))
        return Pair(first, second, pages, quick)
    finally:
        server.stop()


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# 1% of users, their call 7 minutes later (or back), within the day.
MOVE_ONE_PERCENT = (
    "UPDATE users SET call_time = SEC_TO_TIME((TIME_TO_SEC(call_time) {sign} 420 + 86400) % 86400)"
    " WHERE id DIV 100 % 100 = 37"
)


def check_against_plan(
    db: str, server: FakeCloudTasks, now: str, wall: float, quick: bool = False
) -> None:
    """Every call the (unsharded) plan wants is on the server exactly once, pending or
    run, under the planned id, unless its row was called another time that local date
    (at most one call a day); and no other task of the window is there, except those
    that had run before the run (the change came too late for them) or were due within
    the 60 s firing margin of the job's own clock (`now` plus the `wall` seconds it ran)
    when it reconciled (left, by design)."""
    args = ["--dry-run", "--now", now, *(["--changes"] if quick else [])]
    planned = run_job(args, job_env(None, **db_env(db)), keep_plan=True)
    wanted = {p["task_id"] for p in planned.plan if "task_id" in p}
    start = dt.datetime.fromisoformat(planned.summary["window_start"])
    end = dt.datetime.fromisoformat(planned.summary["window_end"])
    seen: collections.Counter[tuple[int, dt.datetime]] = collections.Counter()
    ids, days = set(), set()
    names = [n.rsplit("/", 1)[1] for n in server.tasks] + [e.task_id for e in server.executions]
    for name in names:
        task = job.parse_task_id(name)
        if task is None:
            continue
        days.add((task.user_id, task.instant.astimezone(TOKYO).date()))
        if start <= task.instant < end:
            seen[task.key] += 1
            ids.add(name)
    doubles = sum(1 for n in seen.values() if n > 1)
    margin = dt.datetime.fromisoformat(now) + job.FIRING_MARGIN + dt.timedelta(seconds=wall)
    unwanted = {i for i in ids - wanted if (task := job.parse_task_id(i)) and task.instant > margin}
    missing = set()
    for i in wanted - ids:
        task = job.parse_task_id(i)
        assert task is not None
        if (task.user_id, task.instant.astimezone(TOKYO).date()) not in days:
            missing.add(i)
    if missing or unwanted or doubles:
        raise SystemExit(
            f"run at {now}: {len(missing)} wanted calls missing, {len(unwanted)}"
            f" unwanted ({sorted(unwanted)[:5]}), {doubles} calls twice"
        )


def main() -> None:

    defaults = job.Config.from_env({"DB_HOST": "x"}, dry_run=True)
    default_concurrency = defaults.enqueue_concurrency
    default_cap = f"{defaults.enqueue_max_per_second:g}"
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
        print("enqueueing 5,000 calls with the defaults ...", file=sys.stderr)
        capped, _ = enqueue_run("anpi_bench_5k", default_concurrency, default_cap)
        print("enqueueing 5,000 calls concurrently, cap lifted ...", file=sys.stderr)
        parallel, rerun = enqueue_run("anpi_bench_5k", default_concurrency)
        dry = {}
        for name in ("anpi_bench_100k", "anpi_bench_1m"):
            print(f"dry run over {name} ...", file=sys.stderr)
            dry[name] = run_job(["--dry-run", "--now", NOW], job_env(None, **db_env(name)))
        print("PyMySQL's floor and the naive job over anpi_bench_1m ...", file=sys.stderr)
        floor_run = run_baseline(FLOOR, "anpi_bench_1m", NOW)
        naive_run = run_baseline(NAIVE, "anpi_bench_1m", NOW)
        floor_empty = run_baseline(FLOOR, "anpi_bench_1m_empty", EMPTY_NOW)
        print("--check over anpi_bench_1m ...", file=sys.stderr)
        checked = run_job(["--check"], job_env(None, **db_env("anpi_bench_1m")))
        print("dry run over an empty window ...", file=sys.stderr)
        empty = run_job(
            ["--dry-run", "--now", EMPTY_NOW], job_env(None, **db_env("anpi_bench_1m_empty"))
        )
        pairs = {}
        for shards in (1, 4):
            print(f"real hourly runs over anpi_bench_1m, {shards} shard(s) ...", file=sys.stderr)
            pairs[shards] = hourly_pair("anpi_bench_1m", shards)
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
        f"enqueue 5,000 due calls, the defaults (`ENQUEUE_CONCURRENCY={default_concurrency}`,"
        f" `ENQUEUE_MAX_PER_SECOND={default_cap}`)",
        capped,
        rate=True,
    )
    row(
        f"enqueue 5,000 due calls, `ENQUEUE_CONCURRENCY={default_concurrency}`,"
        " cap lifted (`ENQUEUE_MAX_PER_SECOND=0`)",
        parallel,
        rate=True,
    )
    row("the same run again: 5,000 calls recorded and listed, none created", rerun)
    row("`--dry-run`, 100,000 users, calls spread over the day", dry["anpi_bench_100k"])
    row("`--dry-run`, 1,000,000 users, calls spread over the day", dry["anpi_bench_1m"])
    row("PyMySQL's floor: the same window's rows read, nothing done with them", floor_run)
    row("the naive job: every active row read and planned", naive_run)
    row("`--dry-run`, 1,000,000 users, no call in the window", empty)
    row("PyMySQL's floor of that empty window", floor_empty)
    c = checked.summary
    print(
        f"| `--check`, 1,000,000 users: every active row validated | {c['users_checked']:,}"
        f" | - | {checked.wall:.2f} s | - | {checked.peak_rss_mb:.0f} MB |"
    )
    rss_100k, rss_1m = dry["anpi_bench_100k"].peak_rss_mb, dry["anpi_bench_1m"].peak_rss_mb
    dry_1m = dry["anpi_bench_1m"].wall
    print(
        f"\nConcurrent vs serial: {serial.wall / parallel.wall:.1f}x faster."
        f" Peak RSS at 1,000,000 users is {100 * (rss_1m / rss_100k - 1):+.0f}% of that at 100,000."
        f"\nThe 1,000,000-user dry run: {dry_1m / floor_run.wall:.2f}x PyMySQL's floor"
        f" (target 1.10x), {naive_run.wall / dry_1m:.1f}x faster than the naive job; the"
        f" empty window {empty.wall:.2f} s (target 0.5 s)."
    )

    print(
        "\nReal hourly runs over 1,000,000 users (`RECONCILE=1`, cap lifted, default"
        f" `ENQUEUE_CONCURRENCY={default_concurrency}` per shard), each checked against the plan:"
        " every wanted call on the server exactly once.\n"
    )
    print(
        "| run | shards | created | deleted | listing pages per queue | wall time"
        " | peak RSS (per shard) | time in `scheduled_calls` | CPU: jobs + server of 2 cores |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    labels = (
        "09:00, empty queue and record",
        "10:00, after 1% moved their call: lists, creates the new hour, deletes the stale",
    )
    totals = {}
    for shards, pair in pairs.items():
        totals[shards] = 0.0
        pages = pair.pages
        for n, (label, runs) in enumerate(zip(labels, (pair.first, pair.second), strict=True)):
            wall = max(m.wall for m in runs)
            totals[shards] += wall
            listed = ", ".join(
                f"{q.rsplit('-', 1)[-1] if shards > 1 else q}: {p[n]}" for q, p in pages.items()
            )
            record = sum(m.record_seconds for m in runs) / sum(m.wall for m in runs)
            rss = max(m.peak_rss_mb for m in runs)
            jobs_cpu = sum(m.cpu for m in runs)
            busy = (jobs_cpu + runs[0].server_cpu) / (2 * wall)
            print(
                f"| {label} | {shards} | {sum(m.summary['tasks_created'] for m in runs):,}"
                f" | {sum(m.summary['tasks_deleted'] for m in runs):,} | {listed}"
                f" | {wall:.1f} s | {rss:.0f} MB | {100 * record:.0f}%"
                f" | {jobs_cpu:.0f} s + {runs[0].server_cpu:.0f} s = {100 * busy:.0f}% |"
            )
    print(
        f"\nThe pair: {totals[1]:.1f} s on one queue, {totals[4]:.1f} s on four shards' queues"
        f" ({totals[1] / totals[4]:.2f}x). Each shard listed only its own queue."
    )
    print(
        "\nQuick runs (`--changes`) over 1,000,000 users, one shard, after the 10:00 run; each"
        " checked against the plan up to the hourly run's horizon.\n"
    )
    print("| run | rows read | created | deleted | Cloud Tasks calls | wall time | peak RSS |")
    print("|---|---:|---:|---:|---|---:|---:|")
    quick_labels = ("10:01, nothing changed", "10:02, after 1% of users moved their call back")
    for label, (m, rpcs) in zip(quick_labels, pairs[1].quick, strict=True):
        s = m.summary
        calls = ", ".join(f"{k}: {v:,}" for k, v in sorted(rpcs.items())) or "none"
        print(
            f"| {label} | {s['users_scanned']:,} | {s['tasks_created']:,} | {s['tasks_deleted']:,}"
            f" | {calls} | {m.wall:.2f} s | {m.peak_rss_mb:.0f} MB |"
        )
    calm, _ = pairs[1].quick[0]
    print(
        f"\nTarget for the quick run with nothing changed: at most 5 s and 150 MB and no"
        f" ListTasks call ({calm.wall:.2f} s, {calm.peak_rss_mb:.0f} MB)."
    )


if __name__ == "__main__":
    main()
