"""anpi-call-scheduler: turn users' safety-check call settings into Cloud Tasks.

Reads the active users whose call can fall in its window from MySQL, works out each
call's instant in the user's zone (JST by default), records the task id it gives each
call in `scheduled_calls`, then creates that Cloud Tasks HTTP task, which POSTs to the
call webhook at the call's instant. Hourly runs also list the queue; quick runs
(--changes, every minute) act on what changed, from the job's own record.

Run: python main.py [--dry-run | --check] [--changes] [--now ISO8601]   (settings: env or .env)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import enum
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import jpholiday
import phonenumbers
import pymysql
from dotenv import dotenv_values
from google.api_core import exceptions as gexc
from google.api_core import retry as retries
from google.auth import exceptions as auth_exceptions

UTC = dt.UTC
DAY_SECONDS = 86_400

# Cloud Tasks refuses a task name for about an hour after the task ran or was
# deleted; planning never reaches further back than that, so re-creating the recorded
# id of a call that already ran meets ALREADY_EXISTS instead of calling twice.
MAX_GRACE_MINUTES = 60
# A task due this close to the job's clock may be firing already (see `Placement`).
FIRING_MARGIN = dt.timedelta(seconds=60)
# Ids a call may be given (0 = base id, n = "-rN"); past this something is deleting
# the job's tasks in a loop, and the call fails loudly instead.
MAX_ALTERNATIVE = 20
# A recorded id is created again only while Cloud Tasks surely still refuses its name
# if it ran (about an hour): older, "ran" and "never created" look alike.
MAX_RECREATE_AGE = dt.timedelta(minutes=50)
# A quick run waits at most this long for another run of its shard, then skips: the
# next minute's quick run catches up.
QUICK_LOCK_WAIT_SECONDS = 30
# A run reads its window in parts of this size, nearest first (see `place_window`).
SLICE = dt.timedelta(minutes=15)
# How far back job_runs is read for runs of another shard count (see `take_turns`).
OTHER_COUNTS_REACH = dt.timedelta(days=1)
# How far back a run looks for calls that no complete run covered.
MAX_AUDIT = dt.timedelta(hours=24)
# Every local date of any zone lies within this of each of its instants (a day of 25
# hours at a DST change, zones of half hours).
DAY_REACH = dt.timedelta(hours=26)
# Each Cloud Tasks attempt waits at most this long for its answer.
ATTEMPT_SECONDS = 10.0
# Rows per scheduled_calls write, per point lookup of users, per retention DELETE.
RECORD_BATCH = 500
PURGE_BATCH = 5000
PURGE_MAX_BATCHES = 50
# How long job_runs keeps a run: the audit reaches 24 hours back.
RUN_HISTORY_DAYS = 3
# schedule_time may be at most 30 days ahead.
MAX_LOOKAHEAD_MINUTES = 30 * 24 * 60
TASK_ID_RE = re.compile(r"^([0-9a-f]{8})-anpi-(-?\d+)-(\d{8}T\d{6}Z)(?:-r(\d+))?$")
# Between the digits of a phone number people type spaces, brackets and dashes (after
# NFKC, which folds full-width digits, dashes and brackets); nothing else is allowed.
# The dashes: U+30FC (the long-vowel mark an IME types), U+2010-U+2015, U+2212.
PHONE_SEPARATORS = re.compile("[\\s().\\-\u30fc\u2010-\u2015\u2212]")
PHONE_CHARS = re.compile(r"\+?[0-9]+")
E164_RE = re.compile(r"\+[1-9][0-9]{6,14}")
CLOCK_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("auto", "json", "text")

log = logging.getLogger("anpi")
Clock = Callable[[], dt.datetime]  # the job's clock: aware UTC instants


# ---------------------------------------------------------------------------
# Errors: one root, each kind carrying the exit code `main` returns for it
# ---------------------------------------------------------------------------


class JobError(Exception):
    """A failure that ends the run, or the part of it that met the failure."""

    exit_code = 1


class UsageError(JobError):
    """A bad command line: nothing was done."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more settings are missing or malformed; the message names each."""


class SetupError(JobError):
    """The database lacks a table, a column or a grant the job needs: nothing was done."""

    exit_code = 2


class DatabaseError(JobError):
    """The database could not be reached or stopped answering."""


class LockLost(DatabaseError):
    """The run no longer holds its shard's run lock: another run may act meanwhile."""


class QueueError(JobError):
    """A Cloud Tasks error that every further call would meet too (no queue, no
    credentials)."""


class NoCredentialsError(QueueError):
    """No Google credentials at all: the usual state of a laptop, not of Cloud Run."""


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


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
    run_lock_wait_seconds: int = 120

    @property
    def shard(self) -> Shard:
        return Shard(self.task_index, self.task_count)

    @property
    def queue_name(self) -> str:
        """This shard's queue: CLOUD_TASKS_QUEUE, or `{CLOUD_TASKS_QUEUE}-{i}` with
        QUEUE_PER_SHARD=1."""
        return f"{self.queue}-{self.task_index}" if self.queue_per_shard else self.queue

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

        def switch(name: str, default: str, meaning: str) -> bool:
            value = text(name, default)
            if value not in ("0", "1"):
                errors.append(f"{name}={value!r} must be {meaning}")
            return value == "1"

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
            reconcile=switch("RECONCILE", "1", "1 (on) or 0 (off)"),
            retention=dt.timedelta(days=integer("SCHEDULED_CALLS_RETENTION_DAYS", 35, 2, 3650)),
            queue_per_shard=switch(
                "QUEUE_PER_SHARD",
                "0",
                "1 (shard i uses CLOUD_TASKS_QUEUE-i) or 0 (every shard uses CLOUD_TASKS_QUEUE)",
            ),
            # What deploy.sh sets on the queue; Cloud Tasks allows at most 500.
            queue_max_dispatches_per_second=number("QUEUE_MAX_DISPATCHES_PER_SECOND", 10, 500),
            peak_warn_minutes=number("PEAK_WARN_MINUTES", 5, 24 * 60),
            run_lock_wait_seconds=integer("RUN_LOCK_WAIT_SECONDS", 120, 1, 3600),
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
    """One JSON object per line with Cloud Logging's `severity`, `message` and an RFC
    3339 UTC `time`."""

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
    """`time LEVEL message key=value ...` for a terminal, the time in DEFAULT_TIMEZONE
    with its offset, as the plan's times are."""

    def __init__(self, zone: zoneinfo.ZoneInfo) -> None:
        super().__init__()
        self._zone = zone

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        stamp = dt.datetime.fromtimestamp(record.created, self._zone).strftime("%H:%M:%S%z")
        line = f"{stamp[:8]}{stamp[8:11]}:{stamp[11:]} {record.levelname:<7} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(config: Config, stream: Any = None) -> None:
    """Send the job's logs to `stream` (default stderr) in the configured format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if config.log_json else TextFormatter(config.default_timezone)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)


def mask_phone(value: object) -> str:
    """A phone number reduced to its last four digits, safe for logs."""
    text = unicodedata.normalize("NFKC", value) if isinstance(value, str) else ""
    digits = re.sub(r"[^0-9]", "", text)
    return f"***{digits[-4:]}" if len(digits) >= 8 else "***"


# ---------------------------------------------------------------------------
# Domain: windows, shards, call settings, calls and their task ids
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """The instants a run plans: start <= t < end, both aware."""

    start: dt.datetime
    end: dt.datetime

    @classmethod
    def around(cls, now: dt.datetime, grace: dt.timedelta, lookahead: dt.timedelta) -> Window:
        now = now.astimezone(UTC)
        return cls(now - grace, now + lookahead)

    def __contains__(self, instant: object) -> bool:
        return isinstance(instant, dt.datetime) and self.start <= instant < self.end

    @property
    def empty(self) -> bool:
        return self.end <= self.start


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which users a run handles: id % count == index (Python's modulo, so negative ids
    belong to a shard too). The one rule of sharding, in Python and in SQL."""

    index: int = 0
    count: int = 1

    def holds(self, user_id: int) -> bool:
        return user_id % self.count == self.index

    def sql(self, column: str) -> tuple[str, list[int]]:
        """A ` AND ...` condition on `column` and its arguments ("" for one shard)."""
        if self.count == 1:
            return "", []
        return f" AND MOD(MOD({column}, %s) + %s, %s) = %s", [self.count] * 3 + [self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@functools.lru_cache(maxsize=4096)
def is_holiday(day: dt.date) -> bool:
    """A national holiday of Japan (substitute and citizens' holidays included), by the
    law as jpholiday computes it."""
    return jpholiday.is_holiday(day)


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

    def local_date(self, instant: dt.datetime | None = None) -> dt.date:
        """The local date of the call (or of another instant) in the user's zone."""
        return (instant or self.instant).astimezone(self.zone).date()


def task_id(user_id: int, instant: dt.datetime, alternative: int = 0) -> str:
    """Deterministic task id of one call: hashed prefix, user id, UTC instant.

    The short hash first spreads names across Cloud Tasks' key space (sequential or
    timestamp-prefixed names raise its latency); `alternative` > 0 names the call's
    next id ("-rN").
    """
    stamp = _utc_stamp(instant)
    digest = hashlib.sha256(f"{user_id}@{stamp}".encode()).hexdigest()[:8]
    return f"{digest}-anpi-{user_id}-{stamp}" + (f"-r{alternative}" if alternative else "")


class TaskName(NamedTuple):
    """What a task id of this job says: whose call, when, and which alternative."""

    user_id: int
    instant: dt.datetime
    alternative: int

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
    return name if task_id(name.user_id, instant, name.alternative) == value else None


@functools.lru_cache(maxsize=16384)
def _utc_stamp(instant: dt.datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def naive_utc(instant: dt.datetime) -> dt.datetime:
    """An aware instant as the naive UTC DATETIME the job's tables hold."""
    return instant.astimezone(UTC).replace(tzinfo=None)


def aware_utc(value: dt.datetime) -> dt.datetime:
    """A naive UTC DATETIME from the job's tables as an aware instant."""
    return value.replace(tzinfo=UTC)


def clock_text(seconds: int) -> str:
    """HH:MM:SS of a number of seconds (hours may exceed 23, as MySQL TIME's do)."""
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------
# Row parsing: weekdays, phone numbers, times, zones and pauses as people type them
# ---------------------------------------------------------------------------


USER_COLUMNS = "id, phone_number, call_weekdays, call_time, timezone, pause_from, pause_until"


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


class InvalidRow(ValueError):
    """A row that cannot be planned; the message is the reason (never the phone).

    Not a JobError: an invalid row is counted and reported, and never ends a run.
    """

    column = "row"  # set by `parse_row` to the column at fault


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
    row: UserRow, default_zone: zoneinfo.ZoneInfo, region: str = "JP"
) -> CallSetting | None:
    """Validate one row: the one validation of runs and `--check` alike. None when it
    asks for no calls; InvalidRow, naming the column at fault, when it is wrong.

    `region` is the country of national phone numbers (DEFAULT_COUNTRY_CODE's region).
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
        phone = normalize_phone(row.phone_number, region)
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
    if not value.isascii():  # full-width digits and brackets: folded (NFKC)
        value = unicodedata.normalize("NFKC", value)
    compact = PHONE_SEPARATORS.sub("", value)
    if not PHONE_CHARS.fullmatch(compact):
        raise InvalidRow(
            f"phone_number {mask_phone(value)} holds something other than digits, a leading"
            " +, spaces, brackets and dashes"
        )
    number = _quick_number(compact, region)
    if number is not None:  # valid already, and without a leading zero: E.164 as is
        return f"+{number.country_code}{number.national_number}"
    shown = mask_phone(value)
    if len(compact) > 20:  # E.164 has at most 15 digits; a national form a few more
        raise InvalidRow(f"phone_number {shown} is too long")
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
    """The number split without libphonenumber's slower text parser, when that is
    plain: `+<code><national>`, or `<trunk 0><national>` in `region` (bench.py measures
    the gain).
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
    return number if _valid_number(number) else None


# libphonenumber's number types, in the order its validation tries them.
_NUMBER_TYPES = (
    "premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager", "uan",
    "voicemail", "fixed_line", "mobile",
)  # fmt: skip


def _valid_number(number: phonenumbers.PhoneNumber) -> bool:
    """phonenumbers.is_valid_number, with one regular expression per region and length.

    libphonenumber tries the pattern of each number type in turn, about ten regular
    expressions a number, which made validation most of a dry run's time. For a country
    calling code of one region the answer is the same: the number matches the region's
    general pattern and some type's pattern, each of whose lengths allow it (tests check
    the two agree). Anything else goes to the library."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(number.country_code or 0, ())
    if len(regions) != 1 or regions[0] == "001" or number.italian_leading_zero:
        return bool(phonenumbers.is_valid_number(number))
    national = str(number.national_number)
    pattern = _valid_pattern(regions[0], len(national))
    return pattern is not None and pattern.fullmatch(national) is not None


@functools.cache
def _valid_pattern(region: str, length: int) -> re.Pattern[str] | None:
    """One pattern for the valid national numbers of `region` with `length` digits."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)

    def fits(desc: Any) -> bool:
        lengths = desc.possible_length if desc is not None else ()
        pattern = desc.national_number_pattern if desc is not None else None
        return bool(pattern) and (not lengths or length in lengths)

    general = metadata.general_desc if metadata is not None else None
    if general is None or not fits(general):
        return None
    types = [getattr(metadata, name) for name in _NUMBER_TYPES]
    alternatives = "|".join(f"(?:{d.national_number_pattern})" for d in types if fits(d))
    if not alternatives:
        return None
    return re.compile(f"(?=(?:{general.national_number_pattern})$)(?:{alternatives})")


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
    return ("-" if seconds < 0 else "") + clock_text(abs(seconds))


# ---------------------------------------------------------------------------
# Planning: pure functions of settings and windows (no clock, no I/O)
# ---------------------------------------------------------------------------


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
        if instant in window:
            found.append((day, instant))
        day += dt.timedelta(days=1)
    return tuple(found)


def plan_calls(
    setting: CallSetting, window: Window, paused: list[dt.datetime] | None = None
) -> list[Call]:
    """The calls one validated row asks for inside `window` (see `occurrences`)."""
    return [
        Call(setting.user_id, setting.phone_number, t, setting.zone)
        for t in occurrences(setting, window, paused)
    ]


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


def count_minutes(
    setting: CallSetting, window: Window, counts: dict[dt.datetime, int], weight: int = 1
) -> None:
    """Add `weight` calls to the minute (UTC) of each call `setting` makes in `window`
    (paused dates make none).

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


def uncovered(stretch: Window, covered: Iterable[Window]) -> list[Window]:
    """The parts of `stretch` that no window of `covered` holds, in time order."""
    gaps, start = [], stretch.start
    for window in sorted(covered, key=lambda w: w.start):
        if window.start > start:
            gaps.append(Window(start, min(window.start, stretch.end)))
        start = max(start, window.end)
        if start >= stretch.end:
            break
    if start < stretch.end:
        gaps.append(Window(start, stretch.end))
    return [gap for gap in gaps if not gap.empty]


# ---------------------------------------------------------------------------
# Data source: MySQL / Cloud SQL
# ---------------------------------------------------------------------------

# Rows whose TIME lies outside a day are read too, so that they are reported invalid.
OUT_OF_DAY_SQL = "call_time < CAST('00:00:00' AS TIME) OR call_time >= CAST('24:00:00' AS TIME)"
# Worth another connect: 2002/2003 cannot connect, 2006/2013 lost, 1040 too many connections.
# Anything else (a wrong password, 1045; an unknown database, 1049) fails at once.
TRANSIENT_DB_ERRORS = (2002, 2003, 2006, 2013, 1040)


def connect(config: Config, *, streaming: bool) -> Any:
    """Open a connection, retrying transient failures within DB_RETRY_SECONDS.

    `streaming` gives the reader: an unbuffered cursor that rows stream through while
    tasks are created. Otherwise the writer of the job's tables, with plain cursors.
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
    # TLS is for links that leave the machine: not Cloud SQL's unix socket (its connector
    # encrypts the way to the instance) nor loopback. Elsewhere PyMySQL uses TLS when the
    # server offers it. (Setting it up costs some 20 ms a connection.)
    host = config.db_host or ""
    kwargs["ssl_disabled"] = bool(config.db_socket) or host == "localhost" or _is_loopback(host)

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
    set_read_timeout(conn, config.db_read_timeout)
    return conn


def set_read_timeout(conn: Any, seconds: float) -> None:
    """How long each read and write on `conn` may wait from now on.

    PyMySQL has no public setter; it applies these attributes before every socket
    operation.
    """
    conn._read_timeout = conn._write_timeout = seconds


def close(conn: Any) -> None:
    with contextlib.suppress(pymysql.err.Error):  # already closed if the link broke
        conn.close()


def stream(conn: Any, sql: str, args: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
    """The rows of `sql` through an unbuffered cursor, one at a time.

    A consumer that stops part-way abandons the rest: PyMySQL would otherwise drain it
    on close or garbage collection, which is slow on a live connection (a stop
    part-way) and raises on a lost one.
    """
    cur = conn.cursor()
    finished = False
    try:
        cur.execute(sql, args)
        yield from cur
        finished = True
    finally:
        if finished:
            cur.close()
        else:
            result = getattr(cur, "_result", None)
            if result is not None:
                result.unbuffered_active = False


class Snapshot:
    """The users table as one consistent snapshot, read on the reader connection.

    Every query of a run reads the same snapshot: the window's rows zone by zone, then
    the rows of users whose tasks look stale. So a row whose zone changes meanwhile is
    read exactly once, and a row is never judged on two different versions.
    """

    def __init__(self, conn: Any, config: Config) -> None:
        self._conn = conn
        self._config = config
        self._zones: list[object] | None = None

    def __enter__(self) -> Snapshot:
        with self._errors("starting a snapshot"), self._conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(pymysql.err.Error):
            self._conn.commit()

    def rows(self, window: Window) -> Iterator[UserRow]:
        """Stream the active rows of this shard whose call can fall in `window`.

        One query per distinct `timezone` value (see `zone_query`), each a range scan
        of the index on (is_active, timezone, call_time).
        """
        with self._errors("reading users"):
            if self._zones is None:
                with self._conn.cursor() as cur:
                    # Both columns, so that the index is read by a loose scan (a few
                    # seeks); with `WHERE is_active = 1` it is scanned row by row.
                    cur.execute("SELECT DISTINCT is_active, timezone FROM users")
                    self._zones = [zone for (active, zone) in cur.fetchall() if active == 1]
            for value in self._zones:
                for row in stream(self._conn, *zone_query(value, self._config, window)):
                    yield UserRow(*row)

    def all_rows(self) -> Iterator[UserRow]:
        """Stream every active row of this shard (`--check`)."""
        condition, args = self._config.shard.sql("id")
        sql = f"SELECT {USER_COLUMNS} FROM users WHERE is_active = 1{condition}"
        with self._errors("checking users"):
            for row in stream(self._conn, sql, args):
                yield UserRow(*row)

    def active(self, user_ids: Iterable[int]) -> dict[int, UserRow]:
        """The active rows of these users, looked up by id (absent: none, or inactive)."""
        found: dict[int, UserRow] = {}
        for chunk in chunks(sorted(set(user_ids)), RECORD_BATCH):
            marks = ", ".join(["%s"] * len(chunk))
            sql = f"SELECT {USER_COLUMNS} FROM users WHERE is_active = 1 AND id IN ({marks})"
            with self._errors("looking users up"):
                for row in stream(self._conn, sql, chunk):
                    found[row[0]] = UserRow(*row)
        return found

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except pymysql.err.MySQLError as exc:
            raise DatabaseError(f"lost the database while {doing}: {exc}") from exc


def zone_query(zone_value: object, config: Config, window: Window) -> tuple[str, list[Any]]:
    """SQL and arguments for the rows with this `timezone` value that can be due.

    The `call_time` ranges come from `local_time_ranges`; rows whose TIME lies outside
    a day, or whose zone is unknown, are selected too so that they are reported. (A text
    `call_time` that MySQL casts to no time in the window is found by the stale check:
    see `Placement.stale`.)
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
        args += [clock_text(seconds) for pair in ranges for seconds in pair]
    shard_sql, shard_args = config.shard.sql("id")
    sql = (
        f"SELECT {USER_COLUMNS} FROM users"
        f" WHERE is_active = 1 AND {zone_sql} AND ({time_sql}){shard_sql}"
    )
    return sql, args + shard_args


T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of up to `size` items, read lazily."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# ---------------------------------------------------------------------------
# The job's own tables: scheduled_calls (which id each call was given) and job_runs
# ---------------------------------------------------------------------------

# What brings an existing database up to date: each table's first migration (a missing
# table), and the one that adds what a check needs.
MIGRATIONS = {
    "users": "migrations/002_users_pauses.sql",
    "scheduled_calls": "migrations/001_scheduled_calls.sql",
    "job_runs": "migrations/004_quick_runs.sql",
}
RECORD_COLUMNS = "call_at, user_id, alternative, task_id, state, reason, queue, created_at"
_FIRST_COLUMNS = "call_at, user_id, alternative, task_id, state, reason"  # migration 001's
RUN_COLUMNS = (
    "ran_at, kind, shard_index, shard_count, window_start, window_end, complete, audited_until"
)
# Every statement the job runs on its tables, each run once with nothing to touch, so a
# missing table, column or grant shows before any task is created. In the order of the
# migrations that fix them, so the first problem names the first file.
TABLE_CHECKS = (
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
        f"INSERT INTO scheduled_calls ({_FIRST_COLUMNS}, queue)"
        f" SELECT {_FIRST_COLUMNS}, queue FROM scheduled_calls WHERE FALSE",
        "migrations/003_scheduled_calls_queue.sql",
    ),
    (
        "INSERT",
        "scheduled_calls",
        f"INSERT INTO scheduled_calls ({RECORD_COLUMNS})"
        f" SELECT {RECORD_COLUMNS} FROM scheduled_calls WHERE FALSE",
        MIGRATIONS["job_runs"],
    ),
    ("SELECT", "job_runs", f"SELECT {RUN_COLUMNS} FROM job_runs LIMIT 0", None),
    (
        "INSERT",
        "job_runs",
        f"INSERT INTO job_runs ({RUN_COLUMNS}) SELECT {RUN_COLUMNS} FROM job_runs WHERE FALSE",
        None,
    ),
    ("UPDATE", "job_runs", "UPDATE job_runs SET complete = complete WHERE FALSE", None),
    ("DELETE", "job_runs", "DELETE FROM job_runs WHERE FALSE", None),
)
# A run pings its writer connection this often; the server ends a session silent for
# WRITER_IDLE_SECONDS (wait_timeout), and with it a run lock whose holder was cut off.
KEEPALIVE_SECONDS = 60
WRITER_IDLE_SECONDS = 300
# Worth running a write again: a deadlock (1213) or a lock wait timeout (1205) between
# two shards' upserts. Each write is one autocommitted, idempotent statement.
RETRY_WRITE_ERRORS = (1213, 1205)


def grants(config: Config) -> str:
    """The GRANT statements the job's database user needs."""
    user, db = f"'{config.db_user}'@'%'", f"`{config.db_name}`"
    return (
        f"GRANT SELECT ON {db}.users TO {user}; GRANT SELECT, INSERT, UPDATE, DELETE ON"
        f" {db}.scheduled_calls TO {user}; GRANT SELECT, INSERT, UPDATE, DELETE ON {db}.job_runs"
        f" TO {user}"
    )


class Writer:
    """The writer connection: the job's tables and its shard's run lock.

    Held by one thread at a time (placement threads write single calls while the main
    thread writes batches); driver errors become DatabaseError. Once a statement has
    failed the connection is taken as lost, and with it the run lock: nothing more is
    written, and the run stops acting (`assert_locked`).
    """

    def __init__(self, conn: Any, config: Config) -> None:
        self._conn = conn
        self._config = config
        self._lock = threading.Lock()
        self._lock_name: str | None = None
        self.failed: DatabaseError | None = None
        self.seconds = 0.0  # time spent in statements, for the bench

    def check(self) -> None:
        """Raise SetupError naming the table, migration and grant when a statement the
        job runs would be refused."""
        for privilege, table, sql, migration in TABLE_CHECKS:
            try:
                with self._lock, self._conn.cursor() as cur:
                    cur.execute(sql)
            except pymysql.err.MySQLError as exc:
                code = exc.args[0] if exc.args else None
                if code in (1142, 1143, 1044):  # command or column denied
                    raise SetupError(
                        f"the database user may not {privilege} on {table}: {grants(self._config)}"
                    ) from exc
                if code in (1146, 1054):  # no such table or column
                    fix = MIGRATIONS[table] if code == 1146 else migration or MIGRATIONS[table]
                    raise SetupError(
                        f"table {table} is missing or has old columns ({exc.args[1]}):"
                        f" apply {fix} (or schema.sql on a new database), then "
                        + grants(self._config)
                    ) from exc
                raise DatabaseError(f"cannot check table {table}: {exc}") from exc

    def lock(self, wait: float) -> bool:
        """Take this shard's run lock (MySQL GET_LOCK), waiting up to `wait` seconds; it
        is held until the connection closes. False when another run still held it.

        Runs of one shard then never overlap, so no run acts on an older snapshot of
        `users` than one that already finished. The server drops the lock when the
        holder's session ends: at once for a killed container, and within
        WRITER_IDLE_SECONDS for one cut off by the network (see `keep_alive`). The wait
        has its own timeout: DB_READ_TIMEOUT bounds each statement, not this one.
        """
        self._lock_name = run_lock_name(self._config.db_name, self._config.shard)
        set_read_timeout(self._conn, wait + self._config.db_read_timeout)
        try:
            with self.query() as cur:
                cur.execute("SET SESSION wait_timeout = %s", (WRITER_IDLE_SECONDS,))
                cur.execute("SELECT GET_LOCK(%s, %s)", (self._lock_name, wait))
                (held,) = cur.fetchone()
        finally:
            set_read_timeout(self._conn, self._config.db_read_timeout)
        return held == 1

    def held_elsewhere(self, shards: Sequence[Shard]) -> bool:
        """Whether any of these shards' run locks is held: runs of another shard count
        (the old TASK_COUNT's, still running during a change)."""
        if not shards:
            return False
        names = [run_lock_name(self._config.db_name, shard) for shard in shards]
        with self.query() as cur:
            cur.execute("SELECT " + ", ".join(["IS_USED_LOCK(%s) IS NOT NULL"] * len(names)), names)
            return any(cur.fetchone())

    def keep_alive(self, done: threading.Event) -> None:
        """Ping the writer every KEEPALIVE_SECONDS until `done`, in a daemon thread: the
        session stays open however long the creates between statements take, while a
        session the network cut off ends within WRITER_IDLE_SECONDS (its wait_timeout),
        and with it the run lock."""

        def ping() -> None:
            while not done.wait(KEEPALIVE_SECONDS):
                try:
                    with self.query() as cur:
                        cur.execute("SELECT 1")
                except DatabaseError:
                    return

        threading.Thread(target=ping, name="keep-alive", daemon=True).start()

    def assert_locked(self) -> None:
        """Raise LockLost unless this connection still holds the run lock: checked before
        every batch that creates or deletes tasks."""
        if self._lock_name is None:
            return
        with self.query() as cur:
            cur.execute("SELECT IS_USED_LOCK(%s) = CONNECTION_ID()", (self._lock_name,))
            (mine,) = cur.fetchone()
        if mine != 1:
            raise self._failed(LockLost("this run no longer holds its run lock"))

    def execute(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one write for many rows; a deadlock or lock wait between shards is retried."""
        retry = retries.Retry(
            predicate=lambda exc: isinstance(exc, _RetryableWrite),
            initial=0.05,
            maximum=1.0,
            timeout=self._config.db_read_timeout,
        )

        def attempt() -> None:
            try:
                with self.query() as cur:
                    cur.executemany(sql, rows)
            except DatabaseError as exc:
                cause = exc.__cause__
                if isinstance(cause, pymysql.err.MySQLError) and cause.args[:1] in {
                    (code,) for code in RETRY_WRITE_ERRORS
                }:
                    raise _RetryableWrite(str(exc)) from cause
                raise

        try:
            retry(attempt)()
        except (_RetryableWrite, gexc.RetryError) as exc:
            raise self._failed(DatabaseError(f"the job's tables: {exc}")) from exc

    @contextlib.contextmanager
    def query(self) -> Iterator[Any]:
        """A cursor on the writer connection, held alone."""
        if self.failed is not None:
            raise self.failed
        try:
            with self._lock, self._conn.cursor() as cur:
                started = time.monotonic()
                try:
                    yield cur
                finally:
                    self.seconds += time.monotonic() - started
        except pymysql.err.MySQLError as exc:
            if exc.args[:1] in {(code,) for code in RETRY_WRITE_ERRORS}:
                raise DatabaseError(f"the job's tables: {exc}") from exc
            raise self._failed(DatabaseError(f"the job's tables: {exc}")) from exc

    def _failed(self, exc: DatabaseError) -> DatabaseError:
        self.failed = self.failed or exc
        return exc


class _RetryableWrite(Exception):
    """A write that met a deadlock or a lock wait; run it again."""


def run_lock_name(database: str, shard: Shard) -> str:
    """The GET_LOCK name of a shard's runs: its database and its users (at most 64
    chars). Hourly and quick runs of a shard share it, whatever their queue settings."""
    scope = f"{database}|{shard}"
    return "anpi-call-scheduler:" + hashlib.sha256(scope.encode()).hexdigest()[:40]


class RecordState(enum.Enum):
    """The state of a task id in scheduled_calls."""

    PLANNED = "planned"  # given to the call; its task may not exist yet, be pending, or have run
    DELETING = "deleting"  # a delete was begun: the task may be pending, gone, or have run
    DELETED = "deleted"  # deleted while the call was still ahead: it surely never ran


PLANNED, DELETING, DELETED = RecordState.PLANNED, RecordState.DELETING, RecordState.DELETED


class Recorded(NamedTuple):
    """One task id of a call as scheduled_calls has it."""

    state: RecordState
    queue: str
    created: bool  # CreateTask confirmed the task: it was created, or its name was taken
    reason: str | None = None


class Entry(NamedTuple):
    """One scheduled_calls row to write: a call's id `alternative` and its state."""

    key: CallKey
    alternative: int
    state: RecordState
    reason: str | None = None
    queue: str | None = None  # the queue of a new row; None: this shard's
    created: bool = False  # also confirm the create (a confirmation is never taken back)


class CallRecord:
    """scheduled_calls: one row per task id the job gave a call.

    It knows what Cloud Tasks cannot tell: whether a refused name belongs to a task that
    ran or to one that was deleted, and whether an id's task was surely created. It also
    names the queue each task belongs to, fixed by the first run that wrote the row.
    Holds this shard's rows of the run's window, kept up to date by every write, and
    answers questions about them; `Placement` decides what they mean.
    """

    def __init__(self, writer: Writer, config: Config, clock: Clock) -> None:
        self._writer = writer
        self._config = config
        self._clock = clock
        self._calls: dict[CallKey, dict[int, Recorded]] = {}
        self._guard = threading.Lock()

    def load(self, window: Window) -> None:
        """Read this shard's rows for the calls in `window`."""
        config = self._config
        shard_sql, shard_args = config.shard.sql("user_id")
        sql = (
            "SELECT user_id, call_at, alternative, state, queue, created_at IS NOT NULL, reason"
            f" FROM scheduled_calls WHERE call_at >= %s AND call_at < %s{shard_sql}"
        )
        calls: dict[CallKey, dict[int, Recorded]] = {}
        states = {state.value: state for state in RecordState}
        with self._writer.query() as cur:
            cur.execute(sql, [naive_utc(window.start), naive_utc(window.end), *shard_args])
            for user_id, call_at, alternative, state, queue, created, reason in cur.fetchall():
                # NULL queue: a row from before migration 003, when there was one queue.
                queue = queue or config.queue
                recorded = Recorded(states[state], queue, bool(created), reason)
                calls.setdefault(CallKey(user_id, aware_utc(call_at)), {})[alternative] = recorded
        self._calls = calls

    def ids(self, key: CallKey) -> dict[int, Recorded]:
        """The recorded ids of call `key` (alternative -> row); empty when none."""
        with self._guard:
            return dict(self._calls.get(key, {}))

    def keys(self) -> list[CallKey]:
        with self._guard:
            return list(self._calls)

    def write(self, entries: Sequence[Entry]) -> None:
        """Upsert `entries`, one statement per RECORD_BATCH rows, each committed.

        A row's queue is never updated (the first writer's stays, see `claim`), nor is a
        confirmed create taken back, nor does a `deleted` id become `planned` again: it
        surely never ran, and a run on an older snapshot must not say otherwise.
        """
        revived = "state = 'deleted' AND VALUES(state) = 'planned'"
        sql = (
            f"INSERT INTO scheduled_calls ({RECORD_COLUMNS})"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE"
            # MySQL assigns left to right: reason reads the old state.
            f" reason = IF({revived}, reason, VALUES(reason)),"
            f" state = IF({revived}, state, VALUES(state)),"
            " created_at = COALESCE(created_at, VALUES(created_at))"
        )
        own = self._config.queue_name
        stamp = naive_utc(self._clock())
        for chunk in chunks(entries, RECORD_BATCH):
            rows = [
                (
                    naive_utc(e.key.instant), e.key.user_id, e.alternative,
                    task_id(e.key.user_id, e.key.instant, e.alternative), e.state.value,
                    e.reason, e.queue or own, stamp if e.created else None,
                )
                for e in chunk
            ]  # fmt: skip
            self._writer.execute(sql, rows)
            with self._guard:
                for e in chunk:
                    ids = self._calls.setdefault(e.key, {})
                    old = ids.get(e.alternative)
                    if old and old.state is DELETED and e.state is PLANNED:
                        continue
                    queue = old.queue if old else e.queue or own
                    created = e.created or bool(old and old.created)
                    ids[e.alternative] = Recorded(e.state, queue, created, e.reason)

    def claim(self, entries: Sequence[Entry]) -> dict[tuple[CallKey, int], str]:
        """Record new planned ids (`write`), then read back the queue of each: the queue
        of the run that wrote the row first. Two runs that planned the same new id on
        different queues (a reshard while an execution of the old TASK_COUNT is still
        running) then both create it on that one queue, where its name is unique."""
        self.write(entries)
        queues: dict[tuple[CallKey, int], str] = {}
        for chunk in chunks(entries, RECORD_BATCH):
            sql = (
                "SELECT user_id, call_at, alternative, queue FROM scheduled_calls"
                " WHERE task_id IN (" + ", ".join(["%s"] * len(chunk)) + ")"
            )
            with self._writer.query() as cur:
                cur.execute(sql, [task_id(*e.key, e.alternative) for e in chunk])
                rows = cur.fetchall()
            with self._guard:
                for user_id, call_at, alternative, queue in rows:
                    key = CallKey(user_id, aware_utc(call_at))
                    queue = queue or self._config.queue
                    queues[(key, alternative)] = queue
                    old = self._calls[key][alternative]
                    self._calls[key][alternative] = old._replace(queue=queue)
        return queues

    def instants_of(
        self,
        user_ids: Iterable[int],
        start: dt.datetime,
        end: dt.datetime,
        *,
        created: bool = False,
    ) -> dict[int, set[dt.datetime]]:
        """For each user, the instants in [start, end] of calls with an id that is not
        `deleted`: calls that may have run or may still run (`created`: only those whose
        create was confirmed, calls that surely did). Read from the table, beyond the
        loaded window."""
        found: dict[int, set[dt.datetime]] = {}
        surely = " AND created_at IS NOT NULL" if created else ""
        for chunk in chunks(sorted(set(user_ids)), RECORD_BATCH):
            sql = (
                "SELECT user_id, call_at FROM scheduled_calls WHERE user_id IN ("
                + ", ".join(["%s"] * len(chunk))
                + f") AND call_at >= %s AND call_at <= %s AND state != 'deleted'{surely}"
            )
            with self._writer.query() as cur:
                cur.execute(sql, [*chunk, naive_utc(start), naive_utc(end)])
                for user_id, call_at in cur.fetchall():
                    found.setdefault(user_id, set()).add(aware_utc(call_at))
        return found

    def purge(self, before: dt.datetime) -> int:
        """Delete rows of calls before `before`, PURGE_BATCH at a time; the count deleted."""
        sql = "DELETE FROM scheduled_calls WHERE call_at < %s ORDER BY call_at LIMIT %s"
        deleted = 0
        for _ in range(PURGE_MAX_BATCHES):
            with self._writer.query() as cur:
                count = cur.execute(sql, (naive_utc(before), PURGE_BATCH))
            deleted += count
            if count < PURGE_BATCH:
                break
        return deleted


class RunKind(enum.Enum):
    HOURLY = "hourly"  # a full run: lists the queue too
    CHANGES = "changes"  # a quick run (--changes): acts on what changed, from the record


class PastRun(NamedTuple):
    """A complete run of some shard, from job_runs: whose calls it covered, and when."""

    shard: Shard
    window: Window


class RunHistory:
    """job_runs: one row per real run of a shard, noted when it begins and finished when
    it ends.

    It tells a quick run how far ahead hourly runs may have placed calls, a run which
    other shard counts ran lately, and each run which calls no complete run covered
    (see `audit`).
    """

    def __init__(self, writer: Writer, config: Config) -> None:
        self._writer = writer
        self._shard = config.shard
        self._id: int | None = None

    def horizon(self) -> dt.datetime | None:
        """The end of the latest hourly run's window, of any shard count: how far ahead
        calls may have been placed. None before the first one."""
        return self._one("SELECT MAX(window_end) FROM job_runs WHERE kind = 'hourly'", ())

    def other_counts(self, since: dt.datetime) -> list[Shard]:
        """The shards of other shard counts that ran since `since`."""
        sql = (
            "SELECT DISTINCT shard_index, shard_count FROM job_runs"
            " WHERE ran_at >= %s AND shard_count != %s"
        )
        with self._writer.query() as cur:
            cur.execute(sql, (naive_utc(since), self._shard.count))
            return [Shard(index, count) for index, count in cur.fetchall()]

    def audited_until(self) -> dt.datetime | None:
        """Until when this shard's calls were audited; without an audit of this shard
        yet, the latest of any shard (the count changed). None on a new database."""
        own = self._one(
            "SELECT MAX(audited_until) FROM job_runs WHERE shard_index = %s AND shard_count = %s",
            (self._shard.index, self._shard.count),
        )
        return own or self._one("SELECT MAX(audited_until) FROM job_runs", ())

    def complete(self, stretch: Window) -> list[PastRun]:
        """The complete runs, of any shard, whose window overlaps `stretch`."""
        sql = (
            "SELECT shard_index, shard_count, window_start, window_end FROM job_runs"
            " WHERE complete = 1 AND window_end > %s AND window_start < %s"
        )
        with self._writer.query() as cur:
            cur.execute(sql, (naive_utc(stretch.start), naive_utc(stretch.end)))
            return [
                PastRun(Shard(index, count), Window(aware_utc(start), aware_utc(end)))
                for index, count, start, end in cur.fetchall()
            ]

    def begin(self, kind: RunKind, ran_at: dt.datetime, window: Window) -> None:
        """Note the run before it creates anything: a quick run's horizon then never
        falls short of what an hourly run may have placed, even one that cannot finish."""
        sql = f"INSERT INTO job_runs ({RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, 0, NULL)"
        values = (
            naive_utc(ran_at), kind.value, self._shard.index, self._shard.count,
            naive_utc(window.start), naive_utc(window.end),
        )  # fmt: skip
        with self._writer.query() as cur:
            cur.execute(sql, values)
            self._id = cur.lastrowid

    def end(self, complete: bool, audited_until: dt.datetime | None) -> None:
        """Finish the run's row: whether it was complete, and until when it audited."""
        sql = "UPDATE job_runs SET complete = %s, audited_until = %s WHERE id = %s"
        audited = None if audited_until is None else naive_utc(audited_until)
        self._writer.execute(sql, [(int(complete), audited, self._id)])

    def purge(self, before: dt.datetime) -> None:
        with self._writer.query() as cur:
            cur.execute("DELETE FROM job_runs WHERE window_end < %s", (naive_utc(before),))

    def _one(self, sql: str, args: Sequence[Any]) -> dt.datetime | None:
        with self._writer.query() as cur:
            cur.execute(sql, args)
            (value,) = cur.fetchone()
        return None if value is None else aware_utc(value)


# ---------------------------------------------------------------------------
# Task sink: Cloud Tasks
# ---------------------------------------------------------------------------


class Created(enum.Enum):
    """What one CreateTask came to."""

    CREATED = "created"  # the task is on the queue now
    TAKEN = "taken"  # ALREADY_EXISTS: the name belongs to a task that exists, ran or was deleted
    FAILED = "failed"  # logged with the call


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


class _Deadline:
    """An api_core timeout decorator: each attempt waits at most ATTEMPT_SECONDS and none
    outlasts the call's deadline. (api_core's TimeToDeadlineTimeout has no per-attempt
    cap, and below one second left it falls back to the whole timeout.)"""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def attempt(*args: Any, **kwargs: Any) -> Any:
            left = self._end - time.monotonic()
            kwargs["timeout"] = max(0.05, min(ATTEMPT_SECONDS, left))
            return func(*args, **kwargs)

        return attempt


class TaskSink:
    """One queue's tasks: create, look up, list and delete.

    Transient errors are retried within a deadline (ENQUEUE_DEADLINE_SECONDS, or less
    for a delete that must not land once its call may be firing), and no retry starts
    once the run is stopping. Errors every further call would meet (no queue, no
    credentials) raise QueueError.
    """

    def __init__(self, client: Any, config: Config, stop: threading.Event, queue: str) -> None:
        self._client = client
        self._config = config
        self._stop = stop
        self.queue = queue
        self.queue_path = config.path_of(queue)
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
            on_error=self._before_retry,
        )
        self.pages = 0  # ListTasks pages read

    def _before_retry(self, exc: Exception) -> None:
        """Give up retrying once the run is stopping; the next run plans the call again."""
        log.info("transient Cloud Tasks error, retrying: %s", type(exc).__name__)
        if self._stop.is_set():
            raise exc

    @contextlib.contextmanager
    def _fatal_errors(self, task_gone_ok: bool = False) -> Iterator[None]:
        """Turn errors that every further call would meet into QueueError."""
        try:
            yield
        except gexc.NotFound as exc:
            # For GetTask/DeleteTask it means the task is gone: they run only after a
            # create or a listing has shown that the queue exists.
            if task_gone_ok:
                raise
            raise QueueError(
                f"Cloud Tasks queue {self.queue_path} not found: {exc.message}"
            ) from exc
        except gexc.Unauthenticated as exc:
            raise QueueError(f"Cloud Tasks rejected the credentials: {exc.message}") from exc
        except auth_exceptions.GoogleAuthError as exc:
            raise QueueError(f"no usable Google credentials for Cloud Tasks: {exc}") from exc

    def _rpc(
        self, method: str, request: Any, task_gone_ok: bool = False, seconds: float | None = None
    ) -> Any:
        """Call one Cloud Tasks method, retried within `seconds` (default
        ENQUEUE_DEADLINE_SECONDS)."""
        seconds = self._config.enqueue_deadline_seconds if seconds is None else seconds
        with self._fatal_errors(task_gone_ok):
            return getattr(self._client, method)(
                request=request, retry=self._retry.with_timeout(seconds), timeout=_Deadline(seconds)
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

    def create(self, call: Call, task_id: str, seconds: float | None = None) -> Created:
        """CreateTask, retried for at most `seconds` (default ENQUEUE_DEADLINE_SECONDS);
        a failure is logged with the call and returned as FAILED."""
        from google.cloud import tasks_v2

        request = tasks_v2.CreateTaskRequest(
            parent=self.queue_path, task=self.build_task(call, task_id)
        )
        extra = {"user_id": call.user_id, "task_id": task_id}
        try:
            self._rpc("create_task", request, seconds=seconds)
            return Created.CREATED
        except gexc.AlreadyExists:
            return Created.TAKEN
        except gexc.RetryError as exc:
            log.error(
                "could not create task within %ss: %s",
                self._config.enqueue_deadline_seconds,
                exc.cause,
                extra=extra,
            )
        except gexc.GoogleAPICallError as exc:
            log.error("could not create task: %s %s", type(exc).__name__, exc.message, extra=extra)
        return Created.FAILED

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

    def delete(self, task_id: str, seconds: float) -> bool:
        """Delete `task_id`, retried for at most `seconds`; False when it was already gone
        (ran or deleted); errors raise."""
        from google.cloud import tasks_v2

        request = tasks_v2.DeleteTaskRequest(name=self._name(task_id))
        try:
            self._rpc("delete_task", request, True, seconds)
            return True
        except gexc.NotFound:
            return False

    def list_calls(self, window: Window, shard: Shard) -> dict[CallKey, set[int]]:
        """This job's pending tasks of `shard` with calls in `window`: the ids
        (alternatives) of each call.

        ListTasks pages through the whole queue (1,000 a page, the largest allowed:
        the quota is 600 list calls a minute); other ids are never considered, nor are
        other shards' users' tasks (after a reshard their new shard finds them in the
        record). `pages` counts the pages read.
        """
        from google.cloud import tasks_v2

        request = tasks_v2.ListTasksRequest(
            parent=self.queue_path, page_size=1000, response_view=tasks_v2.Task.View.BASIC
        )
        found: dict[CallKey, set[int]] = {}
        with self._fatal_errors():  # later pages are fetched while iterating
            listing = self._rpc("list_tasks", request)
            for page in listing.pages:
                self.pages += 1
                for task in page.tasks:
                    name = parse_task_id(task.name.rsplit("/", 1)[-1])
                    if name is not None and shard.holds(name.user_id) and name.instant in window:
                        found.setdefault(name.key, set()).add(name.alternative)
        return found


class TaskQueues:
    """The run's TaskSinks, one per queue, each made at its first use; one client.

    `own` is this shard's queue; `of(queue)` any other (a reshard left a call there).
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
        self.fatal: QueueError | None = None  # met once: every call meets it

    @property
    def own(self) -> TaskSink:
        return self.of(self._config.queue_name)

    def of(self, queue: str) -> TaskSink:
        with self._lock:
            if self.fatal is not None:
                raise self.fatal
            if queue not in self._sinks:
                try:
                    self._client = self._client or self._make_client()
                except QueueError as exc:
                    self.fatal = exc
                    raise
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
# Placement: every rule of exactly once
# ---------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What became of one wanted call this run."""

    CREATED = "created"  # its task was created now
    EXISTING = "existing"  # its task is on the queue already, or ran
    SKIPPED = "skipped"  # not made: its row was (or may have been) called already that date
    FAILED = "failed"  # logged; the next run tries again
    NOT_ATTEMPTED = "not attempted"  # the run stopped (signal, lost queue or database)


class Placed(NamedTuple):
    outcome: Outcome
    alternative: int | None = None  # the id the call keeps


class Step(enum.Enum):
    """What a wanted call needs, as far as the record and the listing tell (`Placement.look`)."""

    KEEP = "keep"  # rule 3a: an id the listing shows pending
    TRUST = "trust"  # rule 3b: the id recorded planned, its create confirmed
    CREATE = "create"  # rule 3b: the id recorded planned, created (again) on its queue
    REPLACE = "replace"  # rules 3a, 3c: ids being deleted and the call ahead: retire, then new
    RESOLVE = "resolve"  # rule 3c: ids being deleted and the call due: keep one still pending
    SETTLED = "settled"  # rule 3c, decided by an earlier run: it cannot tell, so no call
    NEW = "new"  # rule 3d: the next id, recorded, then created


CREATING = frozenset({Step.CREATE, Step.REPLACE, Step.RESOLVE, Step.NEW})


class Retired(enum.Enum):
    """What one delete of a marked id came to (rule 5)."""

    DELETED = "deleted"  # answered before the call's time: it never ran
    GONE = "gone"  # NOT_FOUND before the call's time: deleted already, or never created
    LATE = "late"  # answered once the call's time had come: it may have run; the mark stays
    LEFT = "left"  # too close to its time to act on: its earlier state back
    FAILED = "failed"  # logged; the mark stays


CONFIRMED = frozenset({Retired.DELETED, Retired.GONE})
# The reason an earlier run recorded when it could not tell whether a call had run.
CANNOT_TELL = "cannot tell whether it ran: not created again"
# The reason of an id being deleted, retired because its call is wanted again ahead.
REPLACED = "replaced: a delete of it was never confirmed"


class Intent(NamedTuple):
    call: Call
    step: Step
    alternative: int
    queue: str
    duplicates: tuple[int, ...] = ()  # the call's other live ids: retired (rule 3)


class UserPlan(NamedTuple):
    """A row as one run read it: what its user wants of the run's window."""

    row: UserRow
    invalid: bool
    calls: list[Call]  # the calls to place now: those in the part of the window being read
    wanted: frozenset[dt.datetime]  # every call the row wants in the whole window
    paused: frozenset[dt.datetime]  # the window's calls a pause leaves out


class Stale(NamedTuple):
    """A task id of this shard and window that the plan does not keep."""

    call: Call  # the call as far as it is known (a removed user's has no phone)
    alternative: int
    reason: str
    queue: str  # where its task is
    listed: bool  # the listing showed it pending
    recorded: Recorded | None  # its row (None: listed, never recorded)

    @property
    def key(self) -> CallKey:
        return self.call.key

    @property
    def task_id(self) -> str:
        return self.call.task_id(self.alternative)

    def plan_line(self, own_queue: str) -> dict[str, Any]:
        line = {"delete": self.task_id, "user_id": self.call.user_id, "reason": self.reason}
        return line if self.queue == own_queue else {**line, "queue": self.queue}

    def extra(self) -> dict[str, Any]:
        return {"user_id": self.call.user_id, "task_id": self.task_id, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Tally:
    """What retiring stale ids came to."""

    deleted: int = 0  # tasks a DeleteTask removed before their time
    failed: int = 0
    skipped: int = 0  # left: due within the firing margin
    late: int = 0  # DeleteTask answered only once the call's time had come: it may have run

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            *(
                a + b
                for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
            )
        )


class Placement:
    """Every rule of "exactly once", in one place: which id a call gets, recording it
    before creating it, confirming the create, and retiring a stale id.

    1. **Record, then create, then confirm.** A call's id is written to
       scheduled_calls (committed) before its task is created, and the create is
       confirmed there afterwards. So every task the job made has a row, and a later
       run tells an id surely created from one only recorded (its run died, or lost
       its lock, before the create landed).
    2. **The firing margin.** A task due within FIRING_MARGIN of the job's clock, or
       past, may be firing: it is never deleted, and a refused name of it means "ran".
    3. **The id of a wanted call** is the first of these that applies; its other live
       ids are retired.
       a. an id the listing shows pending (the one recorded planned, else the lowest):
          nothing is created. Not an id being deleted (a delete of it may still land)
          or one recorded deleted, while the call is still ahead: those are retired,
          and the call gets the next id;
       b. the id recorded planned: with its create confirmed, a quick run trusts it,
          and so does an hourly run for a call already past when it listed the queue;
          otherwise it is created (again) on its recorded queue, where ALREADY_EXISTS
          means it exists or ran. Still ahead and GetTask finds nothing: deleted
          outside the job, so the next id (the old one recorded deleted);
       c. ids only being deleted: still ahead, they are retired and the call gets the
          next id; due or past, one that GetTask finds pending is kept, and without one
          nothing is created ("cannot tell whether this call already ran", recorded so
          that later runs do not ask again);
       d. otherwise the next id after every recorded one: the base id for a call
          without a row.
       A recorded id is created again only while its call is younger than
       MAX_RECREATE_AGE: older, Cloud Tasks may have forgotten a name that ran.
    4. **At most one call per row and local date.** A call is not made, and its ids
       are retired, when its row has another call that local date that may have run
       or may be firing: an id not `deleted`, due within the margin or past. Hourly
       runs look for such calls back as far as a local date reaches; quick runs, for a
       call that would be created, and otherwise within their window (their grace
       sees each call for a quarter of an hour after its time).
    5. **Retiring a stale id** is mark, delete, confirm: marked `deleting`
       (committed), deleted, and marked `deleted` once DeleteTask answered before
       the call's time: it took effect before then, and Cloud Tasks dispatches no
       task before its time, so it surely never ran; a `deleted` id never becomes
       planned again. (The delete is sent only while the call is ahead of the
       margin, with a deadline that ends before it.) An answer after the call's time
       leaves it `deleting` and counts as a failed delete: it may have run, so a call
       being replaced is then decided by 3c as a call due now. An id whose create
       was never confirmed is created first, then deleted: a create still in flight
       from a run that lost its lock then meets ALREADY_EXISTS for an hour (taking
       the name is retried for at most ENQUEUE_DEADLINE_SECONDS). No create or delete
       of a stale id is attempted or retried once its call is within the margin; an
       id marked but left that way gets its earlier state back, and is said to be
       left. A user's stale ids are retired as soon as the run has read the user's
       row, before the user's calls are created: the nearest calls first, since the
       window is read in time order.
    6. **Only while holding the run lock.** Before every batch that creates or
       deletes, the run checks it still holds its shard's lock; after any failed write
       to the record it creates and deletes nothing more.
    7. **A typo never cancels a call.** A user whose row is invalid keeps their ids,
       and an id recorded for them whose create was never confirmed is created. A user
       whose ids the window's rows did not account for is looked up by id in the same
       snapshot before anything of theirs is retired.
    """

    def __init__(
        self,
        record: CallRecord,
        queues: TaskQueues,
        writer: Writer,
        config: Config,
        clock: Clock,
        stop: threading.Event,
        listing: Mapping[CallKey, set[int]] | None,
        *,
        quick: bool = False,
        out: Callable[[str], None] | None = None,
        reconciling: bool = True,
    ) -> None:
        self.record = record
        self.queues = queues
        self.writer = writer
        self.config = config
        self.clock = clock
        self.stop = stop
        self.listing = listing
        self.quick = quick  # a quick run: trusts confirmed creates (rule 3b)
        self.out = out  # a dry run: print what would be done, do nothing
        self.reconciling = reconciling  # retire stale ids (RECONCILE=1)
        self.listed_at = clock()
        self.own_queue = config.queue_name
        self.tally = Tally()  # every id retired this run
        self._retired: set[tuple[CallKey, int]] = set()
        self._confirmed: list[Entry] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.enqueue_concurrency, "retire")
        # Every call of each user this run knows of (record and listing).
        self._by_user: dict[int, set[CallKey]] = {}
        for key in [*record.keys(), *(listing or {})]:
            self._by_user.setdefault(key.user_id, set()).add(key)

    def close(self) -> None:
        self._pool.shutdown()

    # -- the one predicate of the margin -----------------------------------------

    def firing(self, instant: dt.datetime) -> bool:
        """Due within FIRING_MARGIN of the job's clock, or past: it may be firing."""
        return instant <= self.clock() + FIRING_MARGIN

    # -- what the record and the listing tell -------------------------------------

    def _listed(self, key: CallKey) -> set[int]:
        return set(self.listing.get(key, ())) if self.listing is not None else set()

    def _live(self, key: CallKey) -> list[int]:
        """The ids of `key` that may be pending: listed, or recorded and not deleted."""
        ids = self.record.ids(key)
        return sorted({*self._listed(key), *(a for a, r in ids.items() if r.state is not DELETED)})

    def look(self, call: Call) -> Intent:
        """What `call` needs by rule 3, from the record and the listing alone."""
        ids = self.record.ids(call.key)
        listed = self._listed(call.key)
        if not ids and not listed:
            return Intent(call, Step.NEW, 0, self.own_queue)
        live = self._live(call.key)
        following = max([*ids, *listed], default=-1) + 1
        ahead = not self.firing(call.instant)

        def keep(step: Step, alternative: int, queue: str) -> Intent:
            others = tuple(a for a in live if a != alternative)
            return Intent(call, step, alternative, queue, others)

        if listed:
            unsure = {a for a in listed if a in ids and ids[a].state is not PLANNED}
            keepable = sorted(listed - unsure) if ahead else sorted(listed)
            planned = [a for a in keepable if a in ids and ids[a].state is PLANNED]
            if keepable:
                return keep(Step.KEEP, (planned or keepable)[0], self.own_queue)
            return Intent(call, Step.REPLACE, following, self.own_queue)
        planned = sorted(a for a, r in ids.items() if r.state is PLANNED)
        if planned:
            recorded = ids[planned[-1]]
            # A quick run trusts a confirmed create; an hourly one only for a call past
            # when it listed the queue (pending, it would have been listed).
            trusted = self.quick or (self.listing is not None and call.instant <= self.listed_at)
            step = Step.TRUST if recorded.created and trusted else Step.CREATE
            return keep(step, planned[-1], recorded.queue)
        deleting = [r for r in ids.values() if r.state is DELETING]
        if any(r.reason == CANNOT_TELL for r in deleting):
            return Intent(call, Step.SETTLED, following, self.own_queue)
        if deleting:
            step = Step.REPLACE if ahead else Step.RESOLVE
            return Intent(call, step, following, self.own_queue)
        return Intent(call, Step.NEW, following, self.own_queue)

    def called_that_day(self, call: Call, elsewhere: Iterable[dt.datetime] = ()) -> bool:
        """Rule 4: the row has another call on `call`'s local date that may have run or
        may be firing. `elsewhere`: instants of such calls read beyond the window."""
        day = call.local_date()
        nearby = [k.instant for k in self._by_user.get(call.user_id, ()) if self._live(k)]
        return any(
            t != call.instant and self.firing(t) and call.local_date(t) == day
            for t in [*nearby, *elsewhere]
        )

    def _earlier_calls(self, calls: Sequence[Call]) -> dict[int, set[dt.datetime]]:
        """For rule 4: the users' calls that may have run, read from the table as far
        back as a local date reaches."""
        if not calls:
            return {}
        start = min(c.instant for c in calls) - DAY_REACH
        users = {c.user_id for c in calls}
        return self.record.instants_of(users, start, self.clock() + FIRING_MARGIN)

    def _stale(self, call: Call, alternative: int, reason: str) -> Stale:
        recorded = self.record.ids(call.key).get(alternative)
        listed = alternative in self._listed(call.key)
        queue = self.own_queue if listed or recorded is None else recorded.queue
        return Stale(call, alternative, reason, queue, listed, recorded)

    # -- a batch of rows: retire what they no longer want, then place the rest -----

    def settle(self, users: Sequence[UserPlan]) -> tuple[list[Call], int, list[Stale]]:
        """What these users' rows ask of the run: the calls to place (those they want in
        the part being read, and for an invalid row its recorded ids whose create was
        never confirmed, rule 7), how many of those cannot be created (logged), and the
        ids they no longer want (to retire before their calls are created, rule 5)."""
        calls, doomed, failed = [], [], 0
        for user in users:
            keys = sorted(self._by_user.get(user.row.id, ()))
            if user.invalid:
                unfinished, cannot = self._unfinished(user.row, keys)
                calls += unfinished
                failed += cannot
                if any(self._live(key) for key in keys):
                    log.warning(
                        "kept the tasks of an invalid row",
                        extra={"user_id": user.row.id, "task_id": task_id(*keys[0])},
                    )
                continue
            calls += user.calls
            for key in keys:
                if key.instant in user.wanted:
                    continue
                if key.instant in user.paused:
                    reason = "paused"
                elif user.wanted:
                    reason = "call time or weekday changed"
                else:
                    reason = "no call in the window: user inactive, removed or schedule changed"
                call = self._known(key, user.row)
                doomed += [self._stale(call, a, reason) for a in self._live(key)]
        return calls, failed, doomed if self.reconciling else []

    def _known(self, key: CallKey, row: UserRow | None = None) -> Call:
        """The call of `key` as far as the run knows it: the row's phone if it parses
        (a task created only to take its name carries it)."""
        phone = ""
        if row is not None:
            with contextlib.suppress(InvalidRow):
                phone = normalize_phone(row.phone_number, self.config.phone_region)
        return Call(key.user_id, phone, key.instant, self.config.default_timezone)

    def _unfinished(self, row: UserRow, keys: Sequence[CallKey]) -> tuple[list[Call], int]:
        """Rule 7: an invalid row's recorded ids whose create was never confirmed (nor
        listed), as calls to create; and how many lack a usable phone number (logged)."""
        calls, cannot = [], 0
        for key in keys:
            ids = self.record.ids(key)
            if self._listed(key) or not any(
                r.state is PLANNED and not r.created for r in ids.values()
            ):
                continue
            call = self._known(key, row)
            if call.phone_number:
                calls.append(call)
                continue
            cannot += 1
            log.error(
                "the recorded call of an invalid row cannot be created: its phone number"
                " does not parse; call the person by hand if in doubt",
                extra={"user_id": key.user_id, "task_id": call.task_id()},
            )
        return calls, cannot

    def unread(self, part: Window, read: AbstractSet[int]) -> set[int]:
        """Users with a live id in `part` whose rows this run has not read."""
        return {
            key.user_id
            for keys in self._by_user.values()
            for key in keys
            if key.instant in part and key.user_id not in read and self._live(key)
        }

    def gone(self, user_ids: Iterable[int]) -> None:
        """Retire every live id of users without an active row."""
        reason = "no call in the window: user inactive, removed or schedule changed"
        self.retire(
            [
                self._stale(self._known(key), alternative, reason)
                for user_id in user_ids
                for key in sorted(self._by_user.get(user_id, ()))
                for alternative in self._live(key)
            ]
        )

    def decide(self, calls: Sequence[Call]) -> tuple[list[Intent | Placed], list[Stale]]:
        """Rules 3 and 4 for one batch, with no effect: each call's intent (or Placed
        already, when rule 4 or an earlier run's "cannot tell" turns it away), and the
        ids to retire: the calls' duplicates and what rule 4 turns away."""
        intents = [self.look(call) for call in calls]
        examines = [
            i.step in CREATING or (not self.quick and not self.firing(i.call.instant))
            for i in intents
        ]
        elsewhere = self._earlier_calls(
            [i.call for i, e in zip(intents, examines, strict=True) if e]
        )
        decided: list[Intent | Placed] = []
        doomed: list[Stale] = []
        for intent, examined in zip(intents, examines, strict=True):
            call = intent.call
            if intent.step is Step.SETTLED:
                decided.append(Placed(Outcome.SKIPPED))
                continue
            if examined and self.called_that_day(call, elsewhere.get(call.user_id, ())):
                decided.append(Placed(Outcome.SKIPPED))
                reason = "the row was already called that day"
                doomed += [self._stale(call, a, reason) for a in self._live(call.key)]
                continue
            if intent.duplicates:
                keep = f"duplicate of {call.task_id(intent.alternative)}"
                doomed += [self._stale(call, a, keep) for a in intent.duplicates]
            decided.append(intent)
        return decided, doomed

    def prepare(self, calls: Sequence[Call]) -> list[Intent | Placed]:
        """Rules 3, 4 and 6 for one batch: check the lock, decide, retire what the
        decision turns away, record the new ids and the kept listed ones, and confirm
        the creates of earlier batches (one commit each). What needs no Cloud Tasks call
        comes back as Placed already."""
        self.writer.assert_locked()
        decided, doomed = self.decide(calls)
        writes, new = self._take_confirmed(), []
        for i, intent in enumerate(decided):
            if isinstance(intent, Placed):
                continue
            call, alternative = intent.call, intent.alternative
            if intent.step is Step.KEEP:
                writes.append(Entry(call.key, alternative, PLANNED, created=True))
                decided[i] = Placed(Outcome.EXISTING, alternative)
            elif intent.step is Step.TRUST:
                decided[i] = Placed(Outcome.EXISTING, alternative)
            elif intent.step is Step.NEW:
                new.append(Entry(call.key, alternative, PLANNED))
        self.record.write(writes)
        if self.reconciling:
            self.retire(doomed)
        queues = self.record.claim(new)
        return [
            d._replace(queue=queues[(d.call.key, d.alternative)])
            if isinstance(d, Intent) and d.step is Step.NEW
            else d
            for d in decided
        ]

    def preview(self, calls: Sequence[Call]) -> None:
        """A dry run's `prepare`: print the id each call would get, and retire (print)
        what the run would, every RPC left out."""
        assert self.out is not None
        decided, doomed = self.decide(calls)
        for intent in decided:
            if isinstance(intent, Placed):
                continue
            call = intent.call
            if intent.step is Step.REPLACE:  # what `_replace` retires first
                doomed += [self._stale(call, a, REPLACED) for a in self._live(call.key)]
            line = {"task_id": call.task_id(intent.alternative), "user_id": call.user_id}
            self.out(json.dumps({**line, "scheduled_at": call.scheduled_at}))
        if self.reconciling:
            self.retire(doomed)

    def flush(self) -> None:
        """Confirm the creates not yet confirmed (one commit)."""
        self.record.write(self._take_confirmed())

    def _take_confirmed(self) -> list[Entry]:
        with self._lock:
            taken, self._confirmed = self._confirmed, []
        return taken

    def _confirm(self, key: CallKey, alternative: int) -> None:
        with self._lock:
            self._confirmed.append(Entry(key, alternative, PLANNED, created=True))

    # -- placing -----------------------------------------------------------------

    def place(self, intent: Intent) -> Placed:
        """Carry out `intent` (from `prepare`) with the Cloud Tasks calls it needs."""
        call, alternative, queue = intent.call, intent.alternative, intent.queue
        extra = {"user_id": call.user_id, "task_id": call.task_id(alternative)}
        try:
            if intent.step is Step.RESOLVE:
                return self._resolve(call)
            if intent.step is Step.REPLACE:
                retired = self._replace(call)
                if retired.late:  # its time came meanwhile, and it may have run: rule 3c
                    return self._resolve(call)
                if retired.failed or retired.skipped:
                    return Placed(Outcome.FAILED)
                if self.called_that_day(call, self._earlier_calls([call]).get(call.user_id, ())):
                    return Placed(Outcome.SKIPPED)
                new = Entry(call.key, alternative, PLANNED)
                queue = self.record.claim([new])[(call.key, alternative)]
            elif intent.step is Step.CREATE and call.instant < self.clock() - MAX_RECREATE_AGE:
                log.error(
                    "call too old to tell whether its task ran; not created again", extra=extra
                )
                return Placed(Outcome.FAILED, alternative)
            return self._create(call, alternative, queue)
        except QueueError as exc:
            if queue == self.own_queue:
                raise
            # Only this call's recorded queue is gone (a leftover queue deleted too early):
            # it may have run there, so nothing is created elsewhere.
            log.error("the queue this call was recorded on is unusable: %s", exc, extra=extra)
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            log.error("could not look a task up: %s", exc, extra=extra)
        except DatabaseError as exc:
            log.error("could not record a task id, so created no task: %s", exc, extra=extra)
        return Placed(Outcome.FAILED, alternative)

    def _create(self, call: Call, alternative: int, queue: str) -> Placed:
        """Create the recorded id; rule 3b when its name is taken."""
        while True:
            if self.stop.is_set() or self.writer.failed:
                return Placed(Outcome.NOT_ATTEMPTED)
            sink = self.queues.of(queue)
            created = sink.create(call, call.task_id(alternative))
            if created is Created.FAILED:
                return Placed(Outcome.FAILED, alternative)
            if created is Created.CREATED or self.firing(call.instant):
                self._confirm(call.key, alternative)
                outcome = Outcome.CREATED if created is Created.CREATED else Outcome.EXISTING
                return Placed(outcome, alternative)
            # Taken, and still ahead: pending, or deleted outside the job.
            if sink.exists_or_unknown(call.task_id(alternative)) or self.firing(call.instant):
                self._confirm(call.key, alternative)
                return Placed(Outcome.EXISTING, alternative)
            extra = {"user_id": call.user_id, "task_id": call.task_id(alternative)}
            if alternative >= MAX_ALTERNATIVE:
                log.error("every task id of this call was deleted outside the job", extra=extra)
                return Placed(Outcome.FAILED, alternative)
            log.warning(
                "task deleted outside the job before its time; creating it again under the next id",
                extra={**extra, "next": call.task_id(alternative + 1)},
            )
            self.writer.assert_locked()
            queues = self.record.claim(
                [
                    Entry(call.key, alternative, DELETED, "deleted outside the job"),
                    Entry(call.key, alternative + 1, PLANNED),
                ]
            )
            alternative += 1
            queue = queues[(call.key, alternative)]

    def _resolve(self, call: Call) -> Placed:
        """Rule 3c, the call due or past: keep an id still pending, else fail loudly,
        once."""
        ids = self.record.ids(call.key)
        deleting = sorted((a for a, r in ids.items() if r.state is DELETING), reverse=True)
        for alternative in deleting:
            if self.queues.of(ids[alternative].queue).exists(call.task_id(alternative)):
                self.record.write([Entry(call.key, alternative, PLANNED, created=True)])
                return Placed(Outcome.EXISTING, alternative)
        log.error(
            "cannot tell whether this call already ran: its task was being deleted"
            " and is gone; not created again, so that it is not made twice",
            extra={"user_id": call.user_id, "task_id": call.task_id()},
        )
        self.record.write([Entry(call.key, a, DELETING, CANNOT_TELL) for a in deleting])
        return Placed(Outcome.FAILED)

    def _replace(self, call: Call) -> Tally:
        """Rules 3a and 3c, the call ahead: retire every id of it that may be pending."""
        return self.retire([self._stale(call, a, REPLACED) for a in self._live(call.key)])

    # -- retiring ----------------------------------------------------------------

    def leave(self, items: Iterable[Stale]) -> tuple[list[Stale], int]:
        """Rule 2 for stale ids: those still ahead, and how many are left because they
        may be firing (each logged). An id not pending that is surely past (it ran, or
        was never created) is neither."""
        ahead, left = [], 0
        for item in items:
            if not self.firing(item.key.instant):
                ahead.append(item)
            elif item.listed or (
                # Not listed, and no listing shows whether it is pending (a quick run,
                # or a call recorded on another queue, after a change of TASK_COUNT).
                (self.listing is None or item.queue != self.own_queue)
                and item.key.instant > self.clock() - FIRING_MARGIN
            ):
                log.warning(
                    "stale task left on the queue: it is due within %ds and may be firing",
                    FIRING_MARGIN.total_seconds(),
                    extra=item.extra(),
                )
                left += 1
        return ahead, left

    def retire(self, items: Sequence[Stale]) -> Tally:
        """Rule 5 for `items`, RECORD_BATCH at a time (rule 6 before each batch); a dry
        run prints them instead. An id is retired once a run. Adds to `tally` and
        returns this call's part."""
        with self._lock:
            items = [i for i in items if (i.key, i.alternative) not in self._retired]
            self._retired.update((i.key, i.alternative) for i in items)
        items, skipped = self.leave(items)
        tally = Tally(skipped=skipped)
        if self.out is not None:
            for item in items:
                self.out(json.dumps(item.plan_line(self.own_queue), ensure_ascii=False))
        else:
            for chunk in chunks(items, RECORD_BATCH):
                if self.stop.is_set() or self.writer.failed:
                    tally += Tally(failed=len(chunk))
                else:
                    tally += self._retire_batch(chunk)
        with self._lock:
            self.tally += tally
        return tally

    def _retire_batch(self, chunk: list[Stale]) -> Tally:
        try:
            self.writer.assert_locked()
            self.record.write(
                [Entry(i.key, i.alternative, DELETING, i.reason, i.queue) for i in chunk]
            )
        except DatabaseError as exc:
            log.critical("could not record the stale tasks, so deleted none: %s", exc)
            return Tally(failed=len(chunk))
        results = list(zip(chunk, self._pool.map(self._retire_one, chunk), strict=True))
        counts = collections.Counter(result for _item, result in results)
        tally = Tally(
            deleted=counts[Retired.DELETED],
            failed=counts[Retired.FAILED],
            skipped=counts[Retired.LEFT],
            late=counts[Retired.LATE],
        )
        confirmed = [
            Entry(item.key, item.alternative, DELETED, item.reason)
            for item, result in results
            if result in CONFIRMED
        ]
        try:
            self.record.write(confirmed)
        except DatabaseError as exc:  # they stay "deleting": safe, only less certain
            log.critical("could not confirm deleted tasks: %s", exc)
            return dataclasses.replace(tally, deleted=0, failed=tally.failed + len(confirmed))
        return tally

    def _retire_one(self, item: Stale) -> Retired:
        """Delete one marked id."""
        extra = (
            item.extra() if item.queue == self.own_queue else {**item.extra(), "queue": item.queue}
        )
        try:
            if self.stop.is_set() or self.writer.failed:
                return Retired.FAILED
            sink = self.queues.of(item.queue)
            if not (item.listed or (item.recorded and item.recorded.created)):
                # A create of it may still be in flight: take the name first, within half
                # the time left, so that the delete is still sent before the margin.
                if self._left(item) <= 2 * ATTEMPT_SECONDS:
                    return self._left_alone(item)
                seconds = min(self._left(item) / 2, self.config.enqueue_deadline_seconds)
                if sink.create(item.call, item.task_id, seconds) is Created.FAILED:
                    return Retired.FAILED
                if self._left(item) <= 0:  # its answer came after its deadline (assumed never)
                    log.error(
                        "took a stale task's name but no time was left to delete it", extra=extra
                    )
                    return Retired.FAILED
            left = self._left(item)
            if left <= 0:
                return self._left_alone(item)
            gone = sink.delete(item.task_id, min(left, self.config.enqueue_deadline_seconds))
        except (gexc.GoogleAPICallError, gexc.RetryError, QueueError, DatabaseError) as exc:
            log.error("could not delete a stale task: %s", exc, extra=extra)
            return Retired.FAILED
        # Answered before the call's time, it took effect before then: the task never
        # ran, since Cloud Tasks dispatches none before its time (rule 5).
        if self.clock() >= item.key.instant:
            log.error(
                "a stale task's delete answered only after its time: it may have run", extra=extra
            )
            return Retired.LATE
        if gone:
            log.info("deleted a stale task", extra=extra)
            return Retired.DELETED
        return Retired.GONE

    def _left(self, item: Stale) -> float:
        """Seconds until `item`'s call is within the margin."""
        return (item.key.instant - FIRING_MARGIN - self.clock()).total_seconds()

    def _left_alone(self, item: Stale) -> Retired:
        """A marked id too close to its time to act on: its earlier state back, logged."""
        log.warning(
            "stale task left on the queue: it is due within %ds and may be firing",
            FIRING_MARGIN.total_seconds(),
            extra=item.extra(),
        )
        if item.recorded is not None:
            recorded = item.recorded
            self.record.write([Entry(item.key, item.alternative, recorded.state, recorded.reason)])
        return Retired.LEFT


# ---------------------------------------------------------------------------
# Run and check
# ---------------------------------------------------------------------------

# The one line of a dry run that plans without the queue (a laptop's local run).
QUEUE_NOT_READ = (
    "queue not read (%s): the plan cannot tell which calls are queued already,"
    " and stale tasks are not looked for"
)


@dataclasses.dataclass
class RunSummary:
    """Counters of one run; the last stdout line is this object as JSON. They change
    only through its methods."""

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
    peak_minute: dict[str, Any] | None = None  # always null: `--check` reports it
    changes: bool = False  # a quick run (--changes)
    calls_skipped: int = 0  # not made: the row was called already that local date
    calls_missed: int = 0  # named by the audit: no complete run covered them

    @property
    def exit_code(self) -> int:
        """0 when every planned call is on the queue or ran (or a dry run planned cleanly).

        1 when anything was left undone: a failed or unattempted task, a stale task that
        could not be deleted, a database or queue error, or a stop by signal. Invalid
        rows are reported, not failed on; so are a stale task left because it was due
        within FIRING_MARGIN (`deletes_skipped`), a call not repeated on one local date
        (`calls_skipped`) and the missed calls the audit names (`calls_missed`: past
        runs missed them, this one did not). A missing table or grant never gets here:
        `main` exits 2 before anything is done.
        """
        undone = self.tasks_failed or self.tasks_not_attempted or self.deletes_failed
        return 1 if (undone or self.error or self.interrupted) else 0

    def begin(self, window: Window) -> None:
        self.window_start, self.window_end = window.start.isoformat(), window.end.isoformat()

    def scanned(self) -> None:
        self.users_scanned += 1

    def invalid(self, row: UserRow, reason: InvalidRow) -> None:
        """Count an invalid row, with its one log line: ERROR, so that alerting counts it."""
        self.rows_invalid += 1
        log.error(
            "invalid row skipped: %s",
            reason,
            extra={
                "user_id": row.id,
                "column": reason.column,
                "phone": mask_phone(row.phone_number),
            },
        )

    def planned(self) -> None:
        self.calls_planned += 1

    def placed(self, outcome: Outcome) -> None:
        if outcome is Outcome.CREATED:
            self.tasks_created += 1
        elif outcome is Outcome.EXISTING:
            self.tasks_existing += 1
        elif outcome is Outcome.SKIPPED:
            self.calls_skipped += 1
        elif outcome is Outcome.NOT_ATTEMPTED:
            self.tasks_not_attempted += 1
        else:
            self.tasks_failed += 1

    def retired(self, tally: Tally) -> None:
        self.tasks_deleted += tally.deleted
        self.deletes_failed += tally.failed + tally.late
        self.deletes_skipped += tally.skipped

    def purged(self, rows: int) -> None:
        self.records_purged += rows

    def missed(self, call: Call, recorded: int | None) -> None:
        """Name a call no complete run covered: ERROR, one line, so that alerting counts
        it. `recorded`: the id recorded for it whose create was never confirmed (it may
        have been placed after all; its task id is in the line)."""
        self.calls_missed += 1
        extra = {
            "user_id": call.user_id,
            "scheduled_at": call.scheduled_at,
            "phone": mask_phone(call.phone_number),
        }
        if recorded is not None:
            extra["unconfirmed_task_id"] = call.task_id(recorded)
        log.error("call missed: no complete run covered it", extra=extra)

    def fail(self, message: str) -> None:
        """Record a run-level failure (the first one wins); log each distinct one once."""
        if message != self.error:
            log.critical("%s", message)
        self.error = self.error or message


class Planner:
    """Validates rows as they stream in and plans each: the calls it wants in the run's
    window, and those to place now, in the part of it being read. Counts scanned,
    invalid and planned; a row read again (its calls fall in another part too, or it
    was looked up) is counted and reported once.

    Nothing is held but the ids of the rows read: memory stays flat however large the
    table. A stop signal ends the stream. So does a lost database, recorded in the
    summary and in `failed`; what was planned before it is still placed, and the next
    run completes the rest.
    """

    def __init__(
        self, config: Config, window: Window, summary: RunSummary, stop: threading.Event
    ) -> None:
        self.config, self.window, self.summary, self.stop = config, window, summary, stop
        self.read: set[int] = set()
        self.failed = False

    def plan(self, rows: Iterable[UserRow], part: Window) -> Iterator[UserPlan]:
        config, summary = self.config, self.summary
        try:
            for row in rows:
                if self.stop.is_set():
                    return
                again = row.id in self.read
                self.read.add(row.id)
                if not again:
                    summary.scanned()
                try:
                    setting = parse_row(row, config.default_timezone, config.phone_region)
                except InvalidRow as reason:
                    if not again:
                        summary.invalid(row, reason)
                        yield UserPlan(row, True, [], frozenset(), frozenset())
                    continue
                if setting is None:
                    yield UserPlan(row, False, [], frozenset(), frozenset())
                    continue
                left_out: list[dt.datetime] = []
                wanted = occurrences(setting, self.window, left_out)
                calls = [
                    Call(setting.user_id, setting.phone_number, t, setting.zone)
                    for t in wanted
                    if t in part
                ]
                for _ in calls:
                    summary.planned()
                yield UserPlan(row, False, calls, frozenset(wanted), frozenset(left_out))
        except DatabaseError as exc:
            self.failed = True
            summary.fail(str(exc))


@dataclasses.dataclass
class Placements:
    """What became of the wanted calls: counted in the summary as they end."""

    summary: RunSummary
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, placed: Placed) -> None:
        with self.lock:
            self.summary.placed(placed.outcome)


def enqueue(
    placement: Placement,
    users: Iterable[UserPlan],
    config: Config,
    summary: RunSummary,
    stop: threading.Event,
    pool: ThreadPoolExecutor,
) -> None:
    """Settle the users RECORD_BATCH at a time: each batch's stale ids retired, its
    calls prepared (the lock checked, new ids recorded in one commit), then their Cloud
    Tasks calls made at most ENQUEUE_CONCURRENCY at a time, rate-capped. After a fatal
    queue or database error, or a stop, the rest are counted, not tried."""
    slots = threading.BoundedSemaphore(config.enqueue_concurrency)
    limiter = RateLimiter(config.enqueue_max_per_second)
    placements = Placements(summary)
    fatal: list[JobError] = []

    def done(future: Any) -> None:
        slots.release()
        exc = future.exception()
        if isinstance(exc, QueueError):
            fatal.append(exc)
            summary.fail(str(exc))
            placements.add(Placed(Outcome.NOT_ATTEMPTED))
        elif exc is not None:
            log.error("unexpected error placing a call: %r", exc)
            placements.add(Placed(Outcome.FAILED))
        else:
            placements.add(future.result())

    def wait_for_slot() -> bool:
        while not slots.acquire(timeout=0.2):
            if stop.is_set():
                return False
        return True

    for batch in chunks(users, RECORD_BATCH):
        if placement.out is not None:
            calls, _, doomed = placement.settle(batch)
            placement.preview(calls)
            placement.retire(doomed)
            continue
        calls, failed = [], 0
        decided: Sequence[Intent | Placed] = []
        if not (fatal or stop.is_set()):
            try:
                calls, failed, doomed = placement.settle(batch)
                placement.retire(doomed)
                decided = placement.prepare(calls)
            except DatabaseError as exc:
                fatal.append(exc)
                summary.fail(str(exc))
        calls = calls or [c for user in batch for c in user.calls]
        for _ in range(failed):
            placements.add(Placed(Outcome.FAILED))
        for i in range(len(calls)):
            outcome = decided[i] if decided else Placed(Outcome.NOT_ATTEMPTED)
            if isinstance(outcome, Intent) and (fatal or not wait_for_slot()):
                outcome = Placed(Outcome.NOT_ATTEMPTED)
            if isinstance(outcome, Placed):
                placements.add(outcome)
                continue
            limiter.wait()
            pool.submit(placement.place, outcome).add_done_callback(done)


def open_database(config: Config, stack: contextlib.ExitStack) -> Writer:
    """Connect the writer and check the job's tables and grants (SetupError before
    anything is done); closed with `stack`."""
    conn = connect(config, streaming=False)
    stack.callback(close, conn)
    writer = Writer(conn, config)
    writer.check()
    return writer


def run_window(config: Config, now: dt.datetime, horizon: dt.datetime | None) -> Window:
    """The calls a run plans: from GRACE_MINUTES back to LOOKAHEAD_MINUTES ahead. A quick
    run stops at `horizon`, the end of the latest hourly run's window: it acts on what
    changed, and leaves the calls further ahead to the hourly run."""
    window = Window.around(now, config.grace, config.lookahead)
    if horizon is None:
        return window
    return Window(window.start, max(window.start, min(window.end, horizon)))


def slices(window: Window, size: dt.timedelta = SLICE) -> Iterator[Window]:
    """`window` in consecutive parts of `size`, in time order."""
    start = window.start
    while start < window.end:
        yield Window(start, min(start + size, window.end))
        start += size


def run(
    config: Config,
    now: dt.datetime,
    *,
    dry_run: bool,
    changes: bool,
    tasks_client: Any,
    stop: threading.Event,
    out: Callable[[str], None],
    clock: Clock | None = None,
) -> RunSummary:
    """One whole run: check the tables, take the shard's run lock, note the run, load
    the record, list the queue (hourly runs), then read the window in time order and
    for each batch of rows retire what they no longer want and place (or print) what
    they want (RECONCILE), name the calls no complete run covered, purge old records,
    and finish the run's note.

    Raises SetupError, before any task is touched, when a table or grant is missing.
    """
    started = time.monotonic()
    clock = clock or (lambda: now + dt.timedelta(seconds=time.monotonic() - started))
    summary = RunSummary(dry_run=dry_run, changes=changes, shard=str(config.shard))
    summary.begin(Window.around(now, config.grace, config.lookahead))
    log.info(
        "run started",
        extra={
            "now": now.isoformat(),
            "shard": summary.shard,
            "dry_run": dry_run,
            "changes": changes,
        },
    )
    with contextlib.ExitStack() as stack:
        try:
            writer = open_database(config, stack)
            history = RunHistory(writer, config)
            if not dry_run:
                waited = take_turns(writer, history, config, now, changes, summary)
                if waited is None:
                    return summary
                if waited > 1:
                    now = clock()  # plan for when the run really begins
                done = threading.Event()
                stack.callback(done.set)
                writer.keep_alive(done)
            window = run_window(config, now, history.horizon() if changes else None)
            summary.begin(window)
            if not dry_run:
                history.begin(RunKind.CHANGES if changes else RunKind.HOURLY, now, window)
            record = CallRecord(writer, config, clock)
            record.load(window)
            reader = connect(config, streaming=True)
            stack.callback(close, reader)
        except DatabaseError as exc:
            summary.fail(str(exc))
            return summary

        queues = TaskQueues(lambda: tasks_client or make_tasks_client(config), config, stop)
        listing = None if changes else list_queue(queues, config, window, dry_run, summary)
        placement = Placement(
            record, queues, writer, config, clock, stop, listing,
            quick=changes, out=out if dry_run else None,
            # A dry run shows deletions only where it read the queue, as a real run would.
            reconciling=config.reconcile and (listing is not None or changes or not dry_run),
        )  # fmt: skip
        stack.callback(placement.close)
        audited = None
        try:
            with Snapshot(reader, config) as snapshot:
                planner = Planner(config, window, summary, stop)
                place_window(placement, snapshot, planner, config)
                summary.retired(placement.tally)
                if not dry_run and writer.failed is None:
                    audited = audit(history, writer, snapshot, config, clock, now, summary)
        except DatabaseError as exc:
            summary.fail(str(exc))
        if not dry_run and writer.failed is None:
            finish(config, record, history, now, audited, summary, stop)
        log.info(
            "time in the job's tables: %.1fs",
            writer.seconds,
            extra={"record_seconds": round(writer.seconds, 3), "queue": config.queue_name},
        )
    return summary


def take_turns(
    writer: Writer,
    history: RunHistory,
    config: Config,
    now: dt.datetime,
    changes: bool,
    summary: RunSummary,
) -> float | None:
    """Take this shard's run lock, waiting RUN_LOCK_WAIT_SECONDS (a quick run at most
    QUICK_LOCK_WAIT_SECONDS), and make sure no run of another shard count is running
    (a change of TASK_COUNT): the seconds it waited. None when the run must do
    nothing: a quick run skips (INFO, exit 0), an hourly one fails (exit 1) and Cloud
    Run retries it."""
    wait = config.run_lock_wait_seconds
    if changes:
        wait = min(wait, QUICK_LOCK_WAIT_SECONDS)
    waiting = time.monotonic()
    if not writer.lock(wait):
        busy = f"another run of shard {summary.shard} still held the run lock after {wait}s"
    elif writer.held_elsewhere(history.other_counts(now - OTHER_COUNTS_REACH)):
        busy = "a run of another shard count (TASK_COUNT) is still running"
    else:
        if (waited := time.monotonic() - waiting) > 1:
            log.info("waited %.0fs for another run of this shard", waited)
        return waited
    if changes:
        log.info("quick run skipped: %s; the next quick run catches up", busy)
    else:
        summary.fail(f"{busy}; this run did nothing")
    return None


def place_window(
    placement: Placement, snapshot: Snapshot, planner: Planner, config: Config
) -> None:
    """Read the window part by part in time order (the nearest calls first): each part's
    rows settled and placed, then the users with ids in that part whose rows no query
    returned looked up by id (rule 7) and settled, or, without an active row, their ids
    retired."""
    summary, stop = planner.summary, planner.stop
    with ThreadPoolExecutor(config.enqueue_concurrency, thread_name_prefix="place") as pool:
        for part in slices(planner.window):
            rows = planner.plan(snapshot.rows(part), part)
            enqueue(placement, rows, config, summary, stop, pool)
            if planner.failed or stop.is_set() or placement.writer.failed:
                break
            if placement.reconciling and (unread := placement.unread(part, planner.read)):
                found = snapshot.active(unread)
                enqueue(placement, planner.plan(found.values(), part), config, summary, stop, pool)
                placement.gone(unread - set(found))
    if placement.out is None:
        try:
            placement.flush()
        except DatabaseError as exc:  # the creates stay unconfirmed: the next run confirms them
            summary.fail(str(exc))


def list_queue(
    queues: TaskQueues, config: Config, window: Window, dry_run: bool, summary: RunSummary
) -> dict[CallKey, set[int]] | None:
    """List this shard's pending calls on its queue (read-only: a dry run does this too).
    None without a listing: RECONCILE=0, no project, or an error (recorded in `summary`,
    except a dry run's missing credentials, which it only warns about)."""
    if not config.reconcile:
        return None
    if not config.project:
        if dry_run:
            log.warning(QUEUE_NOT_READ, "GOOGLE_CLOUD_PROJECT is not set")
        return None
    try:
        own = queues.own
        listing = own.list_calls(window, config.shard)
    except QueueError as exc:
        queues.fatal = exc
        if dry_run and isinstance(exc, NoCredentialsError):
            log.warning(QUEUE_NOT_READ, "no Google credentials")
        else:
            summary.fail(str(exc))
        return None
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        summary.fail(f"cannot list the queue, so stale tasks stay this run: {exc}")
        return None
    log.info(
        "listed the queue", extra={"queue": own.queue, "pages": own.pages, "tasks": len(listing)}
    )
    return listing


def audit(
    history: RunHistory,
    writer: Writer,
    snapshot: Snapshot,
    config: Config,
    clock: Clock,
    now: dt.datetime,
    summary: RunSummary,
) -> dt.datetime | None:
    """Name the calls no complete run covered: in the stretch that has left every
    window (before `now` - GRACE_MINUTES) since the last audit, at most MAX_AUDIT back.

    A call is named when the table wants it now, no complete run of any shard covered
    it, it has no id that is not `deleted` (no run placed it), and its row had no other
    such call that local date. Returns until when this shard is audited (None: not
    audited). The first run on a new database audits nothing.
    """
    until = now.astimezone(UTC) - config.grace
    try:
        since = history.audited_until()
        if since is None:
            return until
        stretch = Window(max(since, until - MAX_AUDIT), until)
        if stretch.empty:
            return None
        past = history.complete(stretch)
        own = [p.window for p in past if p.shard == config.shard]
        for gap in uncovered(stretch, own):
            for hour in slices(gap, dt.timedelta(hours=1)):
                for call, recorded in _unplaced(writer, snapshot, config, clock, hour, past):
                    summary.missed(call, recorded)
    except DatabaseError as exc:
        log.warning("could not audit for missed calls: %s", exc)
        return None
    return until


def _unplaced(
    writer: Writer,
    snapshot: Snapshot,
    config: Config,
    clock: Clock,
    window: Window,
    past: Sequence[PastRun],
) -> list[tuple[Call, int | None]]:
    """The calls of `window` the table wants that no complete run covered and no run
    surely placed (no id with a confirmed create), leaving out those whose row surely
    had another call that local date (a confirmed create). With each, the id recorded
    for it, if any (its create may have landed unconfirmed)."""
    record = CallRecord(writer, config, clock)
    record.load(window)
    candidates = []
    for row in snapshot.rows(window):
        try:
            setting = parse_row(row, config.default_timezone, config.phone_region)
        except InvalidRow:
            continue  # reported by the runs whose window it falls in
        for call in plan_calls(setting, window) if setting else []:
            if any(p.shard.holds(call.user_id) and call.instant in p.window for p in past):
                continue
            ids = {a: r for a, r in record.ids(call.key).items() if r.state is not DELETED}
            if not any(r.created for r in ids.values()):
                candidates.append((call, max(ids, default=None)))
    if not candidates:
        return []
    others = record.instants_of(
        {c.user_id for c, _ in candidates},
        window.start - DAY_REACH,
        window.end + DAY_REACH,
        created=True,
    )
    return [
        (c, recorded)
        for c, recorded in candidates
        if not any(
            t != c.instant and c.local_date(t) == c.local_date() for t in others.get(c.user_id, ())
        )
    ]


def finish(
    config: Config,
    record: CallRecord,
    history: RunHistory,
    now: dt.datetime,
    audited: dt.datetime | None,
    summary: RunSummary,
    stop: threading.Event,
) -> None:
    """Purge old rows (shard 0) and finish the run's note in job_runs: whether it was
    complete, and until when it audited."""
    if config.task_index == 0 and not stop.is_set():
        try:
            summary.purged(record.purge(now - config.retention))
            history.purge(now - dt.timedelta(days=RUN_HISTORY_DAYS))
        except DatabaseError as exc:
            log.warning("could not purge old rows of the job's tables: %s", exc)
    try:
        # A stop part-way leaves the rest of the window unread: not complete.
        history.end(summary.exit_code == 0 and not stop.is_set(), audited)
    except DatabaseError as exc:
        summary.fail(f"could not note the run in job_runs: {exc}")


# -- check: the connection, the schema, the grants and every row, before go-live ----------

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

    def invalid(self, row: UserRow, reason: InvalidRow) -> dict[str, Any]:
        """Count an invalid row; its line for stdout."""
        self.rows_invalid += 1
        for counts, key in (
            (self.invalid_by_column, reason.column),
            (self.invalid_by_reason, reason_kind(str(reason))),
        ):
            counts[key] = counts.get(key, 0) + 1
        return {
            "user_id": row.id,
            "column": reason.column,
            "reason": str(reason),
            "phone": mask_phone(row.phone_number),
        }


def reason_kind(reason: str) -> str:
    """A reason without the row's own values, to count alike reasons together:
    "call_weekdays '月x': unknown word 'x'" -> "call_weekdays …: unknown word …"."""
    return re.sub(r"'[^']*'|\*\*\*\S*|-?[0-9][0-9:.-]*", "…", reason)


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


def check(config: Config, out: Callable[[str], None], now: dt.datetime) -> CheckSummary:
    """Validate the schema, the grants and every active row of this shard, streamed,
    and find the peak minute of the next 24 hours from `now` among the calls that
    would be made (valid rows, paused dates left out).

    Writes nothing and contacts no Cloud Tasks endpoint. Prints one JSON line per
    invalid row. Raises SetupError for a missing table, column or grant.
    """
    day = Window.around(now, dt.timedelta(), dt.timedelta(days=1))
    per_minute: dict[dt.datetime, int] = {}
    summary = CheckSummary(shard=str(config.shard))
    with contextlib.ExitStack() as stack:
        try:
            writer = open_database(config, stack)
            with writer.query() as cur:
                cur.execute("SHOW INDEX FROM users WHERE Key_name = 'idx_users_due'")
                columns = tuple(row[4] for row in sorted(cur.fetchall(), key=lambda r: r[3]))
            if columns != USERS_INDEX:
                summary.problems.append(
                    f"index idx_users_due is missing or differs ({', '.join(columns) or 'none'}):"
                    f" apply {MIGRATIONS['users']}; runs still work, but read the whole table"
                )
            reader = connect(config, streaming=True)
            stack.callback(close, reader)
            with Snapshot(reader, config) as snapshot:
                for row in snapshot.all_rows():
                    summary.users_checked += 1
                    try:
                        setting = parse_row(row, config.default_timezone, config.phone_region)
                    except InvalidRow as reason:
                        out(json.dumps(summary.invalid(row, reason), ensure_ascii=False))
                        continue
                    if setting is not None:
                        count_minutes(setting, day, per_minute)
        except DatabaseError as exc:
            summary.error = str(exc)
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; argparse reports a bad one and exits 2 (SystemExit)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="read and plan, print the plan, create no task"
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="check the database, the grants and every active row; print each invalid"
        " row; write nothing and contact no Cloud Tasks endpoint",
    )
    parser.add_argument(
        "--changes",
        action="store_true",
        help="a quick run: act on what changed since the hourly run, from the job's own"
        " record (no listing of the queue); cron runs it every minute",
    )
    parser.add_argument(
        "--now",
        metavar="ISO8601",
        help="plan as if it were this instant (no offset: DEFAULT_TIMEZONE)",
    )
    args = parser.parse_args(argv)
    if args.check and args.changes:
        parser.error("argument --changes: not allowed with argument --check")
    return args


def parse_now(text: str, default_zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """--now: exact with an offset or Z, else wall-clock time in DEFAULT_TIMEZONE."""
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=default_zone)


def settings(
    argv: Sequence[str] | None, env: Mapping[str, str] | None
) -> tuple[argparse.Namespace, Config, dt.datetime | None]:
    """The command line, the settings and --now, all validated; UsageError otherwise."""
    args = parse_args(argv)
    if env is None:
        # .env in the working directory; real variables win over it.
        file_values = dotenv_values(".env")
        env = {**{k: v for k, v in file_values.items() if v is not None}, **os.environ}
    config = Config.from_env(env, dry_run=args.dry_run or args.check)
    if args.now is None:
        return args, config, None
    if not (args.dry_run or args.check) and config.emulator_host is None:
        # Against the real queue the safety margins need the real clock: a real run "as
        # if" two hours ago would create calls that ran and were forgotten.
        raise UsageError(
            "--now needs --dry-run, or a local Cloud Tasks endpoint (CLOUD_TASKS_EMULATOR_HOST)"
        )
    try:
        return args, config, parse_now(args.now, config.default_timezone)
    except ValueError:
        raise UsageError(f"--now {args.now!r} is not ISO 8601") from None


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
        clock: the job's clock (tests: a virtual one); default the real one, from `now`.
        tasks_client: a ready Cloud Tasks client (tests), else one is made.
        stdout, stderr: where the plan and summary, and the logs, go (default sys's).
    """
    try:
        args, config, at = settings(argv, env)
    except SystemExit as exc:  # --help (0), or argparse's own usage error (2)
        return int(exc.code or 0)
    except UsageError as exc:
        print(f"anpi-call-scheduler: {exc}", file=stderr or sys.stderr)
        return exc.exit_code
    now = at or now or (clock() if clock else dt.datetime.now(UTC))
    setup_logging(config, stderr)

    stop, signalled = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.warning(
            "received %s: finishing in-flight tasks, then stopping", signal.Signals(signum).name
        )
        signalled.set()
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C ends the process at once

    previous: dict[int, Any] = {}
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
                now,
                dry_run=args.dry_run,
                changes=args.changes,
                tasks_client=tasks_client,
                stop=stop,
                out=out,
                clock=clock,
            )
    except JobError as exc:  # a missing table or grant: nothing was done
        log.critical("%s", exc)
        return exc.exit_code
    except Exception:  # the one catch-all: report, never die without a summary
        log.exception("unexpected error")
        summary = (CheckSummary if args.check else RunSummary)(error="unexpected error (see log)")
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if isinstance(summary, RunSummary):
        summary.interrupted = signalled.is_set()
    out(json.dumps(dataclasses.asdict(summary), ensure_ascii=False))
    stdout.flush()
    log.info("run finished", extra={"exit_code": summary.exit_code})
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
