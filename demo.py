"""See it work: MySQL rows in, Cloud Tasks out, the webhook called at the second.

`make demo` runs this with .venv. It needs no Google Cloud account:
- database: DB_HOST/DB_* if set; else MariaDB/MySQL at 127.0.0.1:3306 (database
  anpi_demo); else a private, throwaway mariadbd (tests/localdb.py);
- Cloud Tasks: gcloud-tasks-emulator in .venv-emulator, which really POSTs each task at
  its schedule_time; a small local webhook prints each call it receives;
- the job: main.py, run once, exactly as Cloud Run runs it (JSON log lines, shown here
  as text); then `main.py --dry-run --now <that run's now>` gives that run's plan.
Once the stack is up, it writes sample users whose calls fall due a few seconds later
(LEAD_SECONDS), runs the job, waits until the last due call's second (plus
SETTLE_SECONDS), and prints a report that says why each user was or was not called,
from the job's plan, summary and log lines and the rows. It cleans up every process it
started (also on Ctrl-C or failure) and exits 1 if a due call did not arrive, arrived
twice, or arrived more than LATE_SECONDS late.

The database (DB_NAME, default anpi_demo) is the demo's own: it creates it, with a
marker table `anpi_demo_marker` beside schema.sql's tables, and leaves it for a look
afterwards. The next run drops and re-creates only a database that carries that mark.
A database of that name without it (one the demo did not create) is never touched: the
demo stops, exit 1, and says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import jpholiday
import pymysql

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from tests.emulator import Emulator, free_port  # noqa: E402
from tests.localdb import NoDatabase, local_server, schema_statements  # noqa: E402
from tests.webhook import Delivery, WebhookReceiver  # noqa: E402

TOKYO = ZoneInfo("Asia/Tokyo")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
DEMO_DB = "anpi_demo"
PROJECT = "anpi-demo"
# The table that marks a database as the demo's own (see the module docstring).
MARKER_TABLE = "anpi_demo_marker"
# From writing the rows to the first call (4-5 s: it falls on a whole second): main.py
# must start and create every task before it is due. Measured on a 2-core machine from
# launch to "run finished": 0.3-0.4 s idle, 0.8-1.5 s with three busy processes beside.
LEAD_SECONDS = 4
# After the last due call's second: anything arriving now would be a late or a double call.
SETTLE_SECONDS = 1.5
# A call that arrives later than this after its second did not arrive "at its second".
LATE_SECONDS = 1.0
# The calls the demo waits for: those due within this long of the job's run.
HORIZON = dt.timedelta(seconds=60)


class NotOurs(RuntimeError):
    """DB_NAME names a database the demo did not create; the message says what to do."""


def say(message: str = "") -> None:
    print(message, flush=True)


def sample_rows(first: dt.datetime) -> list[dict[str, Any]]:
    """The formats users really write: the calls that can be due today one second apart
    from `first`, plus rows the job must not call today (invalid, inactive, paused,
    hours away)."""

    def jst(seconds: int) -> str:
        return (first + dt.timedelta(seconds=seconds)).astimezone(TOKYO).strftime("%H:%M:%S")

    la_time = (first + dt.timedelta(seconds=5)).astimezone(LOS_ANGELES).strftime("%H:%M:%S")
    today = first.astimezone(TOKYO).date()
    return [
        {"id": 1, "name": "山田 花子", "phone_number": "+819011110001", "call_weekdays": "月水金", "call_time": jst(0)},
        {"id": 2, "name": "佐藤 一郎", "phone_number": "+819011110002", "call_weekdays": "平日", "call_time": jst(1)},
        {"id": 3, "name": "鈴木 よし子", "phone_number": "+819011110003", "call_weekdays": "mon-fri", "call_time": jst(2)},
        {"id": 4, "name": "田中 正", "phone_number": "090-1111-0004", "call_weekdays": "daily", "call_time": jst(3)},
        {"id": 5, "name": "高橋 みどり", "phone_number": "+819011110005", "call_weekdays": "土日", "call_time": jst(4)},
        {"id": 6, "name": "Grace Ito (Los Angeles)", "phone_number": "+12135550006", "call_weekdays": "毎日",
         "call_time": la_time, "timezone": "America/Los_Angeles"},
        {"id": 7, "name": "伊藤 誤入力", "phone_number": "+819011110007", "call_weekdays": "月x", "call_time": jst(1)},
        {"id": 8, "name": "渡辺 入院中", "phone_number": "+819011110008", "call_weekdays": "daily", "call_time": jst(2),
         "is_active": 0},
        {"id": 9, "name": "中村 夕方", "phone_number": "+819011110009", "call_weekdays": "daily", "call_time": jst(6 * 3600)},
        {"id": 10, "name": "小林 旅行中", "phone_number": "+819011110010", "call_weekdays": "daily", "call_time": jst(3),
         "pause_from": today - dt.timedelta(days=1), "pause_until": today + dt.timedelta(days=1)},
    ]  # fmt: skip


def database(stack: list[Any]) -> dict[str, str]:
    """Connection settings for the demo database, created fresh with schema.sql."""
    if os.environ.get("DB_HOST") or os.environ.get("DB_SOCKET"):
        settings = {
            k: os.environ[k]
            for k in ("DB_HOST", "DB_PORT", "DB_SOCKET", "DB_USER", "DB_PASSWORD")
            if k in os.environ
        }
        settings.setdefault("DB_USER", "root")
        say(f"database: {settings.get('DB_HOST') or settings.get('DB_SOCKET')} (from DB_*)")
    else:
        host, port, private = local_server()
        if private is not None:
            stack.append(private)
            say(f"database: a private mariadbd on 127.0.0.1:{port} (nothing answered on 3306)")
        else:
            say("database: MariaDB/MySQL at 127.0.0.1:3306")
        settings = {"DB_HOST": host, "DB_PORT": str(port), "DB_USER": "root", "DB_PASSWORD": ""}
    name = os.environ.get("DB_NAME", DEMO_DB)
    quoted = "`" + name.replace("`", "``") + "`"
    with connect(settings) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,)
        )
        if cur.fetchone()[0]:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
                (name, MARKER_TABLE),
            )
            if not cur.fetchone()[0]:
                raise NotOurs(
                    f"database {name} exists and the demo did not create it (it has no table"
                    f" {MARKER_TABLE}), so the demo leaves it alone. Set DB_NAME to a new name;"
                    f" or, if it is an older demo's and you are sure, drop it yourself:"
                    f" DROP DATABASE {quoted};"
                )
            cur.execute(f"DROP DATABASE {quoted}")  # the demo's own, from an earlier run
        cur.execute(f"CREATE DATABASE {quoted} CHARACTER SET utf8mb4")
        cur.execute(f"USE {quoted}")
        cur.execute(f"CREATE TABLE {MARKER_TABLE} (note VARCHAR(200) NOT NULL)")
        cur.execute(
            f"INSERT INTO {MARKER_TABLE} VALUES (%s)",
            ("created by demo.py (make demo); the next make demo drops and re-creates it",),
        )
        for statement in schema_statements((ROOT / "schema.sql").read_text()):
            cur.execute(statement)
    return {**settings, "DB_NAME": name}


def connect(settings: dict[str, str]) -> pymysql.connections.Connection:
    """A connection as the job would make it from these DB_* settings."""
    args: dict[str, Any] = {
        "user": settings["DB_USER"],
        "password": settings.get("DB_PASSWORD", ""),
        "autocommit": True,
        "charset": "utf8mb4",
    }
    if "DB_NAME" in settings:
        args["database"] = settings["DB_NAME"]
    if "DB_SOCKET" in settings:
        args["unix_socket"] = settings["DB_SOCKET"]
    else:
        args.update(host=settings["DB_HOST"], port=int(settings.get("DB_PORT", "3306")))
    return pymysql.connect(**args)


def load(settings: dict[str, str], rows: list[dict[str, Any]]) -> None:
    with connect(settings) as conn, conn.cursor() as cur:
        for row in rows:
            cols = ", ".join(row)
            cur.execute(
                f"INSERT INTO users ({cols}) VALUES ({', '.join(['%s'] * len(row))})",
                list(row.values()),
            )


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the job end to end on a local stack.")
    parser.add_argument(
        "--no-webhook", action="store_true", help="leave the webhook down (shows the failure)"
    )
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both unwind through the finally below, which cleans up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    stack: list[Any] = []
    try:
        return demo(stack, args.no_webhook)
    except (NoDatabase, NotOurs) as exc:
        say(f"demo: {exc}")
        return 1
    except KeyboardInterrupt:
        say("\ndemo: interrupted, cleaning up")
        return 130
    finally:
        for item in reversed(stack):
            item.stop()


class JobRun(NamedTuple):
    """One main.py run: its exit code, its stdout lines (JSON) and its log lines."""

    returncode: int
    lines: list[dict[str, Any]]
    logs: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, Any]:
        return self.lines[-1] if self.lines else {}


def run_job(env: dict[str, str], *args: str, show_logs: bool = True) -> JobRun:
    """Run main.py as Cloud Run does (JSON log lines on stderr); show its log as text
    (anything that is not a JSON log line is shown even when `show_logs` is off)."""
    say(f"\n$ python main.py {' '.join(args)}".rstrip())
    job = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    logs = []
    for line in job.stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            say(f"  {line}")
        else:
            logs.append(entry)
            if show_logs:
                say(f"  {as_text(entry)}")
    lines = [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]
    return JobRun(job.returncode, lines, logs)


def as_text(entry: dict[str, Any]) -> str:
    """A JSON log line as main.py's text format shows it: time (JST), level, message, fields."""
    stamp = dt.datetime.fromisoformat(entry.get("time", "1970-01-01T00:00:00+00:00"))
    fields = "".join(
        f" {k}={v}" for k, v in entry.items() if k not in ("severity", "message", "time", "logger")
    )
    line = f"{stamp.astimezone(TOKYO):%H:%M:%S} {entry.get('severity', ''):<7} {entry.get('message', '')}"
    return line + (f" {fields}" if fields else "")


def instants(
    row: dict[str, Any], start: dt.datetime, end: dt.datetime
) -> Iterator[tuple[dt.date, dt.datetime]]:
    """The local dates whose call_time instant (in the row's zone) lies in [start, end)."""
    zone = ZoneInfo(row.get("timezone") or "Asia/Tokyo")
    at = dt.time.fromisoformat(row["call_time"])
    day = start.astimezone(zone).date() - dt.timedelta(days=1)
    while day <= end.astimezone(zone).date() + dt.timedelta(days=1):
        instant = dt.datetime.combine(day, at, tzinfo=zone)
        if start <= instant < end:
            yield day, instant
        day += dt.timedelta(days=1)


def why_not_planned(
    row: dict[str, Any], invalid: dict[int, str], start: dt.datetime, end: dt.datetime
) -> str:
    """Why the job's plan has no call for a row: its log line, or the row against the
    run's window."""
    if row["id"] in invalid:
        return f"invalid: {invalid[row['id']]}"
    if row.get("is_active", 1) != 1:
        return "inactive: not called"
    days = list(instants(row, start, end))
    start_of_pause, end_of_pause = row.get("pause_from"), row.get("pause_until")
    for day, _ in days:
        if (start_of_pause or end_of_pause) and (start_of_pause or day) <= day <= (
            end_of_pause or day
        ):
            return f"paused: {start_of_pause or '…'}..{end_of_pause or '…'} covers {day}"
    if days:
        day = days[0][0]
        holiday = " (a national holiday)" if jpholiday.is_holiday(day) else ""
        return f"not called: {day:%a %m-%d}{holiday} is not one of its days"
    return f"later: its time is outside this run's window ({start.astimezone(TOKYO):%H:%M}-{end.astimezone(TOKYO):%H:%M} JST)"


def demo(stack: list[Any], no_webhook: bool) -> int:
    now = dt.datetime.now(dt.UTC)
    say(
        f"anpi-call-scheduler demo, now {now.astimezone(TOKYO):%Y-%m-%d %H:%M:%S} JST ({now.astimezone(TOKYO):%A})"
    )
    settings = database(stack)
    queue = f"demo-{uuid.uuid4().hex[:8]}"  # a fresh queue: the emulator misbehaves on reuse
    emulator = Emulator(
        f"projects/{PROJECT}/locations/asia-northeast1/queues/{queue}", max_retries=1
    )
    stack.append(emulator)
    say(f"Cloud Tasks emulator: {emulator.address}, queue {queue}")
    receiver: WebhookReceiver | None = None
    if no_webhook:
        url = f"http://127.0.0.1:{free_port()}/call"
        say(f"webhook: DOWN on purpose (--no-webhook): nothing listens at {url}")
    else:
        receiver = WebhookReceiver(on_delivery=show_delivery).start()
        stack.append(receiver)
        url = receiver.url
        say(f"webhook: {url}")

    # The stack is up: the calls fall due a few seconds from now, at whole seconds.
    first = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=LEAD_SECONDS + 1)
    rows = sample_rows(first)
    load(settings, rows)
    say(
        f"loaded schema.sql and {len(rows)} users into {settings['DB_NAME']}; calls from {first.astimezone(TOKYO):%H:%M:%S} JST"
    )

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        **settings,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "CLOUD_TASKS_QUEUE": queue,
        "CLOUD_TASKS_EMULATOR_HOST": emulator.address,
        "ANPI_CALL_URL": url,
        "DEFAULT_TIMEZONE": "Asia/Tokyo",
        "LOG_FORMAT": "json",
        "NO_GCE_CHECK": "true",
    }
    launched = dt.datetime.now(dt.UTC)
    job = run_job(env)
    summary = job.summary
    say(f"  summary: {json.dumps(summary, ensure_ascii=False)}")
    if job.returncode != 0 or not summary:
        say(f"demo: main.py exited {job.returncode}")
        return 1
    # This run's plan: a dry run as of the same instant (while its calls fall due).
    run_now = next(
        (e["now"] for e in job.logs if e.get("message") == "run started" and "now" in e), None
    )
    plan_run = run_job(env, "--dry-run", "--now", run_now or launched.isoformat(), show_logs=False)
    plan = {c["user_id"]: dt.datetime.fromisoformat(c["scheduled_at"])
            for c in plan_run.lines if "scheduled_at" in c and "delete" not in c}  # fmt: skip
    for user, at in sorted(plan.items(), key=lambda item: item[1]):
        say(f"  plan: user {user} at {at.astimezone(TOKYO):%H:%M:%S} JST")
    if plan_run.returncode != 0 or len(plan) != summary["calls_planned"]:
        say(
            f"demo: the dry run's plan ({len(plan)} calls) is not the run's ({summary['calls_planned']})"
        )
        return 1

    horizon = dt.datetime.fromisoformat(run_now) if run_now else launched
    due = {user: at for user, at in plan.items() if at <= horizon + HORIZON}
    last = max(due.values(), default=dt.datetime.now(dt.UTC))

    def settle() -> float:
        """Seconds left until the last due call's second plus SETTLE_SECONDS."""
        return max(0.0, last.timestamp() + SETTLE_SECONDS - time.time())

    say(
        f"\nwaiting for {len(due)} due call(s), until {last.astimezone(TOKYO):%H:%M:%S} JST + {SETTLE_SECONDS} s ..."
    )
    if receiver is not None:
        receiver.wait_for(len(due), timeout=settle() + 5)
    time.sleep(settle())  # anything more arriving now would be a late or a double call
    delivered = list(receiver.deliveries) if receiver is not None else []
    return report(rows, job, plan, due, delivered, url if receiver is None else None)


def show_delivery(d: Delivery) -> None:
    late = d.arrived - dt.datetime.fromisoformat(d.body["scheduled_at"]).timestamp()
    say(
        f"  📞 call for user {d.body['user_id']} (***{d.body['phone_number'][-4:]}):"
        f" scheduled {d.body['scheduled_at']},"
        f" arrived {dt.datetime.fromtimestamp(d.arrived, TOKYO):%H:%M:%S.%f}"[:-3]
        + f", {late:+.2f} s late"
    )


def report(
    rows: list[dict[str, Any]],
    job: JobRun,
    plan: dict[int, dt.datetime],
    due: dict[int, dt.datetime],
    delivered: list[Delivery],
    down: str | None,
) -> int:
    """Say why each user was or was not called; 0 if every due call arrived once, at its
    second; 1 otherwise. `down`: the webhook's URL when it was left down on purpose."""
    summary = job.summary
    start = dt.datetime.fromisoformat(summary["window_start"])
    end = dt.datetime.fromisoformat(summary["window_end"])
    invalid = {e["user_id"]: e["message"].removeprefix("invalid row skipped: ")
               for e in job.logs if e.get("message", "").startswith("invalid row skipped")}  # fmt: skip
    arrivals: dict[int, list[float]] = {}
    for d in delivered:
        late = d.arrived - dt.datetime.fromisoformat(d.body["scheduled_at"]).timestamp()
        arrivals.setdefault(d.body["user_id"], []).append(late)
    say("\n=== report ===")
    for row in rows:
        user = row["id"]
        if user in arrivals:
            status = "called" + "".join(
                f", {late:+.2f} s after its time" for late in arrivals[user]
            )
        elif user in due:
            at = f"due {due[user].astimezone(TOKYO):%H:%M:%S} JST"
            status = (
                f"{at}, not delivered: the webhook is down (--no-webhook)"
                if down
                else f"{at}, NOT delivered"
            )
        elif user in plan:
            status = f"on the queue for {plan[user].astimezone(TOKYO):%H:%M:%S} JST, after this demo ends"
        else:
            status = why_not_planned(row, invalid, start, end)
        say(f"  user {user:<2} {row['call_weekdays']:<8} {row['call_time']}  {status}")
    lates = [late for times in arrivals.values() for late in times]
    say("")
    say(f"rows read      {summary['users_scanned']}")
    say(f"calls planned  {summary['calls_planned']}")
    say(f"tasks created  {summary['tasks_created']}")
    say(f"delivered      {len(delivered)} of {len(due)}")
    say(
        f"invalid rows   {summary['rows_invalid']}"
        + "".join(f"\n  - {m}" for m in invalid.values())
    )
    if len(delivered) > len(arrivals):
        say(
            f"\ndemo: FAILED: a call arrived twice ({len(delivered)} deliveries, {len(arrivals)} users)"
        )
        return 1
    if missing := set(due) - set(arrivals):
        say(
            f"\ndemo: FAILED: {len(missing)} due call(s) did not arrive at the webhook"
            + (f" {down} (it is down: --no-webhook)" if down else "")
        )
        return 1
    if lates and max(lates) > LATE_SECONDS:
        say(
            f"\ndemo: FAILED: a call arrived {max(lates):.2f} s after its time (the job created it late?)"
        )
        return 1
    say("\ndemo: OK, every due call arrived once, at its second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
