"""anpi-call-scheduler: turn users' safety-check call settings into Cloud Tasks.

Reads every active user whose call can fall in [now - GRACE, now + LOOKAHEAD) from
MySQL, works out each call's exact instant in the user's zone (JST by default), records
the task id it gives each call in `scheduled_calls`, then creates that Cloud Tasks HTTP
task; at the call's instant the task POSTs to the call webhook.

Run: python main.py [--dry-run | --check] [--now ISO8601]   (settings: environment or .env)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import unicodedata
import urllib.parse
import zoneinfo
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import jpholiday
import phonenumbers
import pymysql
from dotenv import dotenv_values
from google.api_core import exceptions as gexc
from google.api_core import retry as retries
from google.api_core import timeout as timeouts
from google.auth import exceptions as auth_exceptions

UTC = dt.UTC
DAY_SECONDS = 86_400

# Cloud Tasks refuses a task name for about an hour after the task ran or was
# deleted; planning never reaches further back than that, so re-creating the recorded
# id of a call that already ran meets ALREADY_EXISTS instead of calling twice.
MAX_GRACE_MINUTES = 60
# A task due this close to the job's clock may be firing already: never deleted, and a
# refused name of it is taken as "ran" rather than "deleted by someone else".
FIRING_MARGIN = dt.timedelta(seconds=60)
# Ids a call may be given (0 = base id, n = "-rN"); past this something is deleting
# the job's tasks in a loop, and the call fails loudly instead.
MAX_ALTERNATIVE = 20
# A recorded id is created again only while Cloud Tasks surely still refuses its name
# if it ran (about an hour): older, "ran" and "never created" look alike.
MAX_RECREATE_AGE = dt.timedelta(minutes=50)
# How long a run waits for another run of its shard to finish (see `CallRecord.lock`).
RUN_LOCK_WAIT_SECONDS = 120
# Rows per scheduled_calls write, and per retention DELETE.
RECORD_BATCH = 500
PURGE_BATCH = 5000
PURGE_MAX_BATCHES = 50
# schedule_time may be at most 30 days ahead.
MAX_LOOKAHEAD_MINUTES = 30 * 24 * 60
TASK_ID_RE = re.compile(r"^([0-9a-f]{8})-anpi-(-?\d+)-(\d{8}T\d{6}Z)(?:-r(\d+))?$")
# Between the digits of a phone number people type spaces, brackets and dashes (after
# NFKC, which folds full-width digits, dashes and brackets); nothing else is allowed.
# The dashes: U+30FC (the long-vowel mark an IME types), U+2010-U+2015, U+2212.
PHONE_SEPARATORS = re.compile("[\\s().\\-\u30fc\u2010-\u2015\u2212]")
PHONE_CHARS = re.compile(r"\+?[0-9]+")
CLOCK_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("auto", "json", "text")

log = logging.getLogger("anpi")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """One or more settings are missing or malformed; the message names each."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one run, validated once by `Config.from_env`."""

    project: str | None
    location: str
    queue: str
    emulator_host: str | None
    call_url: str | None
    oidc_service_account: str | None
    db_host: str | None
    db_port: int
    db_socket: str | None
    db_user: str
    db_password: str = dataclasses.field(repr=False)  # never printed
    db_name: str
    db_connect_timeout: int
    db_read_timeout: int
    db_retry_seconds: float
    default_timezone: zoneinfo.ZoneInfo
    phone_region: str  # the country of national phone numbers, from DEFAULT_COUNTRY_CODE
    lookahead: dt.timedelta
    grace: dt.timedelta
    log_level: str
    log_json: bool
    task_index: int
    task_count: int
    enqueue_concurrency: int
    enqueue_max_per_second: float
    enqueue_deadline_seconds: float
    reconcile: bool
    retention: dt.timedelta
    queue_per_shard: bool = False
    queue_max_dispatches_per_second: float = 10.0
    peak_warn_minutes: float = 5.0

    @property
    def queue_name(self) -> str:
        """This shard's queue: CLOUD_TASKS_QUEUE, or `{CLOUD_TASKS_QUEUE}-{i}` with
        QUEUE_PER_SHARD=1."""
        return f"{self.queue}-{self.task_index}" if self.queue_per_shard else self.queue

    @property
    def queue_path(self) -> str:
        return self.path_of(self.queue_name)

    def path_of(self, queue_name: str) -> str:
        """The full name of a queue of this project and location."""
        return f"projects/{self.project}/locations/{self.location}/queues/{queue_name}"

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, dry_run: bool = False) -> Config:
        """Build the config from `env`, collecting every problem into one ConfigError."""
        errors: list[str] = []

        def text(name: str, default: str | None = None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        def integer(name: str, default: int, low: int, high: int) -> int:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                errors.append(f"{name}={raw!r} is not an integer")
                return default
            if not low <= value <= high:
                errors.append(f"{name}={value} must be between {low} and {high}")
            return value

        def number(name: str, default: float, high: float) -> float:
            """A positive number up to `high`."""
            raw = text(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if not 0 < value <= high:  # NaN fails too
                errors.append(f"{name}={raw!r} must be a number above 0 and at most {high:g}")
                return default
            return value

        project = text("GOOGLE_CLOUD_PROJECT")
        call_url = text("ANPI_CALL_URL")
        if not dry_run:
            if project is None:
                errors.append("GOOGLE_CLOUD_PROJECT is required (or use --dry-run)")
            if call_url is None:
                errors.append("ANPI_CALL_URL is required (or use --dry-run)")
        if call_url is not None and (problem := _url_problem(call_url)):
            errors.append(f"ANPI_CALL_URL {problem}")

        oidc = text("TASKS_OIDC_SERVICE_ACCOUNT")
        if oidc is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", oidc):
            errors.append(f"TASKS_OIDC_SERVICE_ACCOUNT={oidc!r} is not a service account email")

        emulator = text("CLOUD_TASKS_EMULATOR_HOST")
        if emulator is not None and not re.fullmatch(r"[^\s:/]+:[0-9]{1,5}", emulator):
            errors.append(f"CLOUD_TASKS_EMULATOR_HOST={emulator!r} must be host:port")

        socket_path = text("DB_SOCKET")
        instance = text("INSTANCE_CONNECTION_NAME")
        if socket_path is None and instance is not None:
            if not re.fullmatch(r"[^:\s/]+(:[^:\s/]+)?:[^:\s/]+:[^:\s/]+", instance):
                errors.append(
                    f"INSTANCE_CONNECTION_NAME={instance!r} must be PROJECT:REGION:INSTANCE"
                )
            socket_path = f"/cloudsql/{instance}"
        db_host = text("DB_HOST")
        if socket_path is None and db_host is None:
            errors.append("DB_HOST, DB_SOCKET or INSTANCE_CONNECTION_NAME is required")

        zone_name = text("DEFAULT_TIMEZONE", "Asia/Tokyo")
        default_zone = _zone_or_none(zone_name)
        if default_zone is None:
            errors.append(f"DEFAULT_TIMEZONE={zone_name!r} is not an IANA time zone")

        country_code = integer("DEFAULT_COUNTRY_CODE", 81, 1, 999)
        phone_region = phonenumbers.region_code_for_country_code(country_code)
        if phone_region in ("ZZ", "001"):  # 001: a non-geographic code such as 800
            errors.append(f"DEFAULT_COUNTRY_CODE={country_code} is not a country calling code")
        grace = integer("GRACE_MINUTES", 15, 0, MAX_GRACE_MINUTES - 1)
        lookahead = integer("LOOKAHEAD_MINUTES", 120, 1, MAX_LOOKAHEAD_MINUTES)
        task_count = integer("CLOUD_RUN_TASK_COUNT", 1, 1, 10_000)
        task_index = integer("CLOUD_RUN_TASK_INDEX", 0, 0, 9_999)
        if task_index >= task_count:
            errors.append(
                f"CLOUD_RUN_TASK_INDEX={task_index} must be below CLOUD_RUN_TASK_COUNT={task_count}"
            )

        log_level = (text("LOG_LEVEL", "INFO") or "INFO").upper()
        if log_level not in LOG_LEVELS:
            errors.append(f"LOG_LEVEL={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        log_format = (text("LOG_FORMAT", "auto") or "auto").lower()
        if log_format not in LOG_FORMATS:
            errors.append(f"LOG_FORMAT={log_format!r} must be one of {', '.join(LOG_FORMATS)}")
        # Cloud Run sets CLOUD_RUN_JOB in every job container; there logs are JSON.
        log_json = log_format == "json" or (log_format == "auto" and "CLOUD_RUN_JOB" in env)

        rate = integer("ENQUEUE_MAX_PER_SECOND", 500, 0, 100_000)
        reconcile = text("RECONCILE", "1")
        if reconcile not in ("0", "1"):
            errors.append(f"RECONCILE={reconcile!r} must be 1 (on) or 0 (off)")
        queue_per_shard = text("QUEUE_PER_SHARD", "0")
        if queue_per_shard not in ("0", "1"):
            errors.append(
                f"QUEUE_PER_SHARD={queue_per_shard!r} must be 1 (shard i uses"
                " CLOUD_TASKS_QUEUE-i) or 0 (every shard uses CLOUD_TASKS_QUEUE)"
            )
        config = cls(
            project=project,
            location=text("CLOUD_TASKS_LOCATION", "asia-northeast1") or "",
            queue=text("CLOUD_TASKS_QUEUE", "anpi-call-queue") or "",
            emulator_host=emulator,
            call_url=call_url,
            oidc_service_account=oidc,
            db_host=db_host,
            db_port=integer("DB_PORT", 3306, 1, 65_535),
            db_socket=socket_path,
            db_user=text("DB_USER", "default") or "",
            db_password=env.get("DB_PASSWORD", ""),
            db_name=text("DB_NAME", "default") or "",
            db_connect_timeout=integer("DB_CONNECT_TIMEOUT", 10, 1, 300),
            db_read_timeout=integer("DB_READ_TIMEOUT", 60, 1, 3600),
            db_retry_seconds=integer("DB_RETRY_SECONDS", 30, 0, 600),
            default_timezone=default_zone or zoneinfo.ZoneInfo("UTC"),
            phone_region=phone_region,
            lookahead=dt.timedelta(minutes=lookahead),
            grace=dt.timedelta(minutes=grace),
            log_level=log_level,
            log_json=log_json,
            task_index=task_index,
            task_count=task_count,
            enqueue_concurrency=integer("ENQUEUE_CONCURRENCY", 32, 1, 256),
            # 0 lifts the cap (benchmarks); Cloud Tasks asks for ramp-up above 500/s.
            enqueue_max_per_second=float(rate),
            enqueue_deadline_seconds=integer("ENQUEUE_DEADLINE_SECONDS", 60, 1, 600),
            reconcile=reconcile != "0",
            retention=dt.timedelta(days=integer("SCHEDULED_CALLS_RETENTION_DAYS", 35, 2, 3650)),
            queue_per_shard=queue_per_shard == "1",
            # What deploy.sh sets on the queue; Cloud Tasks allows at most 500.
            queue_max_dispatches_per_second=number("QUEUE_MAX_DISPATCHES_PER_SECOND", 10, 500),
            peak_warn_minutes=number("PEAK_WARN_MINUTES", 5, 24 * 60),
        )
        if errors:
            raise ConfigError("invalid configuration: " + "; ".join(errors))
        return config


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be the webhook (https, or http to loopback only), or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and host:
        if host == "localhost" or _is_loopback(host):
            return None
        return "must use https (http is allowed only for localhost/127.0.0.1)"
    return f"must be an https:// URL (got scheme {parts.scheme!r})"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _zone_or_none(name: str | None) -> zoneinfo.ZoneInfo | None:
    """The IANA zone called exactly `name`, or None when there is none."""
    if not name or name not in _zone_names():
        return None
    return zoneinfo.ZoneInfo(name)


@functools.cache
def _zone_names() -> frozenset[str]:
    # zoneinfo alone would also open paths such as "../x" or "Asia/Tokyo/"; the list of
    # real keys keeps row values away from the file system.
    return frozenset(zoneinfo.available_timezones())


# ---------------------------------------------------------------------------
# Logging: JSON lines for Cloud Logging on Cloud Run, readable text locally
# ---------------------------------------------------------------------------

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line with Cloud Logging's `severity` and `message`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": dt.datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str, as_json: bool, stream: Any = None) -> None:
    """Send the job's logs to `stream` (default stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def mask_phone(value: object) -> str:
    """A phone number reduced to its last four digits, safe for logs."""
    text = unicodedata.normalize("NFKC", value) if isinstance(value, str) else ""
    digits = re.sub(r"[^0-9]", "", text)
    return f"***{digits[-4:]}" if len(digits) >= 8 else "***"


# ---------------------------------------------------------------------------
# Data source: MySQL / Cloud SQL
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserRow:
    """One `users` row as the driver returned it, before any validation."""

    id: int
    phone_number: object
    call_weekdays: object
    call_time: object
    timezone: object
    pause_from: object = None
    pause_until: object = None


USER_COLUMNS = "id, phone_number, call_weekdays, call_time, timezone, pause_from, pause_until"
# Rows whose TIME lies outside a day are read too, so that they are reported invalid.
OUT_OF_DAY_SQL = "call_time < CAST('00:00:00' AS TIME) OR call_time >= CAST('24:00:00' AS TIME)"


# Worth another connect: 2002/2003 cannot connect, 2006/2013 lost, 1040 too many connections.
# Anything else (a wrong password, 1045; an unknown database, 1049) fails at once.
TRANSIENT_DB_ERRORS = (2002, 2003, 2006, 2013, 1040)


class DatabaseError(Exception):
    """The database could not be reached or stopped answering."""


class SetupError(Exception):
    """The database lacks a table, a column or a grant the job needs (exit 2)."""


def connect(config: Config, *, streaming: bool) -> Any:
    """Open a connection, retrying transient failures within DB_RETRY_SECONDS.

    `streaming` gives the reader: an unbuffered cursor that rows stream through while
    tasks are created. Otherwise the writer of `scheduled_calls`, with plain cursors.
    """
    kwargs: dict[str, Any] = {
        "user": config.db_user,
        "password": config.db_password,
        "database": config.db_name,
        "charset": "utf8mb4",
        # PyMySQL reads the server's handshake with the read timeout: until connected,
        # both are the connect timeout, so a server that accepts and stays silent (a
        # Cloud SQL failover) costs one DB_CONNECT_TIMEOUT per attempt, not 60 s.
        "connect_timeout": config.db_connect_timeout,
        "read_timeout": config.db_connect_timeout,
        "write_timeout": config.db_connect_timeout,
        "cursorclass": pymysql.cursors.SSCursor if streaming else pymysql.cursors.Cursor,
        "autocommit": True,
    }
    if streaming:
        # Rows stream while tasks are created; a slow enqueue must not make the server
        # give up on a reader that pauses (MySQL's default is 60 s).
        kwargs["init_command"] = "SET SESSION net_write_timeout = 600"
    if config.db_socket:
        kwargs["unix_socket"] = config.db_socket
    else:
        kwargs["host"], kwargs["port"] = config.db_host, config.db_port

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, pymysql.err.OperationalError) and exc.args[:1] in {
            (code,) for code in TRANSIENT_DB_ERRORS
        }

    def warn(exc: BaseException) -> None:
        log.warning("database not reachable yet, retrying: %s", exc)

    retry = retries.Retry(
        predicate=transient,
        initial=0.5,
        maximum=5.0,
        multiplier=2.0,
        timeout=config.db_retry_seconds,
        on_error=warn,
    )
    try:
        conn = retry(pymysql.connect)(**kwargs)
    except gexc.RetryError as exc:
        bound = config.db_retry_seconds + config.db_connect_timeout
        raise DatabaseError(
            f"cannot connect to the database within {bound:g}s"
            f" (DB_RETRY_SECONDS + DB_CONNECT_TIMEOUT): {exc.cause}"
        ) from exc
    except pymysql.err.MySQLError as exc:
        raise DatabaseError(f"cannot connect to the database: {exc}") from exc
    # Connected: from here on each read and write waits up to DB_READ_TIMEOUT. PyMySQL
    # has no public setter; it applies these attributes before every socket operation.
    conn._read_timeout = conn._write_timeout = config.db_read_timeout
    return conn


def read_rows(conn: Any, config: Config, window: Window) -> Generator[UserRow, None, None]:
    """Stream the active rows whose call can fall in `window`, this shard's only.

    One query per distinct `timezone` value (see `zone_query`), each a range scan of
    the index on (is_active, timezone, call_time), read through an unbuffered cursor.
    All of them read one consistent snapshot, so a row whose zone changes meanwhile is
    read exactly once.
    """
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            cur.execute("SELECT DISTINCT timezone FROM users WHERE is_active = 1")
            zone_values = [value for (value,) in cur.fetchall()]
        for value in zone_values:
            cur = conn.cursor()
            finished = False
            try:
                cur.execute(*zone_query(value, config, window))
                for row in cur:
                    yield UserRow(*row)
                finished = True
            finally:
                if finished:
                    cur.close()
                else:
                    _abandon(cur)
        conn.commit()
    except pymysql.err.MySQLError as exc:
        raise DatabaseError(f"lost the database while reading users: {exc}") from exc


def read_schedules(conn: Any, config: Config) -> Iterator[tuple[UserRow, int]]:
    """Every active row of this shard, grouped by what schedules it, call times cut to
    the minute: (a row standing for the group, its number of rows). For the peak
    minute of a dry run, which reads only its window's rows otherwise.

    Cutting the seconds moves no call out of its minute (see `count_minutes`).
    Out-of-day times are left out (invalid).
    """
    sql = (
        "SELECT timezone, call_weekdays, SEC_TO_TIME(TIME_TO_SEC(call_time) DIV 60 * 60) AS t,"
        " pause_from, pause_until, COUNT(*) FROM users WHERE is_active = 1"
        " AND call_time >= CAST('00:00:00' AS TIME) AND call_time < CAST('24:00:00' AS TIME)"
    )
    args: list[Any] = []
    if config.task_count > 1:
        sql += " AND MOD(MOD(id, %s) + %s, %s) = %s"
        args += [config.task_count] * 3 + [config.task_index]
    sql += " GROUP BY timezone, call_weekdays, t, pause_from, pause_until"
    cur = conn.cursor()
    finished = False
    try:
        cur.execute(sql, args)
        for zone, weekdays, at, pause_from, pause_until, count in cur:
            yield UserRow(0, None, weekdays, at, zone, pause_from, pause_until), count
        finished = True
    except pymysql.err.MySQLError as exc:
        raise DatabaseError(f"lost the database while counting the peak minute: {exc}") from exc
    finally:
        if finished:
            cur.close()
        else:
            _abandon(cur)


def _abandon(cursor: Any) -> None:
    """Drop an unbuffered result part-way without reading the rest.

    PyMySQL would otherwise drain it on close or garbage collection, which is slow on a
    live connection (a stop part-way) and raises on a lost one.
    """
    result = getattr(cursor, "_result", None)
    if result is not None:
        result.unbuffered_active = False


def zone_query(zone_value: object, config: Config, window: Window) -> tuple[str, list[Any]]:
    """SQL and arguments for the rows with this `timezone` value that can be due.

    The `call_time` ranges come from `local_time_ranges`; rows whose TIME lies outside
    a day, or whose zone is unknown, are selected too so that they are reported.
    """
    if zone_value is None:
        zone_sql, args = "timezone IS NULL", []
    else:
        zone_sql, args = "timezone = %s", [zone_value]
    try:
        zone = parse_zone(zone_value, config.default_timezone)
        ranges = local_time_ranges(zone, window)
    except InvalidRow:
        ranges = None
    if ranges is None:
        time_sql = "call_time IS NOT NULL"
    else:
        between = "(call_time >= CAST(%s AS TIME) AND call_time < CAST(%s AS TIME))"
        time_sql = " OR ".join([between] * len(ranges) + [OUT_OF_DAY_SQL])
        args += [_clock_text(seconds) for pair in ranges for seconds in pair]
    sql = f"SELECT {USER_COLUMNS} FROM users WHERE is_active = 1 AND {zone_sql} AND ({time_sql})"
    if config.task_count > 1:
        # Python's modulo (never negative), so negative ids have a shard too.
        sql += " AND MOD(MOD(id, %s) + %s, %s) = %s"
        args += [config.task_count] * 3 + [config.task_index]
    return sql, args


def _clock_text(seconds: int) -> str:
    """HH:MM:SS of a number of seconds (hours may exceed 23, as MySQL TIME's do)."""
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------
# Scheduling: pure functions of the rows, the window and nothing else
# ---------------------------------------------------------------------------


class InvalidRow(ValueError):
    """A row that cannot be planned; the message is the reason (never the phone)."""

    column = "row"  # set by `parse_row` to the column at fault


@dataclasses.dataclass(frozen=True)
class Window:
    """The instants a run plans: start <= t < end, both aware."""

    start: dt.datetime
    end: dt.datetime

    @classmethod
    def around(cls, now: dt.datetime, grace: dt.timedelta, lookahead: dt.timedelta) -> Window:
        now = now.astimezone(UTC)
        return cls(now - grace, now + lookahead)

    @classmethod
    def next_day(cls, now: dt.datetime) -> Window:
        """The 24 hours from `now`: where the peak minute is looked for."""
        return cls.around(now, dt.timedelta(), dt.timedelta(days=1))


@dataclasses.dataclass(frozen=True)
class CallSetting:
    """A validated row: who is called, on which weekdays, at which local time."""

    user_id: int
    phone_number: str  # E.164
    weekdays: frozenset[int]  # 0 = Monday ... 6 = Sunday, as date.weekday()
    call_time: dt.time
    zone: zoneinfo.ZoneInfo
    holidays: bool = False  # also on Japan's national holidays (祝, 祝日)
    without_holidays: bool = False  # never on one (祝日除く)
    pause_from: dt.date | None = None  # no calls on local dates pause_from..pause_until;
    pause_until: dt.date | None = None  # a None side is open

    def paused_on(self, day: dt.date) -> bool:
        if self.pause_from is None and self.pause_until is None:
            return False
        return (self.pause_from is None or self.pause_from <= day) and (
            self.pause_until is None or day <= self.pause_until
        )

    def chosen_day(self, day: dt.date) -> bool:
        """Whether local date `day` is one of the row's days (pauses aside)."""
        if (self.holidays or self.without_holidays) and is_holiday(day):
            return self.holidays
        return day.weekday() in self.weekdays


class CallKey(NamedTuple):
    """Which call: whose, and when (UTC). Every task id of a call derives from it."""

    user_id: int
    instant: dt.datetime


@dataclasses.dataclass(frozen=True)
class Call:
    """One planned call: a task to create."""

    user_id: int
    phone_number: str
    instant: dt.datetime  # UTC
    zone: zoneinfo.ZoneInfo

    @property
    def key(self) -> CallKey:
        return CallKey(self.user_id, self.instant)

    @property
    def scheduled_at(self) -> str:
        """ISO 8601 in the user's zone, with its offset: 2026-11-30T09:00:00+09:00."""
        return self.instant.astimezone(self.zone).isoformat()

    def task_id(self, alternative: int = 0) -> str:
        return task_id(self.user_id, self.instant, alternative)

    def plan_line(self, alternative: int) -> dict[str, Any]:
        return {
            "task_id": self.task_id(alternative),
            "user_id": self.user_id,
            "scheduled_at": self.scheduled_at,
        }


_DAY_WORDS = {
    name: day
    for day, names in enumerate(
        (
            ("mon", "monday"),
            ("tue", "tues", "tuesday"),
            ("wed", "wednesday"),
            ("thu", "thur", "thurs", "thursday"),
            ("fri", "friday"),
            ("sat", "saturday"),
            ("sun", "sunday"),
        )
    )
    for name in names
}
_KANJI_DAYS = {k: i for i, k in enumerate("月火水木金土日")}
_DAY_SETS = {
    "daily": range(7), "everyday": range(7), "毎日": range(7),
    "weekdays": range(5), "weekday": range(5), "平日": range(5),
    "weekends": (5, 6), "weekend": (5, 6), "週末": (5, 6), "毎週末": (5, 6),
}  # fmt: skip
HOLIDAY = 7  # stands for "Japan's national holidays" among the day numbers while parsing
# Separators between day groups: commas, 、 ・ /, spaces and brackets (() [] 【】 and the
# tortoise-shell pair U+3014/U+3015).
_SEPARATOR_CHARS = "\\s,、・/()\\[\\]【】\u3014\u3015"
_WEEKDAY_SEPARATORS = re.compile(f"[{_SEPARATOR_CHARS}]+")
# After NFKC (which folds the full-width dash and tilde): the long-vowel mark an IME
# types for a dash, the hyphens, figure, en, em dashes and horizontal bar (Shift_JIS's
# "—" decodes to U+2015) and the minus sign, all read as range marks.
_DASHES = str.maketrans(dict.fromkeys("\u30fc\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"))
_SPACED_RANGE = re.compile(r"\s*([-〜~])\s*")
# "…除く" leaves out what stands before it in its group: 祝日除く, 土日祝日は除く, 日曜を除く.
_WITHOUT = re.compile(f"([^{_SEPARATOR_CHARS}]*?)[をは]?除く")
_WEEKDAY_TERM = re.compile(
    r"(?P<range>[-〜~])|(?P<set>毎日|平日|毎週末|週末)|(?P<holiday>祝日?)"
    r"|(?P<kanji>[月火水木金土日])(?:曜日?)?|(?P<word>[a-z]+)|(?P<digit>[0-9]+)"
)


class _Term(NamedTuple):
    """One weekday term: the days it names; `point` is set when it is a single day."""

    days: frozenset[int]
    point: int | None = None
    digit: int | None = None
    kanji: bool = False


_RANGE = _Term(frozenset())


class Days(NamedTuple):
    """What a `call_weekdays` value names."""

    weekdays: frozenset[int]  # 0 = Monday ... 6 = Sunday
    holidays: bool = False  # also every national holiday (祝, 祝日)
    without_holidays: bool = False  # but never on a holiday (祝日除く)


NO_DAYS = Days(frozenset())


def parse_weekdays(value: object) -> Days:
    """The days a `call_weekdays` value names.

    NULL or empty means no calls; anything unrecognised raises InvalidRow. Full-width
    letters and digits are folded first (NFKC); 毎週 ("every week") may precede a list.
    """
    if value is None:
        return NO_DAYS
    if isinstance(value, bytes):
        value = _decode(value, "call_weekdays")
    if not isinstance(value, str):
        raise InvalidRow(f"call_weekdays has type {type(value).__name__}")
    return _weekdays_of(value)


@functools.lru_cache(maxsize=4096)
def _weekdays_of(value: str) -> Days:
    """parse_weekdays for text; cached, because a few spellings cover most rows."""
    text = unicodedata.normalize("NFKC", value).lower().strip().translate(_DASHES)
    if not text:
        return NO_DAYS
    text = re.sub("毎週(?!末)", " ", _SPACED_RANGE.sub(r"\1", text))
    excluded: set[int] = set()
    for m in _WITHOUT.finditer(text):
        if not m[1]:
            raise InvalidRow(f"call_weekdays {_show(value)}: 除く needs what it leaves out")
        excluded |= _parse_weekday_group(m[1], value)
    without = HOLIDAY in excluded
    days: set[int] = set()
    for group in _WEEKDAY_SEPARATORS.split(_WITHOUT.sub(" ", text)):
        if group:
            days |= _parse_weekday_group(group, value)
    if without and HOLIDAY in days:
        raise InvalidRow(f"call_weekdays {_show(value)} both names and leaves out holidays")
    days -= excluded
    if not days:
        raise InvalidRow(f"call_weekdays {_show(value)} names no weekday")
    return Days(frozenset(days - {HOLIDAY}), HOLIDAY in days, without)


def _parse_weekday_group(group: str, value: str) -> set[int]:
    """Days of one separator-free group: `月水金`, `mon-fri`, `平日`, `5`."""

    def invalid(why: str) -> InvalidRow:
        return InvalidRow(f"call_weekdays {_show(value)}: {why}")

    terms: list[_Term] = []
    pos = 0
    while pos < len(group):
        m = _WEEKDAY_TERM.match(group, pos)
        if m is None:
            raise invalid(f"unrecognised {_show(group[pos : pos + 10])}")
        pos = m.end()
        if m["range"]:
            terms.append(_RANGE)
        elif m["set"]:
            terms.append(_Term(frozenset(_DAY_SETS[m["set"]]), kanji=True))
        elif m["holiday"]:
            terms.append(_Term(frozenset({HOLIDAY}), kanji=True))
        elif m["kanji"]:
            day = _KANJI_DAYS[m["kanji"]]
            terms.append(_Term(frozenset({day}), day, kanji=True))
        elif m["digit"]:
            if len(m["digit"]) > 1 or m["digit"] > "7":
                raise invalid(f"{m['digit']!r} is not a day number 0-7")
            digit = int(m["digit"])
            day = (digit + 6) % 7  # cron: 0 and 7 are Sunday, 1 is Monday
            terms.append(_Term(frozenset({day}), day, digit))
        elif m["word"] in _DAY_SETS:
            terms.append(_Term(frozenset(_DAY_SETS[m["word"]])))
        elif m["word"] in _DAY_WORDS:
            day = _DAY_WORDS[m["word"]]
            terms.append(_Term(frozenset({day}), day))
        else:
            raise invalid(f"unknown word {_show(m['word'])}")

    days: set[int] = set()
    previous_kanji: bool | None = None
    i = 0
    while i < len(terms):
        term = terms[i]
        if term is _RANGE:
            raise invalid("a range mark needs one day on each side")
        if i + 1 < len(terms) and terms[i + 1] is _RANGE:
            end = terms[i + 2] if i + 2 < len(terms) else _RANGE
            if end is _RANGE or term.point is None or end.point is None:
                raise invalid("a range joins two single days, such as mon-fri or 月〜金")
            days |= _expand_range(term, end)
            kanji = term.kanji and end.kanji
            i += 3
        else:
            days |= term.days
            kanji = term.kanji
            i += 1
        # Kanji may stand side by side (月水金); words and digits need a separator.
        if previous_kanji is not None and not (previous_kanji and kanji):
            raise invalid("separate days with , 、 ・ / or a space")
        previous_kanji = kanji
    return days


def _expand_range(start: _Term, end: _Term) -> set[int]:
    """Days from start to end inclusive, wrapping past Sunday (`sat-mon`)."""
    if start.digit is not None and end.digit is not None and start.digit <= end.digit:
        return {(d + 6) % 7 for d in range(start.digit, end.digit + 1)}  # cron: 0-7 is all
    assert start.point is not None and end.point is not None
    return {(start.point + k) % 7 for k in range((end.point - start.point) % 7 + 1)}


def parse_call_time(value: object) -> dt.time | None:
    """Local wall-clock time of a `call_time` value; None means no calls."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        if value.microseconds:
            raise InvalidRow(f"call_time {value} has fractions of a second")
        seconds = int(value.total_seconds())
        if not 0 <= seconds < DAY_SECONDS:
            raise InvalidRow(f"call_time {_show_timedelta(value)} is not within 00:00:00-23:59:59")
        return dt.time(seconds // 3600, seconds // 60 % 60, seconds % 60)
    if isinstance(value, dt.time):
        if value.microsecond or value.tzinfo is not None:
            raise InvalidRow(f"call_time {value} must be a plain HH:MM:SS")
        return value
    if isinstance(value, bytes):
        value = _decode(value, "call_time")
    if isinstance(value, str):
        m = CLOCK_RE.fullmatch(value.strip())
        if m is None:
            raise InvalidRow(f"call_time {_show(value)} is not HH:MM or HH:MM:SS")
        hour, minute, second = int(m[1]), int(m[2]), int(m[3] or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise InvalidRow(f"call_time {_show(value)} is not within 00:00:00-23:59:59")
        return dt.time(hour, minute, second)
    raise InvalidRow(f"call_time has type {type(value).__name__}")


def parse_zone(value: object, default: zoneinfo.ZoneInfo) -> zoneinfo.ZoneInfo:
    """The row's zone: an IANA name, or `default` when NULL or empty."""
    if value is None:
        return default
    if isinstance(value, bytes):
        value = _decode(value, "timezone")
    if not isinstance(value, str):
        raise InvalidRow(f"timezone has type {type(value).__name__}")
    if not value.strip():
        return default
    zone = _zone_or_none(value.strip())
    if zone is None:
        raise InvalidRow(f"timezone {_show(value)} is not an IANA time zone")
    return zone


def parse_row(
    row: UserRow, default_zone: zoneinfo.ZoneInfo, region: str | None = "JP"
) -> CallSetting | None:
    """Validate one row. None when it asks for no calls; InvalidRow when it is wrong.

    `region` is the country of national phone numbers (DEFAULT_COUNTRY_CODE's region);
    None leaves the phone number out (the peak count's groups of rows have none).
    """
    if not isinstance(row.id, int) or isinstance(row.id, bool):
        raise InvalidRow(f"id has type {type(row.id).__name__}")
    try:
        column = "call_weekdays"
        days = parse_weekdays(row.call_weekdays)
        column = "call_time"
        call_time = parse_call_time(row.call_time)
        column = "timezone"
        zone = parse_zone(row.timezone, default_zone)
        column = "phone_number"
        phone = "" if region is None else normalize_phone(row.phone_number, region)
        column = "pause_from"
        pause_from = parse_date(row.pause_from, column)
        column = "pause_until"
        pause_until = parse_date(row.pause_until, column)
        if pause_from is not None and pause_until is not None and pause_from > pause_until:
            raise InvalidRow(f"pause_until {pause_until} is before pause_from {pause_from}")
    except InvalidRow as exc:
        exc.column = column
        raise
    if not (days.weekdays or days.holidays) or call_time is None:
        return None
    return CallSetting(
        row.id, phone, days.weekdays, call_time, zone, days.holidays, days.without_holidays,
        pause_from, pause_until,
    )  # fmt: skip


def normalize_phone(value: object, region: str) -> str:
    """The E.164 form of a phone number written as E.164 or nationally (for `region`).

    Google's libphonenumber metadata (phonenumberslite) decides whether it can be a
    number at all (see `_quick_number` for the common shapes' shortcut).
    """
    if isinstance(value, bytes):
        value = _decode(value, "phone_number")
    if not isinstance(value, str):
        raise InvalidRow(f"phone_number has type {type(value).__name__}")
    compact = PHONE_SEPARATORS.sub("", unicodedata.normalize("NFKC", value))
    shown = mask_phone(value)
    if not PHONE_CHARS.fullmatch(compact):
        raise InvalidRow(
            f"phone_number {shown} holds something other than digits, a leading +,"
            " spaces, brackets and dashes"
        )
    if len(compact) > 20:  # E.164 has at most 15 digits; a national form a few more
        raise InvalidRow(f"phone_number {shown} is too long")
    number = _quick_number(compact, region)
    if number is not None:  # valid already
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    try:
        number = phonenumbers.parse(compact, region)
    except phonenumbers.NumberParseException as exc:
        if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
            raise InvalidRow(f"phone_number {shown} has an unknown country code") from None
        raise InvalidRow(f"phone_number {shown} is not a phone number: {exc}") from None
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible != phonenumbers.ValidationResult.IS_POSSIBLE:
        why = {
            phonenumbers.ValidationResult.TOO_SHORT: "is too short",
            phonenumbers.ValidationResult.TOO_LONG: "is too long",
            phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "has an unknown country code",
        }.get(possible, "has a length no number of its country has")
        raise InvalidRow(f"phone_number {shown} {why}")
    if not phonenumbers.is_valid_number(number):
        raise InvalidRow(f"phone_number {shown} is not a valid number of its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _quick_number(compact: str, region: str) -> phonenumbers.PhoneNumber | None:
    """The number split without libphonenumber's slower text parser (5 µs instead of
    15), when that is plain: `+<code><national>`, or `<trunk 0><national>` in `region`.
    Only a valid result is kept; anything else goes through the full parser."""
    if compact.startswith("+"):
        for size in (1, 2, 3):  # country codes are prefix-free
            code = int(compact[1 : 1 + size])
            if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
                national = compact[1 + size :]
                break
        else:
            return None
    else:
        prefix = _trunk_prefix(region)
        if not prefix or not compact.startswith(prefix):
            return None
        code, national = phonenumbers.country_code_for_region(region), compact[len(prefix) :]
    if not national or national.startswith("0"):
        return None  # a trunk 0 after the code, or an Italian-style leading 0: parse it
    number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
    return number if phonenumbers.is_valid_number(number) else None


@functools.cache
def _trunk_prefix(region: str) -> str | None:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    return metadata.national_prefix if metadata is not None else None


def parse_date(value: object, column: str) -> dt.date | None:
    """A DATE column: None, or a date (an illegal value arrives as text)."""
    if value is None or (isinstance(value, dt.date) and not isinstance(value, dt.datetime)):
        return value
    if isinstance(value, bytes):
        value = _decode(value, column)
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise InvalidRow(f"{column} {_show(value)} is not a date") from None
    raise InvalidRow(f"{column} has type {type(value).__name__}")


def _decode(value: bytes, column: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRow(f"{column} is not valid UTF-8") from None


def _show(value: str, limit: int = 40) -> str:
    """A bounded repr of untrusted text for log messages."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _show_timedelta(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    return ("-" if seconds < 0 else "") + _clock_text(abs(seconds))


def occurrence(day: dt.date, at: dt.time, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """The instant (in UTC) of wall-clock `at` on local `day`.

    A time inside a DST gap moves forward by the gap, an ambiguous one takes its first
    occurrence: both are what fold=0 means (PEP 495) once converted to UTC. Instants stay
    in UTC because aware datetimes in a fold compare unequal across zones.
    """
    return dt.datetime.combine(day, at, tzinfo=zone).astimezone(UTC)


def occurrences(
    setting: CallSetting, window: Window, paused: list[dt.datetime] | None = None
) -> list[dt.datetime]:
    """Every call instant (UTC) of `setting` inside `window`, at most one per local date.

    Instants on paused dates are left out; they go to `paused` when it is given.
    """
    found = []
    for day, instant in _instants_in(setting.call_time, setting.zone, window):
        if setting.chosen_day(day):
            if not setting.paused_on(day):
                found.append(instant)
            elif paused is not None:
                paused.append(instant)
    return found


@functools.lru_cache(maxsize=4096)
def is_holiday(day: dt.date) -> bool:
    """A national holiday of Japan (substitute and citizens' holidays included), by the
    law as jpholiday computes it."""
    return jpholiday.is_holiday(day)


@functools.lru_cache(maxsize=16384)
def _instants_in(
    at: dt.time, zone: zoneinfo.ZoneInfo, window: Window
) -> tuple[tuple[dt.date, dt.datetime], ...]:
    """(local date, instant) of wall time `at` on each local date whose occurrence lies
    in `window`; cached, because many users share a call time."""
    day = window.start.astimezone(zone).date() - dt.timedelta(days=1)
    last = window.end.astimezone(zone).date() + dt.timedelta(days=1)
    found = []
    while day <= last:
        instant = occurrence(day, at, zone)
        if window.start <= instant < window.end:
            found.append((day, instant))
        day += dt.timedelta(days=1)
    return tuple(found)


def task_id(user_id: int, instant: dt.datetime, retry: int = 0) -> str:
    """Deterministic task id of one call: hashed prefix, user id, UTC instant.

    The short hash first spreads names across Cloud Tasks' key space (sequential or
    timestamp-prefixed names raise its latency); `retry` > 0 names an alternative.
    """
    stamp = _utc_stamp(instant)
    digest = hashlib.sha256(f"{user_id}@{stamp}".encode()).hexdigest()[:8]
    return f"{digest}-anpi-{user_id}-{stamp}" + (f"-r{retry}" if retry else "")


class TaskName(NamedTuple):
    """What a task id of this job says: whose call, when, and which alternative."""

    user_id: int
    instant: dt.datetime
    retry: int

    @property
    def key(self) -> CallKey:
        return CallKey(self.user_id, self.instant)


def parse_task_id(value: str) -> TaskName | None:
    """The TaskName of an id this job made, or None for any other id (never touched)."""
    m = TASK_ID_RE.fullmatch(value)
    if m is None:
        return None
    try:
        instant = dt.datetime.strptime(m[3], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    name = TaskName(int(m[2]), instant, int(m[4] or 0))
    # The hash must match too, so a look-alike id from elsewhere is not ours.
    return name if task_id(name.user_id, instant, name.retry) == value else None


@functools.lru_cache(maxsize=16384)
def _utc_stamp(instant: dt.datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def plan_calls(
    setting: CallSetting, window: Window, paused: list[dt.datetime] | None = None
) -> list[Call]:
    """The calls one validated row asks for inside `window` (see `occurrences`)."""
    return [
        Call(setting.user_id, setting.phone_number, t, setting.zone)
        for t in occurrences(setting, window, paused)
    ]


def count_minutes(
    setting: CallSetting, window: Window, counts: dict[dt.datetime, int], weight: int = 1
) -> None:
    """Add `weight` calls to the minute (UTC) of each call `setting` makes in `window`.

    The call time's seconds are cut first, which moves no call out of its minute (every
    zone's UTC offset, and DST gap, is whole minutes) and lets 1,440 times a zone share
    the planner's cache.
    """
    if setting.call_time.second:
        setting = dataclasses.replace(setting, call_time=setting.call_time.replace(second=0))
    for instant in occurrences(setting, window):
        minute = instant.replace(second=0)
        counts[minute] = counts.get(minute, 0) + weight


def peak_minute(counts: Mapping[dt.datetime, int], config: Config) -> dict[str, Any] | None:
    """The busiest minute of `counts` (the earliest of equals): its start in
    DEFAULT_TIMEZONE, its calls, and the seconds its queue needs to dispatch them at
    QUEUE_MAX_DISPATCHES_PER_SECOND. Shards sharing one queue (QUEUE_PER_SHARD=0) each
    hold about 1/TASK_COUNT of its calls, so their minute counts TASK_COUNT times.
    None without calls."""
    if not counts:
        return None
    minute = min(counts, key=lambda m: (-counts[m], m))
    sharing = 1 if config.queue_per_shard else config.task_count
    seconds = counts[minute] * sharing / config.queue_max_dispatches_per_second
    return {
        "at": minute.astimezone(config.default_timezone).isoformat(),
        "calls": counts[minute],
        "dispatch_seconds": round(seconds, 1),
    }


def warn_peak(peak: dict[str, Any] | None, config: Config) -> None:
    """A WARNING naming the fix when the busiest minute takes over PEAK_WARN_MINUTES."""
    if peak is None or peak["dispatch_seconds"] <= config.peak_warn_minutes * 60:
        return
    log.warning(
        "the busiest minute, %s, has %d calls: the queue needs %.0fs to dispatch them at"
        " %g/s, so its last call is that late (PEAK_WARN_MINUTES=%g). Raise"
        " QUEUE_MAX_DISPATCHES_PER_SECOND together with Twilio's calls per second, or add"
        " shards (TASK_COUNT, with QUEUE_PER_SHARD=1)",
        peak["at"],
        peak["calls"],
        peak["dispatch_seconds"],
        config.queue_max_dispatches_per_second,
        config.peak_warn_minutes,
        extra={"peak_minute": peak},
    )


def local_time_ranges(zone: zoneinfo.ZoneInfo, window: Window) -> list[tuple[int, int]] | None:
    """Seconds-of-day ranges [lo, hi) that hold every wall time due in `window`.

    A superset: the wall-clock span of the window widened by the smallest and largest
    UTC offset the zone has around it, which covers DST gaps and folds. None when the
    span reaches a whole day (no filter is possible).
    """
    offsets = set()
    probe = window.start - dt.timedelta(hours=6)
    while probe <= window.end + dt.timedelta(hours=6):
        offsets.add(probe.astimezone(zone).utcoffset() or dt.timedelta())
        probe += dt.timedelta(minutes=15)
    low = window.start.replace(tzinfo=None) + min(offsets)
    high = window.end.replace(tzinfo=None) + max(offsets)
    if high - low >= dt.timedelta(days=1):
        return None
    lo = low.hour * 3600 + low.minute * 60 + low.second
    hi = lo + int((high - low).total_seconds()) + (1 if low.microsecond else 0)
    if hi <= DAY_SECONDS:
        return [(lo, hi)]
    return [(lo, DAY_SECONDS), (0, hi - DAY_SECONDS)]


# ---------------------------------------------------------------------------
# Call record: the scheduled_calls table, which task id each call was given
# ---------------------------------------------------------------------------

PLANNED, DELETING, DELETED = "planned", "deleting", "deleted"
RECORD_COLUMNS = "call_at, user_id, alternative, task_id, state, reason, queue"
_FIRST_COLUMNS = "call_at, user_id, alternative, task_id, state, reason"  # migration 001's
# What brings an existing database up to date: the table's first migration (a missing
# table), and the one that adds what a check needs.
MIGRATIONS = {
    "users": "migrations/002_users_pauses.sql",
    "scheduled_calls": "migrations/001_scheduled_calls.sql",
}
QUEUE_MIGRATION = "migrations/003_scheduled_calls_queue.sql"
# Every statement the job runs on scheduled_calls, each run once with nothing to touch,
# so a missing table, column or grant shows before any task is created.
# In the order of the migrations that fix them, so the first problem names the first file.
RECORD_CHECKS = (
    ("SELECT", "scheduled_calls", f"SELECT {_FIRST_COLUMNS} FROM scheduled_calls LIMIT 0", None),
    (
        "INSERT",
        "scheduled_calls",
        f"INSERT INTO scheduled_calls ({_FIRST_COLUMNS})"
        f" SELECT {_FIRST_COLUMNS} FROM scheduled_calls WHERE FALSE",
        None,
    ),
    ("UPDATE", "scheduled_calls", "UPDATE scheduled_calls SET state = state WHERE FALSE", None),
    ("DELETE", "scheduled_calls", "DELETE FROM scheduled_calls WHERE FALSE", None),
    ("SELECT", "users", f"SELECT {USER_COLUMNS}, is_active FROM users LIMIT 0", None),
    (
        "INSERT",
        "scheduled_calls",
        f"INSERT INTO scheduled_calls ({RECORD_COLUMNS})"
        f" SELECT {RECORD_COLUMNS} FROM scheduled_calls WHERE FALSE",
        QUEUE_MIGRATION,
    ),
)


class Entry(NamedTuple):
    """One scheduled_calls row to write: a call's id `alternative` and its state."""

    key: CallKey
    alternative: int
    state: str
    reason: str | None = None
    queue: str | None = None  # the queue of a new row; None: this shard's


class Choice(NamedTuple):
    """The id a run gives a call, and why (see `CallRecord.choose`)."""

    alternative: int
    pending: bool = False  # the listing shows this id on the queue: nothing to create
    recorded: bool = False  # recorded planned already: the task may exist or have run
    # Ids (and their queues) whose delete was begun but never confirmed: one may still
    # be pending, or have run.
    unconfirmed: tuple[tuple[int, str], ...] = ()
    queue: str | None = None  # the queue the id belongs to; None: this shard's

    @property
    def record_first(self) -> bool:
        """Whether the batch must record this id before anything is created."""
        return not self.recorded and not self.unconfirmed


class CallRecord:
    """scheduled_calls: one row per task id the job gave a call, planned or deleted.

    The job writes a call's id here (committed) before it creates the task, and marks
    a task deleted here before it deletes it. So the table knows what Cloud Tasks
    cannot tell: whether a refused name belongs to a task that ran or to one that was
    deleted. Each row also names the queue its task belongs to, fixed by the first run
    that wrote it: after a reshard a call stays on the queue it was given. Writes go
    through their own connection; a lock serialises the enqueue threads' rare
    single-call writes with the main thread's batches.
    """

    def __init__(self, conn: Any, config: Config) -> None:
        self._conn = conn
        self._config = config
        self._lock = threading.Lock()
        self._rows: dict[CallKey, dict[int, tuple[str, str]]] = {}  # filled by load
        self.seconds = 0.0  # time spent in statements, for the bench
        self.own_queue = config.queue_name

    def check(self) -> None:
        """Raise SetupError naming the table and grant when a statement would be refused."""
        config = self._config
        user = f"'{config.db_user}'@'%'"
        grant = (
            f"GRANT SELECT ON `{config.db_name}`.users TO {user}; GRANT SELECT, INSERT,"
            f" UPDATE, DELETE ON `{config.db_name}`.scheduled_calls TO {user}"
        )
        for privilege, table, sql, migration in RECORD_CHECKS:
            try:
                with self._lock, self._conn.cursor() as cur:
                    cur.execute(sql)
            except pymysql.err.MySQLError as exc:
                code = exc.args[0] if exc.args else None
                if code in (1142, 1143, 1044):  # command or column denied
                    raise SetupError(
                        f"the database user may not {privilege} on {table}: {grant}"
                    ) from exc
                if code in (1146, 1054):  # no such table or column
                    fix = MIGRATIONS[table] if code == 1146 else migration or MIGRATIONS[table]
                    raise SetupError(
                        f"table {table} is missing or has old columns ({exc.args[1]}):"
                        f" apply {fix} (or schema.sql on a new database), then " + grant
                    ) from exc
                raise DatabaseError(f"cannot check table {table}: {exc}") from exc

    def load(self, window: Window) -> None:
        """Read this shard's rows for the calls in `window`."""
        config = self._config
        sql = "SELECT user_id, call_at, alternative, state, queue FROM scheduled_calls"
        sql += " WHERE call_at >= %s AND call_at < %s"
        args: list[Any] = [_naive_utc(window.start), _naive_utc(window.end)]
        if config.task_count > 1:
            sql += " AND MOD(MOD(user_id, %s) + %s, %s) = %s"
            args += [config.task_count] * 3 + [config.task_index]
        rows: dict[CallKey, dict[int, tuple[str, str]]] = {}
        with self._query() as cur:
            cur.execute(sql, args)
            for user_id, call_at, alternative, state, queue in cur.fetchall():
                key = CallKey(user_id, call_at.replace(tzinfo=UTC))
                # NULL: a row from before migration 003, when there was one queue.
                rows.setdefault(key, {})[alternative] = (state, queue or config.queue)
        self._rows = rows

    def choose(self, key: CallKey, pending: set[int] | None) -> Choice:
        """The id for call `key`: the first of these rules that applies.

        1. An id of the call that the listing shows pending (the one recorded planned,
           else the lowest): it is on the queue, so nothing is created.
        2. Otherwise the id recorded planned (the highest, should there be several):
           created again on the queue it was recorded on, where ALREADY_EXISTS means it
           exists or already ran.
        3. Otherwise the next id after every recorded (deleting or deleted) one; the
           base id when the call has no row. It is recorded (`claim`) before it is
           created.
        Deterministic from the table and the listing, so concurrent runs agree.
        """
        rows = self._rows.get(key, {})
        planned = sorted(a for a, (state, _) in rows.items() if state == PLANNED)
        if pending:
            alternative = next((a for a in planned if a in pending), min(pending))
            return Choice(alternative, pending=True, recorded=alternative in planned)
        if planned:
            return Choice(planned[-1], recorded=True, queue=rows[planned[-1]][1])
        unconfirmed = tuple(sorted((a, q) for a, (state, q) in rows.items() if state == DELETING))
        return Choice(max(rows, default=-1) + 1, unconfirmed=unconfirmed)

    def elsewhere(self) -> dict[CallKey, dict[int, str]]:
        """This shard's calls in the window with an id planned or being deleted on
        another queue (a user moved here by a reshard): alternative -> queue."""
        own = self._config.queue_name
        found: dict[CallKey, dict[int, str]] = {}
        for key, rows in self._rows.items():
            for alternative, (state, queue) in rows.items():
                if state != DELETED and queue != own:
                    found.setdefault(key, {})[alternative] = queue
        return found

    def claim(self, entries: Sequence[Entry]) -> dict[tuple[CallKey, int], str]:
        """Record new planned ids (`write`), then read back the queue of each: the
        queue of the run that wrote the row first. Two runs that planned the same new
        id on different queues (a reshard while an execution of the old TASK_COUNT is
        still running) then both create it on that one queue, where its name is unique.
        """
        self.write(entries)
        homes: dict[tuple[CallKey, int], str] = {}
        for start in range(0, len(entries), RECORD_BATCH):
            chunk = entries[start : start + RECORD_BATCH]
            sql = (
                "SELECT user_id, call_at, alternative, queue FROM scheduled_calls"
                " WHERE task_id IN (" + ", ".join(["%s"] * len(chunk)) + ")"
            )
            with self._query() as cur:
                cur.execute(sql, [task_id(*e.key, e.alternative) for e in chunk])
                for user_id, call_at, alternative, queue in cur.fetchall():
                    key = CallKey(user_id, call_at.replace(tzinfo=UTC))
                    homes[(key, alternative)] = queue or self._config.queue
        return homes

    def lock(self) -> bool:
        """Hold this shard's run lock (MySQL GET_LOCK) until the connection closes.

        Runs of one shard then never overlap, so no run acts on an older snapshot of
        `users` than one that already finished. The server drops the lock when the
        holder's connection ends, a killed container's included. False when another
        run still held it after RUN_LOCK_WAIT_SECONDS.
        """
        with self._query() as cur:
            cur.execute(
                "SELECT GET_LOCK(%s, %s)", (run_lock_name(self._config), RUN_LOCK_WAIT_SECONDS)
            )
            (held,) = cur.fetchone()
        return held == 1

    def write(self, entries: Sequence[Entry]) -> None:
        """Upsert `entries` in one statement per RECORD_BATCH rows, each committed."""
        # The queue is never updated: the first writer's stays (see `claim`).
        sql = (
            f"INSERT INTO scheduled_calls ({RECORD_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON DUPLICATE KEY UPDATE state = VALUES(state), reason = VALUES(reason)"
        )
        own = self._config.queue_name
        for start in range(0, len(entries), RECORD_BATCH):
            args = [
                (
                    _naive_utc(e.key.instant),
                    e.key.user_id,
                    e.alternative,
                    task_id(e.key.user_id, e.key.instant, e.alternative),
                    e.state,
                    e.reason,
                    e.queue or own,
                )
                for e in entries[start : start + RECORD_BATCH]
            ]
            with self._query() as cur:
                cur.executemany(sql, args)

    def purge(self, before: dt.datetime) -> int:
        """Delete rows of calls before `before`, PURGE_BATCH at a time; the count deleted."""
        sql = "DELETE FROM scheduled_calls WHERE call_at < %s ORDER BY call_at LIMIT %s"
        deleted = 0
        for _ in range(PURGE_MAX_BATCHES):
            with self._query() as cur:
                count = cur.execute(sql, (_naive_utc(before), PURGE_BATCH))
            deleted += count
            if count < PURGE_BATCH:
                break
        return deleted

    @contextlib.contextmanager
    def _query(self) -> Iterator[Any]:
        """A cursor on the writer connection, held alone; driver errors as DatabaseError."""
        try:
            with self._lock, self._conn.cursor() as cur:
                started = time.monotonic()
                try:
                    yield cur
                finally:
                    self.seconds += time.monotonic() - started
        except pymysql.err.MySQLError as exc:
            raise DatabaseError(f"scheduled_calls: {exc}") from exc


def run_lock_name(config: Config) -> str:
    """The GET_LOCK name of this shard: database, queue and shard (at most 64 chars)."""
    scope = f"{config.db_name}|{config.queue_path}|{config.task_index}/{config.task_count}"
    return "anpi-call-scheduler:" + hashlib.sha256(scope.encode()).hexdigest()[:40]


def _naive_utc(instant: dt.datetime) -> dt.datetime:
    """An aware instant as the naive UTC DATETIME that scheduled_calls.call_at holds."""
    return instant.astimezone(UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------
# Task sink: Cloud Tasks
# ---------------------------------------------------------------------------

CREATED, EXISTING, FAILED = "created", "existing", "failed"
# The one line of a dry run that plans without the queue (a laptop's local run).
QUEUE_NOT_READ = (
    "queue not read (%s): the plan cannot tell which calls are queued already,"
    " and stale tasks are not looked for"
)


class FatalQueueError(Exception):
    """An error that every further call would meet too (no queue, no credentials)."""


class NoCredentialsError(FatalQueueError):
    """No Google credentials at all: the usual state of a laptop, not of Cloud Run."""


def make_tasks_client(config: Config) -> Any:
    """One Cloud Tasks client for the run: the emulator's plain gRPC, or ADC."""
    from google.cloud import tasks_v2

    if config.emulator_host:
        import grpc
        from google.cloud.tasks_v2.services.cloud_tasks.transports import (
            CloudTasksGrpcTransport,
        )

        channel = grpc.insecure_channel(config.emulator_host)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    try:
        return tasks_v2.CloudTasksClient()
    except auth_exceptions.DefaultCredentialsError as exc:
        raise NoCredentialsError(f"no Google credentials for Cloud Tasks: {exc}") from exc


class TaskSink:
    """One queue's tasks: create, look up, list and delete, outcomes returned as values.

    Transient errors are retried within ENQUEUE_DEADLINE_SECONDS. Fatal errors (no
    queue, no credentials) raise FatalQueueError: every further call would meet them too.
    """

    def __init__(
        self, client: Any, config: Config, stop: threading.Event, queue: str | None = None
    ) -> None:
        self._client = client
        self._config = config
        self._stop = stop
        self.queue = queue or config.queue_name
        self.queue_path = config.path_of(self.queue)
        # Another shard's queue, where a reshard left some of this shard's calls.
        self.foreign = self.queue != config.queue_name
        self._get_denied = threading.Event()
        self._retry = retries.Retry(
            predicate=retries.if_exception_type(
                gexc.ServiceUnavailable,
                gexc.DeadlineExceeded,
                gexc.TooManyRequests,  # RESOURCE_EXHAUSTED
                gexc.ResourceExhausted,
                gexc.InternalServerError,
                gexc.Aborted,
            ),
            initial=0.25,
            maximum=4.0,
            multiplier=2.0,
            timeout=config.enqueue_deadline_seconds,
            on_error=self._before_retry,
        )
        self._timeout = timeouts.ConstantTimeout(10.0)
        self.pages = 0  # ListTasks pages read

    def _before_retry(self, exc: Exception) -> None:
        """Give up retrying once the run is stopping; the next run plans the call again."""
        log.info("transient Cloud Tasks error, retrying: %s", type(exc).__name__)
        if self._stop.is_set():
            raise exc

    @contextlib.contextmanager
    def _fatal_errors(self, task_gone_ok: bool = False) -> Iterator[None]:
        """Turn errors that every further call would meet into FatalQueueError."""
        try:
            yield
        except gexc.NotFound as exc:
            # For GetTask/DeleteTask it means the task is gone: they run only after a
            # create or a listing has shown that the queue exists.
            if task_gone_ok:
                raise
            raise FatalQueueError(
                f"Cloud Tasks queue {self.queue_path} not found: {exc.message}"
            ) from exc
        except gexc.Unauthenticated as exc:
            raise FatalQueueError(f"Cloud Tasks rejected the credentials: {exc.message}") from exc
        except auth_exceptions.GoogleAuthError as exc:
            raise FatalQueueError(f"no usable Google credentials for Cloud Tasks: {exc}") from exc

    def _rpc(self, method: str, request: Any, task_gone_ok: bool = False) -> Any:
        """Call one Cloud Tasks method with the retry policy."""
        with self._fatal_errors(task_gone_ok):
            return getattr(self._client, method)(
                request=request, retry=self._retry, timeout=self._timeout
            )

    def _name(self, task_id: str) -> str:
        return f"{self.queue_path}/tasks/{task_id}"

    def build_task(self, call: Call, task_id: str) -> Any:
        """The typed Cloud Tasks HTTP task for `call` under `task_id`."""
        from google.cloud import tasks_v2
        from google.protobuf import timestamp_pb2

        body = {
            "user_id": call.user_id,
            "phone_number": call.phone_number,
            "scheduled_at": call.scheduled_at,
            "task_id": task_id,
        }
        request = tasks_v2.HttpRequest(
            url=self._config.call_url,
            http_method=tasks_v2.HttpMethod.POST,
            headers={"Content-Type": "application/json"},
            body=json.dumps(body).encode(),
        )
        if self._config.oidc_service_account:
            request.oidc_token = tasks_v2.OidcToken(
                service_account_email=self._config.oidc_service_account,
                audience=self._config.call_url,
            )
        schedule = timestamp_pb2.Timestamp()
        schedule.FromDatetime(call.instant)
        return tasks_v2.Task(name=self._name(task_id), http_request=request, schedule_time=schedule)

    def create(self, call: Call, task_id: str) -> str:
        """CreateTask: CREATED, EXISTING (the name is taken: ALREADY_EXISTS) or FAILED."""
        from google.cloud import tasks_v2

        request = tasks_v2.CreateTaskRequest(
            parent=self.queue_path, task=self.build_task(call, task_id)
        )
        extra = {"user_id": call.user_id, "task_id": task_id}
        try:
            self._rpc("create_task", request)
            return CREATED
        except gexc.AlreadyExists:
            return EXISTING
        except gexc.RetryError as exc:
            log.error(
                "could not create task within %ss: %s",
                self._config.enqueue_deadline_seconds,
                exc.cause,
                extra=extra,
            )
        except gexc.GoogleAPICallError as exc:
            log.error("could not create task: %s %s", type(exc).__name__, exc.message, extra=extra)
        return FAILED

    def exists(self, task_id: str) -> bool:
        """Whether `task_id` is on the queue now (GetTask); errors raise."""
        from google.cloud import tasks_v2

        try:
            self._rpc("get_task", tasks_v2.GetTaskRequest(name=self._name(task_id)), True)
            return True
        except gexc.NotFound:
            return False

    def exists_or_unknown(self, task_id: str) -> bool:
        """`exists`, except that without permission to look (an enqueuer-only account,
        RECONCILE=0) the task is taken to exist, with one warning per run."""
        try:
            return self.exists(task_id)
        except gexc.PermissionDenied as exc:
            if not self._get_denied.is_set():
                self._get_denied.set()
                log.warning(
                    "GetTask denied, so a task deleted outside the job cannot be noticed"
                    " (grant roles/cloudtasks.viewer on the queue): %s",
                    exc.message,
                )
            return True

    def delete(self, task_id: str) -> bool:
        """Delete `task_id`; False when it was already gone (ran or deleted); errors raise."""
        from google.cloud import tasks_v2

        try:
            self._rpc("delete_task", tasks_v2.DeleteTaskRequest(name=self._name(task_id)), True)
            return True
        except gexc.NotFound:
            return False

    def list_own(self, window: Window) -> dict[CallKey, set[int]]:
        """This job's pending tasks of this shard with calls in `window`: the ids
        (alternatives) of each call.

        ListTasks pages through the whole queue (1,000 a page, the largest allowed:
        the quota is 600 list calls a minute); other ids are never considered, nor are
        other shards' users' tasks (after a reshard their new shard finds them in the
        record). `pages` counts the pages read.
        """
        from google.cloud import tasks_v2

        config = self._config
        request = tasks_v2.ListTasksRequest(
            parent=self.queue_path, page_size=1000, response_view=tasks_v2.Task.View.BASIC
        )
        own: dict[CallKey, set[int]] = {}
        with self._fatal_errors():  # later pages are fetched while iterating
            listing = self._rpc("list_tasks", request)
            for page in listing.pages:
                self.pages += 1
                for task in page.tasks:
                    name = parse_task_id(task.name.rsplit("/", 1)[-1])
                    if name is None or name.user_id % config.task_count != config.task_index:
                        continue
                    if window.start <= name.instant < window.end:
                        own.setdefault(name.key, set()).add(name.retry)
        return own


class Queues:
    """The run's TaskSinks, one per queue, each made at its first use; one client.

    Called with no queue, it gives this shard's own.
    """

    def __init__(
        self, make_client: Callable[[], Any], config: Config, stop: threading.Event
    ) -> None:
        self._make_client = make_client
        self._config = config
        self._stop = stop
        self._client: Any = None
        self._sinks: dict[str, TaskSink] = {}
        self._lock = threading.Lock()
        self.fatal: FatalQueueError | None = None  # met by the listing: every call meets it

    def __call__(self, queue: str | None = None) -> TaskSink:
        queue = queue or self._config.queue_name
        with self._lock:
            if self.fatal is not None:
                raise self.fatal
            if queue not in self._sinks:
                self._client = self._client or self._make_client()
                self._sinks[queue] = TaskSink(self._client, self._config, self._stop, queue)
            return self._sinks[queue]


class RateLimiter:
    """Spaces out starts to at most `per_second` (0 = no cap); one caller thread."""

    def __init__(
        self,
        per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 1.0 / per_second if per_second > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = clock()

    def wait(self) -> None:
        if not self._interval:
            return
        now = self._clock()
        if self._next > now:
            self._sleep(self._next - now)
        self._next = max(self._next, now) + self._interval


# ---------------------------------------------------------------------------
# Run and summary
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunSummary:
    """Counters of one run; the last stdout line is this object as JSON."""

    users_scanned: int = 0
    calls_planned: int = 0
    tasks_created: int = 0
    tasks_existing: int = 0
    tasks_failed: int = 0
    tasks_not_attempted: int = 0
    tasks_deleted: int = 0
    deletes_failed: int = 0
    deletes_skipped: int = 0
    records_purged: int = 0
    rows_invalid: int = 0
    dry_run: bool = False
    shard: str = "0/1"
    window_start: str = ""
    window_end: str = ""
    error: str | None = None
    interrupted: bool = False
    peak_minute: dict[str, Any] | None = None  # dry runs: the next 24 hours' busiest minute

    @property
    def exit_code(self) -> int:
        """0 when every planned call is on the queue or ran (or a dry run planned cleanly).

        1 when anything was left undone: a failed or unattempted task, a stale task that
        could not be deleted, a database or queue error, or a stop by signal. Invalid
        rows are reported, not failed on; so is a stale task left because it was due
        within FIRING_MARGIN (`deletes_skipped`). A missing table or grant never gets
        here: `main` exits 2 before anything is done.
        """
        undone = self.tasks_failed or self.tasks_not_attempted or self.deletes_failed
        return 1 if (undone or self.error or self.interrupted) else 0

    def fail(self, message: str) -> None:
        """Record a run-level failure (the first one wins); log each distinct one once."""
        if message != self.error:
            log.critical("%s", message)
        self.error = self.error or message

    def count(self, outcome: str) -> None:
        if outcome == CREATED:
            self.tasks_created += 1
        elif outcome == EXISTING:
            self.tasks_existing += 1
        else:
            self.tasks_failed += 1


Clock = Callable[[], dt.datetime]
T = TypeVar("T")


def plan(
    rows: Iterator[UserRow],
    config: Config,
    window: Window,
    summary: RunSummary,
    stop: threading.Event,
    invalid_users: set[int],
    paused: set[CallKey] | None = None,
) -> Iterator[Call]:
    """Validate and plan rows as they stream in, counting scanned, invalid and planned.

    Nothing is held: memory stays flat however large the table. A stop signal ends the
    stream. So does a database failure, recorded in `summary`; the calls yielded
    before it are still enqueued, and the next run completes the rest. The ids of
    invalid rows go to `invalid_users`, so that reconciling leaves their tasks alone,
    and the calls that a pause leaves out go to `paused`, so that it can say why.
    """
    try:
        for row in rows:
            if stop.is_set():
                return
            summary.users_scanned += 1
            try:
                setting = parse_row(row, config.default_timezone, config.phone_region)
            except InvalidRow as reason:
                summary.rows_invalid += 1
                invalid_users.add(row.id)
                log_invalid(row, reason)
                continue
            if setting is not None:
                left_out: list[dt.datetime] = []
                for call in plan_calls(setting, window, left_out):
                    summary.calls_planned += 1
                    yield call
                if paused is not None:
                    paused.update(CallKey(setting.user_id, t) for t in left_out)
    except DatabaseError as exc:
        summary.fail(str(exc))


def log_invalid(row: UserRow, reason: InvalidRow) -> None:
    """The one log line of an invalid row: ERROR, so that alerting can count it."""
    log.error(
        "invalid row skipped: %s",
        reason,
        extra={"user_id": row.id, "column": reason.column, "phone": mask_phone(row.phone_number)},
    )


def choose_ids(
    calls: Iterable[Call],
    record: CallRecord,
    pending: Mapping[CallKey, set[int]] | None,
    chosen: dict[CallKey, int],
) -> Iterator[list[tuple[Call, Choice]]]:
    """Batches of up to RECORD_BATCH calls, each with the id `record` chooses for it.

    With a listing (`pending`), every call's id also goes to `chosen`, which is what
    reconciling keeps.
    """
    for batch in _chunks(calls, RECORD_BATCH):
        choices = []
        for call in batch:
            choice = record.choose(call.key, None if pending is None else pending.get(call.key))
            if pending is not None:
                chosen[call.key] = choice.alternative
            choices.append((call, choice))
        yield choices


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of up to `size` items, read lazily."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def place(
    call: Call, choice: Choice, sinks: Callable[..., TaskSink], record: CallRecord, clock: Clock
) -> str:
    """Make sure the call's chosen id is on its queue or has run: CREATED, EXISTING, FAILED.

    The id is recorded already, or, when an earlier id's delete was never confirmed,
    recorded here once that task is known not to be pending and not to have run.
    Each id is created on the queue its row names (`sinks` gives the queue's sink).
    ALREADY_EXISTS means the task exists or ran within the hour (a recorded id is
    created again only while younger than MAX_RECREATE_AGE). The one exception is a
    call still more than FIRING_MARGIN ahead of the job's clock that GetTask cannot
    find: someone deleted it outside the job, so it gets the next id, recorded (old id
    deleted, new planned, one statement) before it is created.
    """
    key, alternative = call.key, choice.alternative
    extra = {"user_id": call.user_id, "task_id": call.task_id(alternative)}
    queue = choice.queue

    def ahead() -> bool:
        """Still too far ahead to have fired, by the job's clock now."""
        return call.instant > clock() + FIRING_MARGIN

    try:
        if alternative > MAX_ALTERNATIVE:
            log.error("every task id of this call was used up; not created", extra=extra)
            return FAILED
        if choice.recorded and call.instant < clock() - MAX_RECREATE_AGE:
            log.error("call too old to tell whether its task ran; not created again", extra=extra)
            return FAILED
        if choice.unconfirmed:
            # The run that began deleting it died, or its delete failed: the task may be
            # pending (keep it), deleted (make a new one), or may have run (create none).
            for earlier, earlier_queue in reversed(choice.unconfirmed):
                if sinks(earlier_queue).exists(call.task_id(earlier)):
                    record.write([Entry(key, earlier, PLANNED)])
                    return EXISTING
            if not ahead():
                log.error(
                    "cannot tell whether this call already ran: its task was being deleted"
                    " and is gone; not created again, so that it is not made twice",
                    extra=extra,
                )
                return FAILED
            queue = record.claim([Entry(key, alternative, PLANNED)])[(key, alternative)]
        while True:
            sink = sinks(queue)
            outcome = sink.create(call, call.task_id(alternative))
            if outcome != EXISTING or not ahead():
                return outcome
            if sink.exists_or_unknown(call.task_id(alternative)) or not ahead():
                return EXISTING  # pending, or GetTask was slow and it may have run since
            if alternative >= MAX_ALTERNATIVE:
                log.error("every task id of this call was deleted outside the job", extra=extra)
                return FAILED
            log.warning(
                "task deleted outside the job before its time; creating it again under the next id",
                extra={**extra, "next": call.task_id(alternative + 1)},
            )
            homes = record.claim(
                [
                    Entry(key, alternative, DELETED, "deleted outside the job", sink.queue),
                    Entry(key, alternative + 1, PLANNED),
                ]
            )
            alternative += 1
            queue = homes[(key, alternative)]
    except FatalQueueError as exc:
        if queue is None or queue == record.own_queue:
            raise
        # Only this call's recorded queue is gone (a leftover queue deleted too early):
        # it may have run there, so nothing is created elsewhere.
        log.error("the queue this call was recorded on is unusable: %s", exc, extra=extra)
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        log.error("could not look a task up: %s", exc, extra=extra)
    except DatabaseError as exc:
        log.error("could not record a task id, so created no task: %s", exc, extra=extra)
    return FAILED


def enqueue(
    sinks: Callable[..., TaskSink],
    batches: Iterable[list[tuple[Call, Choice]]],
    record: CallRecord,
    config: Config,
    summary: RunSummary,
    stop: threading.Event,
    clock: Clock,
) -> None:
    """Record each batch's new ids (one commit), then place its calls: at most
    ENQUEUE_CONCURRENCY in flight, rate-capped.

    The sink is made at the first call that needs the queue, so a run with nothing to
    do needs none. After a fatal queue or database error the remaining calls are
    counted, not tried.
    """
    slots = threading.BoundedSemaphore(config.enqueue_concurrency)
    limiter = RateLimiter(config.enqueue_max_per_second)
    lock = threading.Lock()
    fatal = threading.Event()
    sink: TaskSink | None = None
    homes: dict[tuple[CallKey, int], str] = {}

    def give_up(exc: Exception) -> None:
        with lock:
            if not fatal.is_set():
                fatal.set()
                summary.fail(str(exc))

    def done(future: Future[str]) -> None:
        slots.release()
        exc = future.exception()
        if isinstance(exc, FatalQueueError):
            give_up(exc)
            with lock:
                summary.tasks_not_attempted += 1
            return
        with lock:
            if exc is not None:
                log.error("unexpected error creating a task: %r", exc)
                summary.tasks_failed += 1
            else:
                summary.count(future.result())

    def not_attempted(calls: Sequence[tuple[Call, Choice]]) -> None:
        """Count calls left undone; those the listing shows pending are done anyway."""
        with lock:
            for _, choice in calls:
                if choice.pending:
                    summary.count(EXISTING)
                else:
                    summary.tasks_not_attempted += 1

    def wait_for_slot() -> bool:
        while not slots.acquire(timeout=0.2):
            if stop.is_set():
                return False
        return True

    with ThreadPoolExecutor(config.enqueue_concurrency, thread_name_prefix="enqueue") as pool:
        for batch in batches:
            if stop.is_set():
                not_attempted(batch)
                break
            if not fatal.is_set():
                new = [Entry(c.key, ch.alternative, PLANNED) for c, ch in batch if ch.record_first]
                try:
                    homes = record.claim(new)
                except DatabaseError as exc:
                    give_up(exc)
            for i, (call, choice) in enumerate(batch):
                if choice.record_first and not choice.pending:
                    choice = choice._replace(queue=homes.get((call.key, choice.alternative)))
                if not choice.pending and sink is None and not fatal.is_set():
                    try:
                        sink = sinks()
                    except FatalQueueError as exc:
                        give_up(exc)
                if choice.pending or fatal.is_set():
                    not_attempted([(call, choice)])
                    continue
                if stop.is_set() or not wait_for_slot():
                    not_attempted(batch[i:])
                    break
                limiter.wait()
                pool.submit(place, call, choice, sinks, record, clock).add_done_callback(done)


class Stale(NamedTuple):
    """A listed task the plan no longer wants."""

    key: CallKey
    alternative: int
    reason: str
    queue: str | None = None  # where the task is; None: this shard's queue (listed)

    @property
    def task_id(self) -> str:
        return task_id(self.key.user_id, self.key.instant, self.alternative)

    def plan_line(self) -> dict[str, Any]:
        line = {"delete": self.task_id, "user_id": self.key.user_id, "reason": self.reason}
        return line if self.queue is None else {**line, "queue": self.queue}


def stale_tasks(
    pending: Mapping[CallKey, set[int]],
    chosen: Mapping[CallKey, int],
    invalid_users: set[int],
    paused: AbstractSet[CallKey] = frozenset(),
    elsewhere: Mapping[CallKey, Mapping[int, str]] | None = None,
) -> list[Stale]:
    """The tasks of this shard and window that the plan does not contain: those listed
    on its queue, and those the record puts on another queue (`elsewhere`, where a
    reshard left them; nobody lists them as theirs, so their user's shard deletes them
    by name).

    A planned call keeps the id it was given (`chosen`); any further one for it would
    call twice. A user whose row is invalid this run keeps their tasks: a typo in the
    table must not cancel a call.
    """
    elsewhere = elsewhere or {}
    planned_users = {key.user_id for key in chosen}
    stale = []
    for key in [*pending, *(k for k in elsewhere if k not in pending)]:
        listed = pending.get(key, set())
        found: list[tuple[int, str | None]] = [(a, None) for a in sorted(listed)]
        found += [(a, q) for a, q in sorted(elsewhere.get(key, {}).items()) if a not in listed]
        if key in chosen:
            keep = task_id(key.user_id, key.instant, chosen[key])
            stale += [
                Stale(key, a, f"duplicate of {keep}", q) for a, q in found if a != chosen[key]
            ]
        elif key.user_id in invalid_users:
            log.warning(
                "kept the tasks of an invalid row",
                extra={"user_id": key.user_id, "task_id": task_id(*key)},
            )
        else:
            if key in paused:
                reason = "paused"
            elif key.user_id in planned_users:
                reason = "call time or weekday changed"
            else:
                reason = "no call in the window: user inactive, removed or schedule changed"
            stale += [Stale(key, a, reason, q) for a, q in found]
    return stale


def reconcile(
    sinks: Callable[..., TaskSink],
    record: CallRecord,
    stale: Sequence[Stale],
    *,
    config: Config,
    summary: RunSummary,
    clock: Clock,
    out: Callable[[str], None] | None,
) -> None:
    """Delete the stale tasks, RECORD_BATCH at a time: mark them deleting (one commit),
    delete them ENQUEUE_CONCURRENCY at a time, then confirm deleted (one commit) those
    whose delete answered while the call was still FIRING_MARGIN ahead: only those
    surely never ran. A task due within FIRING_MARGIN may be firing: it is logged and
    left, checked again right before its own delete. With `out` (a dry run) each
    deletion is printed instead.
    """
    left = "left"

    def firing(item: Stale) -> bool:
        if item.key.instant > clock() + FIRING_MARGIN:
            return False
        log.warning(
            "stale task left on the queue: it is due within %ds and may be firing",
            FIRING_MARGIN.total_seconds(),
            extra={"user_id": item.key.user_id, "task_id": item.task_id, "reason": item.reason},
        )
        return True

    def delete(item: Stale) -> bool | str | None:
        """True deleted, False already gone, `left` too close now, None failed."""
        extra = {"user_id": item.key.user_id, "task_id": item.task_id, "reason": item.reason}
        if item.queue is not None:
            extra["queue"] = item.queue
        try:
            if firing(item):
                record.write([Entry(item.key, item.alternative, PLANNED)])  # undo the mark
                return left
            gone = sinks(item.queue).delete(item.task_id)
        except (gexc.GoogleAPICallError, gexc.RetryError, FatalQueueError, DatabaseError) as exc:
            log.error("could not delete a stale task: %s", exc, extra=extra)
            return None
        if gone:
            log.info("deleted a stale task", extra=extra)
        return gone

    if out is not None:
        for item in stale:
            if firing(item):
                summary.deletes_skipped += 1
            else:
                out(json.dumps(item.plan_line(), ensure_ascii=False))
        return
    with ThreadPoolExecutor(config.enqueue_concurrency, thread_name_prefix="delete") as pool:
        for chunk in _chunks(stale, RECORD_BATCH):
            doomed = []
            for item in chunk:
                if firing(item):
                    summary.deletes_skipped += 1
                else:
                    doomed.append(item)
            try:
                record.write(
                    [Entry(i.key, i.alternative, DELETING, i.reason, i.queue) for i in doomed]
                )
            except DatabaseError as exc:
                summary.fail(f"could not record the stale tasks, so deleted none: {exc}")
                summary.deletes_failed += len(doomed)
                return
            confirmed = []
            for item, outcome in zip(doomed, pool.map(delete, doomed), strict=True):
                if outcome is None:
                    summary.deletes_failed += 1
                elif outcome == left:
                    summary.deletes_skipped += 1
                else:
                    summary.tasks_deleted += bool(outcome)
                    if item.key.instant > clock() + FIRING_MARGIN:
                        confirmed.append(
                            Entry(item.key, item.alternative, DELETED, item.reason, item.queue)
                        )
            try:
                record.write(confirmed)
            except DatabaseError as exc:  # they stay "deleting": safe, only less certain
                summary.fail(f"could not confirm deleted tasks: {exc}")
                return


def run(
    config: Config,
    now: dt.datetime,
    *,
    dry_run: bool,
    tasks_client: Any,
    stop: threading.Event,
    out: Callable[[str], None],
    clock: Clock | None = None,
) -> RunSummary:
    """One whole run: check and load the call record, list the queue, stream rows and
    plan them, record and enqueue (or print) each call, then delete the stale tasks of
    this shard and window (RECONCILE) and purge old records.

    Raises SetupError, before any task is touched, when a table or grant is missing.
    """
    started = time.monotonic()
    injected = clock

    def job_clock() -> dt.datetime:
        """The job's own clock: `now` plus the time this run has taken so far."""
        if injected is not None:
            return injected()
        return now + dt.timedelta(seconds=time.monotonic() - started)

    window = Window.around(now, config.grace, config.lookahead)
    summary = RunSummary(
        dry_run=dry_run,
        shard=f"{config.task_index}/{config.task_count}",
        window_start=window.start.isoformat(),
        window_end=window.end.isoformat(),
    )
    log.info(
        "run started",
        extra={
            "now": now.isoformat(),
            "window_start": summary.window_start,
            "window_end": summary.window_end,
            "shard": summary.shard,
            "dry_run": dry_run,
        },
    )
    with contextlib.ExitStack() as stack:
        try:
            writer = connect(config, streaming=False)
            stack.callback(_close, writer)
            record = CallRecord(writer, config)
            record.check()
            if not dry_run:
                waiting = time.monotonic()
                if not record.lock():
                    summary.fail(
                        f"another run of shard {summary.shard} still held the run lock"
                        f" after {RUN_LOCK_WAIT_SECONDS}s; this run did nothing"
                    )
                    return summary
                if (waited := time.monotonic() - waiting) > 1:
                    # Plan for when the run really begins, not for when it was started.
                    now, started = job_clock(), time.monotonic()
                    window = Window.around(now, config.grace, config.lookahead)
                    summary.window_start = window.start.isoformat()
                    summary.window_end = window.end.isoformat()
                    log.info("waited %.0fs for another run of this shard", waited)
            record.load(window)
            reader = connect(config, streaming=True)
            stack.callback(_close, reader)
        except DatabaseError as exc:
            summary.fail(str(exc))
            return summary

        sinks = Queues(lambda: tasks_client or make_tasks_client(config), config, stop)
        pending: dict[CallKey, set[int]] | None = None
        if config.reconcile and config.project:
            # Listed first, so calls already on the queue need no create, and the run
            # knows which ids are pending (read-only: a dry run does this too).
            try:
                own = sinks()
                pending = own.list_own(window)
                log.info(
                    "listed the queue",
                    extra={"queue": own.queue, "pages": own.pages, "tasks": len(pending)},
                )
            except FatalQueueError as exc:
                sinks.fatal = exc
                if dry_run and isinstance(exc, NoCredentialsError):
                    log.warning(QUEUE_NOT_READ, "no Google credentials")
                else:
                    summary.fail(str(exc))
            except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
                summary.fail(f"cannot list the queue, so stale tasks stay this run: {exc}")
        elif config.reconcile and dry_run:
            log.warning(QUEUE_NOT_READ, "GOOGLE_CLOUD_PROJECT is not set")

        chosen: dict[CallKey, int] = {}
        invalid_users: set[int] = set()
        paused: set[CallKey] = set()
        rows = read_rows(reader, config, window)
        stack.callback(rows.close)
        calls = plan(rows, config, window, summary, stop, invalid_users, paused)
        batches = choose_ids(calls, record, pending, chosen)
        if dry_run:
            for batch in batches:
                for call, choice in batch:
                    out(json.dumps(call.plan_line(choice.alternative)))
        else:
            enqueue(sinks, batches, record, config, summary, stop, job_clock)
        rows.close()
        if dry_run and summary.error is None and not stop.is_set():
            try:
                summary.peak_minute = count_peak(read_schedules(reader, config), config, now)
            except DatabaseError as exc:
                summary.fail(str(exc))

        # Only a complete plan can say what is stale: not after an error or a stop.
        if pending is not None and summary.error is None and not stop.is_set():
            stale = stale_tasks(pending, chosen, invalid_users, paused, record.elsewhere())
            reconcile(
                sinks,
                record,
                stale,
                config=config,
                summary=summary,
                clock=job_clock,
                out=out if dry_run else None,
            )
        if not dry_run and config.task_index == 0 and not stop.is_set():
            try:
                summary.records_purged = record.purge(now - config.retention)
            except DatabaseError as exc:
                log.warning("could not purge old scheduled_calls rows: %s", exc)
        log.info(
            "time in scheduled_calls: %.1fs",
            record.seconds,
            extra={"record_seconds": round(record.seconds, 3), "queue": config.queue_name},
        )
    return summary


def _close(conn: Any) -> None:
    with contextlib.suppress(pymysql.err.Error):  # already closed if the link broke
        conn.close()


# ---------------------------------------------------------------------------
# Check: the connection, the schema, the grants and every row, before go-live
# ---------------------------------------------------------------------------

USERS_INDEX = (
    "is_active", "timezone", "call_time", "call_weekdays", "phone_number", "pause_from",
    "pause_until",
)  # fmt: skip


@dataclasses.dataclass
class CheckSummary:
    """What `--check` found; the last stdout line is this object as JSON."""

    users_checked: int = 0
    rows_invalid: int = 0
    invalid_by_column: dict[str, int] = dataclasses.field(default_factory=dict)
    invalid_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    shard: str = "0/1"
    error: str | None = None
    peak_minute: dict[str, Any] | None = None  # the next 24 hours' busiest minute

    @property
    def exit_code(self) -> int:
        """0 when every row is valid and the schema complete; 1 otherwise (a missing
        table, column or grant never gets here: `main` exits 2)."""
        return 1 if (self.rows_invalid or self.problems or self.error) else 0


def reason_kind(reason: str) -> str:
    """A reason without the row's own values, to count alike reasons together:
    "call_weekdays '月x': unknown word 'x'" -> "call_weekdays …: unknown word …"."""
    return re.sub(r"'[^']*'|\*\*\*\S*|-?[0-9][0-9:.-]*", "…", reason)


def count_peak(
    groups: Iterable[tuple[UserRow, int]], config: Config, now: dt.datetime
) -> dict[str, Any] | None:
    """The peak minute of the next 24 hours from `now` over rows with their weights,
    planned as the job plans them; warned about when it is too long (`warn_peak`).
    Invalid rows are left out."""
    window = Window.next_day(now)
    counts: dict[dt.datetime, int] = {}
    for row, weight in groups:
        try:
            setting = parse_row(row, config.default_timezone, None)
        except InvalidRow:
            continue
        if setting is not None:
            count_minutes(setting, window, counts, weight)
    peak = peak_minute(counts, config)
    warn_peak(peak, config)
    return peak


def check(
    config: Config, out: Callable[[str], None], now: dt.datetime | None = None
) -> CheckSummary:
    """Validate the schema, the grants and every active row of this shard, streamed,
    and find the peak minute of the next 24 hours from `now` among the valid ones.

    Writes nothing and contacts no Cloud Tasks endpoint. Prints one JSON line per
    invalid row. Raises SetupError for a missing table, column or grant.
    """
    now = now or dt.datetime.now(UTC)
    window = Window.next_day(now)
    per_minute: dict[dt.datetime, int] = {}
    summary = CheckSummary(shard=f"{config.task_index}/{config.task_count}")
    with contextlib.ExitStack() as stack:
        try:
            conn = connect(config, streaming=False)
            stack.callback(_close, conn)
            CallRecord(conn, config).check()
            with conn.cursor() as cur:
                cur.execute("SHOW INDEX FROM users WHERE Key_name = 'idx_users_due'")
                columns = tuple(row[4] for row in sorted(cur.fetchall(), key=lambda r: r[3]))
            if columns != USERS_INDEX:
                summary.problems.append(
                    f"index idx_users_due is missing or differs ({', '.join(columns) or 'none'}):"
                    f" apply {MIGRATIONS['users']}; runs still work, but read the whole table"
                )
            reader = connect(config, streaming=True)
            stack.callback(_close, reader)
            sql = f"SELECT {USER_COLUMNS} FROM users WHERE is_active = 1"
            args: list[Any] = []
            if config.task_count > 1:
                sql += " AND MOD(MOD(id, %s) + %s, %s) = %s"
                args = [config.task_count] * 3 + [config.task_index]
            cur = reader.cursor()
            stack.callback(_abandon, cur)
            cur.execute(sql, args)
            for values in cur:
                row = UserRow(*values)
                summary.users_checked += 1
                try:
                    setting = parse_row(row, config.default_timezone, config.phone_region)
                    if setting is not None:
                        count_minutes(setting, window, per_minute)
                except InvalidRow as reason:
                    summary.rows_invalid += 1
                    for counts, key in (
                        (summary.invalid_by_column, reason.column),
                        (summary.invalid_by_reason, reason_kind(str(reason))),
                    ):
                        counts[key] = counts.get(key, 0) + 1
                    line = {
                        "user_id": row.id,
                        "column": reason.column,
                        "reason": str(reason),
                        "phone": mask_phone(row.phone_number),
                    }
                    out(json.dumps(line, ensure_ascii=False))
        except DatabaseError as exc:
            summary.error = str(exc)
        except pymysql.err.MySQLError as exc:
            summary.error = f"lost the database while checking users: {exc}"
    if summary.error is None:
        summary.peak_minute = peak_minute(per_minute, config)
        warn_peak(summary.peak_minute, config)
    for problem in summary.problems:
        log.error("%s", problem)
    if summary.error:
        log.critical("%s", summary.error)
    return summary


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_now(text: str, default_zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """--now: exact with an offset or Z, else wall-clock time in DEFAULT_TIMEZONE."""
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=default_zone)


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
    clock: Clock | None = None,
    tasks_client: Any = None,
    stdout: Any = None,
    stderr: Any = None,
) -> int:
    """Run the job once and return its exit code (0 ok, 1 runtime failure, 2 usage).

    Args:
        argv: command-line arguments (default: sys.argv[1:]).
        env: settings (default: .env loaded under the process environment).
        now: the instant to plan for when --now is absent (default: the clock).
        tasks_client: a ready Cloud Tasks client (tests), else one is made.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="read and plan, print the plan, create no task"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the database, the grants and every active row; print each invalid"
        " row; write nothing and contact no Cloud Tasks endpoint",
    )
    parser.add_argument(
        "--now",
        metavar="ISO8601",
        help="plan as if it were this instant (no offset: DEFAULT_TIMEZONE)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if env is None:
        # .env in the working directory; real variables win over it.
        file_values = dotenv_values(".env")
        env = {**{k: v for k, v in file_values.items() if v is not None}, **os.environ}
    try:
        config = Config.from_env(env, dry_run=args.dry_run or args.check)
    except ConfigError as exc:
        print(f"anpi-call-scheduler: {exc}", file=sys.stderr)
        return 2
    if args.now is not None:
        if not (args.dry_run or args.check) and config.emulator_host is None:
            # Against the real queue the safety margins need the real clock: a real run
            # "as if" two hours ago would create calls that ran and were forgotten.
            print(
                "anpi-call-scheduler: --now needs --dry-run, or a local Cloud Tasks"
                " endpoint (CLOUD_TASKS_EMULATOR_HOST)",
                file=sys.stderr,
            )
            return 2
        try:
            now = parse_now(args.now, config.default_timezone)
        except ValueError:
            print(f"anpi-call-scheduler: --now {args.now!r} is not ISO 8601", file=sys.stderr)
            return 2
    setup_logging(config.log_level, config.log_json, stderr)
    if clock is not None and now is None:
        now = clock()

    stop, signalled = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.warning(
            "received %s: finishing in-flight tasks, then stopping", signal.Signals(signum).name
        )
        signalled.set()
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C ends the process at once

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)

    if stdout is None:
        try:
            # Buffered even under PYTHONUNBUFFERED (set in the image for the logs): a dry
            # run can print a hundred thousand plan lines.
            stdout = open(sys.stdout.fileno(), "w", 1 << 16, "utf-8", closefd=False)  # noqa: SIM115
        except (AttributeError, OSError, ValueError):  # no real file behind sys.stdout
            stdout = sys.stdout

    def out(line: str) -> None:
        stdout.write(line + "\n")

    summary: RunSummary | CheckSummary
    try:
        if args.check:
            summary = check(config, out, now)
        else:
            summary = run(
                config,
                now or dt.datetime.now(UTC),
                dry_run=args.dry_run,
                tasks_client=tasks_client,
                stop=stop,
                out=out,
                clock=clock,
            )
    except SetupError as exc:  # a missing table or grant: nothing was done
        log.critical("%s", exc)
        return 2
    except Exception:  # the one catch-all: report, never die without a summary
        log.exception("unexpected error")
        summary = (CheckSummary if args.check else RunSummary)(error="unexpected error (see log)")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if isinstance(summary, RunSummary):
        summary.interrupted = signalled.is_set()
    out(json.dumps(dataclasses.asdict(summary), ensure_ascii=False))
    stdout.flush()
    log.info("run finished", extra={"exit_code": summary.exit_code})
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
