"""Scheduling: pure functions, table-driven and property-based."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import main
from main import CallSetting, InvalidRow, Window

UTC = dt.UTC
TOKYO = ZoneInfo("Asia/Tokyo")
NEW_YORK = ZoneInfo("America/New_York")
MON, TUE, WED, THU, FRI, SAT, SUN = range(7)
ALL = frozenset(range(7))


# -- weekday formats -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("mon", {MON}),
        ("Monday", {MON}),
        ("MON, Wed ,fri", {MON, WED, FRI}),
        ("tue thu", {TUE, THU}),
        ("sat/sun", {SAT, SUN}),
        ("mon-fri", {MON, TUE, WED, THU, FRI}),
        ("sat-mon", {SAT, SUN, MON}),
        ("fri-tue", {FRI, SAT, SUN, MON, TUE}),
        ("wednesday-wednesday", {WED}),
        ("月", {MON}),
        ("月水金", {MON, WED, FRI}),
        ("月曜", {MON}),
        ("月曜日", {MON}),
        ("月曜日・水曜日", {MON, WED}),
        ("月曜日水曜日", {MON, WED}),
        ("火、木", {TUE, THU}),
        ("月-金", {MON, TUE, WED, THU, FRI}),
        ("月〜金", {MON, TUE, WED, THU, FRI}),
        ("月~金", {MON, TUE, WED, THU, FRI}),
        ("月～金", {MON, TUE, WED, THU, FRI}),  # full-width tilde, as IMEs type it
        ("土〜月", {SAT, SUN, MON}),
        ("月曜〜水曜", {MON, TUE, WED}),
        ("月〜水金", {MON, TUE, WED, FRI}),
        ("daily", ALL),
        ("everyday", ALL),
        ("毎日", ALL),
        ("weekdays", {MON, TUE, WED, THU, FRI}),
        ("平日", {MON, TUE, WED, THU, FRI}),
        ("weekends", {SAT, SUN}),
        ("土日", {SAT, SUN}),
        ("平日・土", {MON, TUE, WED, THU, FRI, SAT}),
        ("0", {SUN}),
        ("7", {SUN}),
        ("1", {MON}),
        ("6", {SAT}),
        ("1,3,5", {MON, WED, FRI}),
        ("1-5", {MON, TUE, WED, THU, FRI}),
        ("0-7", ALL),
        ("5-1", {FRI, SAT, SUN, MON}),
        ("ｍｏｎ，ｗｅｄ", {MON, WED}),  # full-width letters fold to ASCII
        ("  mon  ", {MON}),
        ("mon,,wed", {MON, WED}),
    ],
)
def test_weekday_formats(text: str, days: set[int]) -> None:
    assert main.parse_weekdays(text) == frozenset(days)


@pytest.mark.parametrize("text", [None, "", "   ", "\t"])
def test_empty_weekdays_mean_no_calls(text: str | None) -> None:
    assert main.parse_weekdays(text) == frozenset()


@pytest.mark.parametrize(
    "text",
    [
        "mon-", "-fri", "mon--fri", "mon-wed-fri", "8", "10", "135", "月x", "monwed",
        "mo", "funday", "weekdays-fri", "平日-金", ",", "・", "月曜日から金曜日", "mon;drop table users",
        "1.5", "日曜日曜", "(月)", "mon_tue",
    ],
)  # fmt: skip
def test_invalid_weekdays(text: str) -> None:
    with pytest.raises(InvalidRow, match="call_weekdays"):
        main.parse_weekdays(text)


def test_weekday_bytes_and_other_types() -> None:
    assert main.parse_weekdays("月水".encode()) == {MON, WED}
    with pytest.raises(InvalidRow, match="UTF-8"):
        main.parse_weekdays(b"\xff\xfe")
    with pytest.raises(InvalidRow, match="type int"):
        main.parse_weekdays(5)


# -- call_time ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.timedelta(hours=9), dt.time(9)),
        (dt.timedelta(0), dt.time(0)),
        (dt.timedelta(hours=23, minutes=59, seconds=59), dt.time(23, 59, 59)),
        ("09:30", dt.time(9, 30)),
        ("9:30", dt.time(9, 30)),
        ("09:30:15", dt.time(9, 30, 15)),
        (b"07:05", dt.time(7, 5)),
        (dt.time(6, 45), dt.time(6, 45)),
        (None, None),
    ],
)
def test_call_time_values(value: object, expected: dt.time | None) -> None:
    assert main.parse_call_time(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        dt.timedelta(hours=24),
        dt.timedelta(hours=-1),
        dt.timedelta(hours=838, minutes=59, seconds=59),
        dt.timedelta(hours=9, microseconds=5),
        "24:00", "-01:00", "838:59:59", "9", "09:60", "09:30:60", "noon", "", "09:30 ", "０９:３０x",
        3.5,
    ],
)  # fmt: skip
def test_invalid_call_times(value: object) -> None:
    if value == "09:30 ":
        assert main.parse_call_time(value) == dt.time(9, 30)  # surrounding blanks are fine
        return
    with pytest.raises(InvalidRow, match="call_time"):
        main.parse_call_time(value)


# -- rows ------------------------------------------------------------------------------


def row(**fields: object) -> main.UserRow:
    values = {
        "id": 1,
        "phone_number": "+819012345678",
        "call_weekdays": "daily",
        "call_time": dt.timedelta(hours=9),
        "timezone": None,
    }
    values.update(fields)
    return main.UserRow(**values)  # type: ignore[arg-type]


def test_row_defaults_to_default_zone() -> None:
    setting = main.parse_row(row(timezone=""), TOKYO)
    assert setting == CallSetting(1, "+819012345678", ALL, dt.time(9), TOKYO)
    assert main.parse_row(row(timezone="America/New_York"), TOKYO).zone == NEW_YORK  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"phone_number": "090-1234-5678"}, "phone_number"),
        ({"phone_number": "+81 90 1234 5678"}, "phone_number"),
        ({"phone_number": "+8190abc45678"}, "phone_number"),
        ({"phone_number": "+1234567"}, "phone_number"),
        ({"phone_number": "+1234567890123456"}, "phone_number"),
        ({"phone_number": "+819012345678\n"}, "phone_number"),
        ({"phone_number": None}, "phone_number"),
        ({"timezone": "Asia/Tokio"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"timezone": "JST-9"}, "timezone"),
        ({"call_time": "25:00"}, "call_time"),
        ({"call_weekdays": "mon-"}, "call_weekdays"),
    ],
)
def test_invalid_rows(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidRow, match=reason) as info:
        main.parse_row(row(**fields), TOKYO)
    assert "12345678" not in str(info.value)  # a phone number never appears whole


@pytest.mark.parametrize(
    "fields", [{"call_weekdays": None}, {"call_weekdays": ""}, {"call_time": None}]
)
def test_rows_without_calls_are_valid(fields: dict[str, object]) -> None:
    assert main.parse_row(row(**fields), TOKYO) is None


def test_mask_phone() -> None:
    assert main.mask_phone("+819012345678") == "***5678"
    assert main.mask_phone("1234") == "***"
    assert main.mask_phone(None) == "***"


# -- planning window -----------------------------------------------------------------


def tokyo(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=TOKYO).astimezone(UTC)


def plan(
    setting: CallSetting, now: dt.datetime, grace: int = 15, lookahead: int = 120
) -> list[dt.datetime]:
    window = Window.around(now, dt.timedelta(minutes=grace), dt.timedelta(minutes=lookahead))
    return main.occurrences(setting, window)


DAILY_9 = CallSetting(1, "+819012345678", ALL, dt.time(9), TOKYO)


def test_window_start_is_included_and_end_excluded() -> None:
    assert plan(DAILY_9, tokyo(2026, 11, 30, 9, 15)) == [tokyo(2026, 11, 30, 9)]  # now - GRACE
    assert plan(DAILY_9, tokyo(2026, 11, 30, 9, 15, 1)) == []
    assert plan(DAILY_9, tokyo(2026, 11, 30, 7)) == []  # now + LOOKAHEAD
    assert plan(DAILY_9, tokyo(2026, 11, 30, 7, 0, 1)) == [tokyo(2026, 11, 30, 9)]


def test_wraps_at_midnight_and_from_sunday_to_monday() -> None:
    monday_0010 = CallSetting(1, "+819012345678", frozenset({MON}), dt.time(0, 10), TOKYO)
    # Sunday 2026-11-29 23:00 JST: the call is Monday 00:10.
    assert plan(monday_0010, tokyo(2026, 11, 29, 23)) == [tokyo(2026, 11, 30, 0, 10)]
    sunday_2350 = CallSetting(1, "+819012345678", frozenset({SUN}), dt.time(23, 50), TOKYO)
    # Monday 00:00 with 15 minutes of grace still plans Sunday 23:50.
    assert plan(sunday_2350, tokyo(2026, 11, 30, 0)) == [tokyo(2026, 11, 29, 23, 50)]
    assert plan(sunday_2350, tokyo(2026, 11, 30, 0, 6)) == []


def test_weekday_not_chosen_is_not_called() -> None:
    weekdays_9 = CallSetting(1, "+819012345678", frozenset(range(5)), dt.time(9), TOKYO)
    assert plan(weekdays_9, tokyo(2026, 11, 28, 8)) == []  # Saturday
    assert plan(weekdays_9, tokyo(2026, 11, 30, 8)) == [tokyo(2026, 11, 30, 9)]


def test_dst_gap_moves_forward_by_the_gap() -> None:
    # 2026-03-08 02:30 does not exist in New York: clocks jump 02:00 EST -> 03:00 EDT.
    setting = CallSetting(1, "+12125550100", ALL, dt.time(2, 30), NEW_YORK)
    calls = plan(setting, dt.datetime(2026, 3, 8, 6, 0, tzinfo=UTC))  # 01:00 EST
    assert calls == [dt.datetime(2026, 3, 8, 7, 30, tzinfo=UTC)]
    assert calls[0].astimezone(NEW_YORK).isoformat() == "2026-03-08T03:30:00-04:00"


def test_dst_fold_takes_the_first_occurrence_once() -> None:
    # 2026-11-01 01:30 happens twice in New York (EDT, then EST): call at the first only.
    setting = CallSetting(1, "+12125550100", ALL, dt.time(1, 30), NEW_YORK)
    calls = plan(setting, dt.datetime(2026, 11, 1, 5, 0, tzinfo=UTC), lookahead=180)
    assert calls == [dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC)]
    assert calls[0].astimezone(NEW_YORK).isoformat() == "2026-11-01T01:30:00-04:00"


# -- task ids ---------------------------------------------------------------------


def test_task_id_shape() -> None:
    instant = tokyo(2026, 11, 30, 9)
    task_id = main.task_id(42, instant)
    assert re.fullmatch(r"[0-9a-f]{8}-anpi-42-20261130T000000Z", task_id)
    assert main.task_id(42, instant.astimezone(UTC)) == task_id  # the instant, not the zone
    assert main.task_id(43, instant) != task_id
    assert main.task_id(42, instant + dt.timedelta(seconds=1)) != task_id
    assert main.task_id(-7, instant).split("-anpi-")[1].startswith("-7-")
    assert main.TASK_ID_RE.fullmatch(main.task_id(42, instant, retry=2))


# -- properties against a brute-force enumeration --------------------------------------

ZONES = ["Asia/Tokyo", "America/New_York", "Europe/London", "Australia/Lord_Howe",
         "America/Santiago", "Asia/Kolkata", "Pacific/Chatham", "UTC"]  # fmt: skip


def brute_force(setting: CallSetting, window: Window) -> list[dt.datetime]:
    """Every call in the window, found by walking the clock minute by minute.

    For each local date in the setting's weekdays, the call is the first instant whose
    wall clock reads call_time; in a DST gap, the instant the clock skips past it, plus
    how far call_time lay inside the gap.
    """
    zone = setting.zone
    step = dt.timedelta(minutes=1)
    target_minute = setting.call_time.replace(second=0)
    seconds = dt.timedelta(seconds=setting.call_time.second)
    found: dict[dt.date, dt.datetime] = {}
    t = (window.start - dt.timedelta(days=1)).replace(second=0, microsecond=0)
    previous = t.astimezone(zone).replace(tzinfo=None)
    while t < window.end + dt.timedelta(days=1):
        wall = t.astimezone(zone).replace(tzinfo=None)
        day = wall.date()
        if day.weekday() in setting.weekdays and day not in found:
            wanted = dt.datetime.combine(day, target_minute)
            if wall == wanted:
                found[day] = t + seconds
            elif previous < wanted < wall and wall - previous > step:
                # The clock jumped over call_time: move forward by the gap.
                found[day] = t + (wanted - (previous + step)) + seconds
        previous = wall
        t += step
    return sorted(i for i in found.values() if window.start <= i < window.end)


instants = st.datetimes(min_value=dt.datetime(2024, 1, 1), max_value=dt.datetime(2030, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC)
)
settings_strategy = st.builds(
    CallSetting,
    user_id=st.integers(1, 10**6),
    phone_number=st.just("+819012345678"),
    weekdays=st.frozensets(st.integers(0, 6), min_size=1),
    call_time=st.times(),
    zone=st.sampled_from(ZONES).map(ZoneInfo),
).map(
    lambda s: CallSetting(
        s.user_id, s.phone_number, s.weekdays, s.call_time.replace(microsecond=0), s.zone
    )
)


@settings(max_examples=150, deadline=None)
@given(
    setting=settings_strategy, now=instants, grace=st.integers(0, 59), lookahead=st.integers(1, 600)
)
def test_plan_equals_brute_force(
    setting: CallSetting, now: dt.datetime, grace: int, lookahead: int
) -> None:
    window = Window.around(now, dt.timedelta(minutes=grace), dt.timedelta(minutes=lookahead))
    assert main.occurrences(setting, window) == brute_force(setting, window)


@settings(max_examples=300, deadline=None)
@given(setting=settings_strategy, now=instants, lookahead=st.integers(1, 14 * 24 * 60))
def test_no_local_date_gets_two_calls(
    setting: CallSetting, now: dt.datetime, lookahead: int
) -> None:
    window = Window.around(now, dt.timedelta(minutes=15), dt.timedelta(minutes=lookahead))
    calls = main.occurrences(setting, window)
    local_dates = [c.astimezone(setting.zone).date() for c in calls]
    assert len(local_dates) == len(set(local_dates))
    assert all(window.start <= c < window.end for c in calls)
    assert len({main.task_id(setting.user_id, c) for c in calls}) == len(calls)


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES).map(ZoneInfo),
    now=instants,
    grace=st.integers(0, 59),
    lookahead=st.integers(1, 3000),
    where=st.floats(0, 1, exclude_max=True),
)
def test_time_ranges_hold_every_planned_call(
    zone: ZoneInfo, now: dt.datetime, grace: int, lookahead: int, where: float
) -> None:
    """The SQL prefilter's ranges are a superset: no due call_time falls outside them.

    The call time is the wall time of a random instant inside the window, so every
    example has a call to check.
    """
    window = Window.around(now, dt.timedelta(minutes=grace), dt.timedelta(minutes=lookahead))
    instant = window.start + (window.end - window.start) * where
    at = instant.astimezone(zone).time().replace(microsecond=0)
    calls = main.occurrences(CallSetting(1, "+819012345678", ALL, at, zone), window)
    ranges = main.local_time_ranges(zone, window)
    if ranges is not None:
        seconds = at.hour * 3600 + at.minute * 60 + at.second
        for _ in calls:
            assert any(lo <= seconds < hi for lo, hi in ranges)


def test_consecutive_hourly_runs_cover_every_instant() -> None:
    """With the defaults every call is planned by two runs, so one missed run loses nothing."""
    window_10 = Window.around(
        tokyo(2026, 11, 30, 10), dt.timedelta(minutes=15), dt.timedelta(minutes=120)
    )
    window_11 = Window.around(
        tokyo(2026, 11, 30, 11), dt.timedelta(minutes=15), dt.timedelta(minutes=120)
    )
    window_12 = Window.around(
        tokyo(2026, 11, 30, 12), dt.timedelta(minutes=15), dt.timedelta(minutes=120)
    )
    for minute in range(60):
        instant = tokyo(2026, 11, 30, 11, minute)
        covering = [w for w in (window_10, window_11, window_12) if w.start <= instant < w.end]
        assert len(covering) >= 2
