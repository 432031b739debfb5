"""See it work: MySQL rows in, Cloud Tasks out, the webhook called at the second.

`make demo` runs this with .venv. It needs no Google Cloud account:
- database: DB_HOST/DB_* if set; else MariaDB/MySQL at 127.0.0.1:3306 (database
  anpi_demo); else a private, throwaway mariadbd (tests/localdb.py);
- Cloud Tasks: gcloud-tasks-emulator in .venv-emulator, which really POSTs each task at
  its schedule_time; a small local webhook prints each call it receives;
- the job: main.py, run once, exactly as Cloud Run runs it.
It waits (bounded) for the calls due within the next minute, prints a report, cleans up
every process it started (also on Ctrl-C or failure) and exits 1 if a due call did not
arrive.

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
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pymysql

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from tests.emulator import Emulator, free_port  # noqa: E402
from tests.localdb import NoDatabase, local_server, schema_statements  # noqa: E402
from tests.webhook import WebhookReceiver  # noqa: E402

TOKYO = ZoneInfo("Asia/Tokyo")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
DEMO_DB = "anpi_demo"
# The table that marks a database as the demo's own (see the module docstring).
MARKER_TABLE = "anpi_demo_marker"


class NotOurs(RuntimeError):
    """DB_NAME names a database the demo did not create; the message says what to do."""
PROJECT = "anpi-demo"


def say(message: str = "") -> None:
    print(message, flush=True)


def sample_rows(now: dt.datetime) -> list[dict[str, Any]]:
    """The formats users really write, most with calls 15-35 s after `now` (JST)."""

    def jst(seconds: int) -> str:
        return (now + dt.timedelta(seconds=seconds)).astimezone(TOKYO).strftime("%H:%M:%S")

    la_time = (now + dt.timedelta(seconds=35)).astimezone(LOS_ANGELES).strftime("%H:%M:%S")
    return [
        {"id": 1, "name": "山田 花子", "phone_number": "+819011110001", "call_weekdays": "月水金", "call_time": jst(15)},
        {"id": 2, "name": "佐藤 一郎", "phone_number": "+819011110002", "call_weekdays": "平日", "call_time": jst(20)},
        {"id": 3, "name": "鈴木 よし子", "phone_number": "+819011110003", "call_weekdays": "mon-fri", "call_time": jst(25)},
        {"id": 4, "name": "田中 正", "phone_number": "090-1111-0004", "call_weekdays": "daily", "call_time": jst(30)},
        {"id": 5, "name": "高橋 みどり", "phone_number": "+819011110005", "call_weekdays": "土日", "call_time": jst(32)},
        {"id": 6, "name": "Grace Ito (Los Angeles)", "phone_number": "+12135550006", "call_weekdays": "毎日",
         "call_time": la_time, "timezone": "America/Los_Angeles"},
        {"id": 7, "name": "伊藤 誤入力", "phone_number": "+819011110007", "call_weekdays": "月x", "call_time": jst(20)},
        {"id": 8, "name": "渡辺 入院中", "phone_number": "+819011110008", "call_weekdays": "daily", "call_time": jst(22),
         "is_active": 0},
        {"id": 9, "name": "中村 夕方", "phone_number": "+819011110009", "call_weekdays": "daily", "call_time": jst(6 * 3600)},
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
        cur.execute("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,))
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


def demo(stack: list[Any], no_webhook: bool) -> int:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    say(
        f"anpi-call-scheduler demo, now {now.astimezone(TOKYO):%Y-%m-%d %H:%M:%S} JST ({now.astimezone(TOKYO):%A})"
    )
    settings = database(stack)
    rows = sample_rows(now)
    load(settings, rows)
    say(f"loaded schema.sql and {len(rows)} users into {settings['DB_NAME']}")

    queue = f"demo-{uuid.uuid4().hex[:8]}"  # a fresh queue: the emulator misbehaves on reuse
    emulator = Emulator(
        f"projects/{PROJECT}/locations/asia-northeast1/queues/{queue}", max_retries=1
    )
    stack.append(emulator)
    say(f"Cloud Tasks emulator: {emulator.address}, queue {queue}")
    if no_webhook:
        url = f"http://127.0.0.1:{free_port()}/call"
        receiver = None
        say(f"webhook: DOWN on purpose (--no-webhook): nothing listens at {url}")
    else:
        receiver = WebhookReceiver(
            on_delivery=lambda d: say(
                f"  📞 call for user {d.body['user_id']} (***{d.body['phone_number'][-4:]}):"
                f" scheduled {d.body['scheduled_at']},"
                f" arrived {dt.datetime.fromtimestamp(d.arrived, TOKYO):%H:%M:%S.%f}"[:-3]
                + f", {d.arrived - dt.datetime.fromisoformat(d.body['scheduled_at']).timestamp():+.2f} s late"
            )
        ).start()
        stack.append(receiver)
        url = receiver.url
        say(f"webhook: {url}")

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        **settings,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "CLOUD_TASKS_QUEUE": queue,
        "CLOUD_TASKS_EMULATOR_HOST": emulator.address,
        "ANPI_CALL_URL": url,
        "LOG_FORMAT": "text",
        "NO_GCE_CHECK": "true",
    }
    say("\n$ python main.py")
    job = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for line in job.stderr.splitlines():
        say(f"  {line}")
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    say(f"  summary: {json.dumps(summary, ensure_ascii=False)}")
    if job.returncode != 0:
        say(f"demo: main.py exited {job.returncode}")
        return 1

    due = summary["tasks_created"] + summary["tasks_existing"]
    deadline = time.monotonic() + 60
    say(f"\nwaiting for {due} due call(s) (at most 60 s) ...")
    delivered: list[Any] = []
    if receiver is not None:
        delivered = receiver.wait_for(due, timeout=max(0.0, deadline - time.monotonic()))
    else:
        time.sleep(45)  # the calls fall due while nothing listens
    if receiver is not None:
        time.sleep(2)  # anything more arriving now would be a double call
        delivered = list(receiver.deliveries)
    invalid = dict(re.findall(r"invalid row skipped: (.*?)  user_id=(\d+)", job.stderr))
    invalid_ids = {int(user): reason for reason, user in invalid.items()}
    called = {d.body["user_id"] for d in delivered}
    say("\n=== report ===")
    for row in rows:
        if row["id"] in called:
            status = "called"
        elif row["id"] in invalid_ids:
            status = f"invalid: {invalid_ids[row['id']]}"
        elif row.get("is_active") == 0:
            status = "inactive: not called"
        elif row["id"] == 9:
            status = "later: 6 hours ahead, outside this run's window"
        else:
            status = "not called: today is not one of its weekdays" if receiver else "not delivered"
        say(f"  user {row['id']}  {row['call_weekdays']:<8} {row['call_time']}  {status}")
    say("")
    say(f"rows read      {summary['users_scanned']}")
    say(f"calls planned  {summary['calls_planned']}")
    say(f"tasks created  {summary['tasks_created']}")
    say(f"delivered      {len(delivered)} of {due}")
    say(f"invalid rows   {summary['rows_invalid']}" + "".join(f"\n  - {m}" for m in invalid))
    if len(delivered) > len(called):
        say(
            f"\ndemo: FAILED: a call arrived twice ({len(delivered)} deliveries, {len(called)} users)"
        )
        return 1
    if len(delivered) < due:
        say(
            f"\ndemo: FAILED: {due - len(delivered)} due call(s) did not arrive at the webhook {url}"
            + (" (it is down: --no-webhook)" if receiver is None else "")
        )
        return 1
    say("\ndemo: OK, every due call arrived once, at its second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
