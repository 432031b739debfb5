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
    assert main.parse_weekdays(text) == main.Days(frozenset(days))


@pytest.mark.parametrize(
    ("text", "days", "holidays", "without"),
    [
        ("毎週月曜", {MON}, False, False),
        ("毎週 月・木", {MON, THU}, False, False),
        ("週末", {SAT, SUN}, False, False),
        ("土日祝", {SAT, SUN}, True, False),
        ("土日祝日", {SAT, SUN}, True, False),
        ("月水金・祝日", {MON, WED, FRI}, True, False),
        ("祝", set(), True, False),
        ("月ー金", {MON, TUE, WED, THU, FRI}, False, False),  # the IME's long-vowel mark
        ("月‐金", {MON, TUE, WED, THU, FRI}, False, False),  # U+2010 hyphen
        ("月−金", {MON, TUE, WED, THU, FRI}, False, False),  # U+2212 minus
        ("月–金", {MON, TUE, WED, THU, FRI}, False, False),  # en dash
        ("月—金", {MON, TUE, WED, THU, FRI}, False, False),  # em dash
        ("月～金", {MON, TUE, WED, THU, FRI}, False, False),
        ("平日", {MON, TUE, WED, THU, FRI}, False, False),  # holidays included: a call is better
        ("平日(祝日除く)", {MON, TUE, WED, THU, FRI}, False, True),
        ("平日（祝日を除く）", {MON, TUE, WED, THU, FRI}, False, True),
        ("平日・祝日は除く", {MON, TUE, WED, THU, FRI}, False, True),
        ("平日・祝日除く", {MON, TUE, WED, THU, FRI}, False, True),
        ("月水金 祝日除く", {MON, WED, FRI}, False, True),
        ("(月)", {MON}, False, False),
        ("毎週末", {SAT, SUN}, False, False),
        ("月―金", {MON, TUE, WED, THU, FRI}, False, False),  # U+2015: Shift_JIS's dash
        ("月 〜 金", {MON, TUE, WED, THU, FRI}, False, False),
        ("mon - fri", {MON, TUE, WED, THU, FRI}, False, False),
        ("平日［祝日除く］", {MON, TUE, WED, THU, FRI}, False, True),
        ("平日【祝日を除く】", {MON, TUE, WED, THU, FRI}, False, True),
        ("平日(祝除く)", {MON, TUE, WED, THU, FRI}, False, True),
        # What stands before 除く is left out, not added.
        ("月〜金（土日祝日は除く）", {MON, TUE, WED, THU, FRI}, False, True),
        ("毎日(土日祝日除く)", {MON, TUE, WED, THU, FRI}, False, True),
        ("毎日(日曜除く)", {MON, TUE, WED, THU, FRI, SAT}, False, False),
    ],
)
def test_japanese_spellings_holidays_and_dashes(
    text: str, days: set[int], holidays: bool, without: bool
) -> None:
    assert main.parse_weekdays(text) == main.Days(frozenset(days), holidays, without)


@pytest.mark.parametrize(
    "text",
    ["祝日除く", "祝・祝日除く", "月〜祝", "毎週", "祝x", "土日祝日除く", "日祝日除く", "除く"],
)
def test_holiday_spellings_that_make_no_sense_are_invalid(text: str) -> None:
    with pytest.raises(InvalidRow, match="call_weekdays"):
        main.parse_weekdays(text)


@pytest.mark.parametrize(
    ("day", "holiday"),
    [
        (dt.date(2026, 1, 12), True),  # 成人の日
        (dt.date(2026, 5, 6), True),  # 憲法記念日 振替休日
        (dt.date(2026, 9, 22), True),  # 国民の休日
        (dt.date(2026, 11, 3), True),  # 文化の日
        (dt.date(2026, 1, 1), True),  # 元日
        (dt.date(2026, 1, 2), False),  # the New Year period is not a national holiday
        (dt.date(2026, 1, 3), False),
        (dt.date(2026, 11, 30), False),
    ],
)
def test_holidays_come_from_the_law(day: dt.date, holiday: bool) -> None:
    assert main.is_holiday(day) is holiday


def _setting(days: str, **extra: object) -> main.CallSetting:
    spec = main.parse_weekdays(days)
    return main.CallSetting(
        1, "+819012345678", spec.weekdays, dt.time(9), main.zoneinfo.ZoneInfo("Asia/Tokyo"),
        spec.holidays, spec.without_holidays, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def _called_dates(setting: main.CallSetting, start: dt.date, days: int) -> list[dt.date]:
    jst = main.zoneinfo.ZoneInfo("Asia/Tokyo")
    window = main.Window(
        dt.datetime.combine(start, dt.time(0), tzinfo=jst).astimezone(UTC),
        dt.datetime.combine(start + dt.timedelta(days=days), dt.time(0), tzinfo=jst).astimezone(
            UTC
        ),
    )
    return [t.astimezone(jst).date() for t in main.occurrences(setting, window)]


def test_holidays_added_and_left_out_on_known_dates() -> None:
    golden_week = dt.date(2026, 5, 1)  # Fri 1; Sun 3, Mon 4, Tue 5, Wed 6 (振替休日) holidays
    assert _called_dates(_setting("土日祝"), golden_week, 7) == [
        dt.date(2026, 5, d) for d in (2, 3, 4, 5, 6)
    ]
    assert _called_dates(_setting("平日(祝日除く)"), golden_week, 7) == [
        dt.date(2026, 5, 1),
        dt.date(2026, 5, 7),
    ]
    assert _called_dates(_setting("平日"), golden_week, 7) == [
        dt.date(2026, 5, d) for d in (1, 4, 5, 6, 7)
    ]  # 平日 keeps holidays
    assert _called_dates(_setting("祝"), dt.date(2026, 9, 19), 5) == [
        dt.date(2026, 9, 21), dt.date(2026, 9, 22), dt.date(2026, 9, 23)
    ]  # fmt: skip


def test_pauses_use_local_dates_and_end_by_themselves() -> None:
    start = dt.date(2026, 11, 28)
    pause = {"pause_from": dt.date(2026, 11, 30), "pause_until": dt.date(2026, 12, 1)}
    assert _called_dates(_setting("daily", **pause), start, 5) == [
        dt.date(2026, 11, 28), dt.date(2026, 11, 29), dt.date(2026, 12, 2)
    ]  # fmt: skip
    open_ended = {"pause_from": dt.date(2026, 11, 30)}
    assert _called_dates(_setting("daily", **open_ended), start, 5) == [
        dt.date(2026, 11, 28), dt.date(2026, 11, 29)
    ]  # fmt: skip
    until = {"pause_until": dt.date(2026, 11, 29)}
    assert _called_dates(_setting("daily", **until), start, 3) == [dt.date(2026, 11, 30)]


@pytest.mark.parametrize("text", [None, "", "   ", "\t"])
def test_empty_weekdays_mean_no_calls(text: str | None) -> None:
    assert main.parse_weekdays(text) == main.NO_DAYS


@pytest.mark.parametrize(
    "text",
    [
        "mon-", "-fri", "mon--fri", "mon-wed-fri", "8", "10", "135", "月x", "monwed",
        "mo", "funday", "weekdays-fri", "平日-金", ",", "・", "月曜日から金曜日", "mon;drop table users",
        "1.5", "日曜日曜", "mon_tue",
    ],
)  # fmt: skip
def test_invalid_weekdays(text: str) -> None:
    with pytest.raises(InvalidRow, match="call_weekdays"):
        main.parse_weekdays(text)


def test_weekday_bytes_and_other_types() -> None:
    assert main.parse_weekdays("月水".encode()).weekdays == {MON, WED}
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
        ({"phone_number": "03-1234"}, "phone_number"),
        ({"phone_number": "090-abcd-5678"}, "phone_number"),
        ({"phone_number": "+8190abc45678"}, "phone_number"),
        ({"phone_number": "+1234567"}, "phone_number"),
        ({"phone_number": "+1234567890123456"}, "phone_number"),
        ({"phone_number": "+999 1234 5678"}, "phone_number"),
        ({"phone_number": "090-1234-5678#"}, "phone_number"),
        ({"phone_number": "+81+9012345678"}, "phone_number"),
        ({"phone_number": ""}, "phone_number"),
        ({"phone_number": None}, "phone_number"),
        ({"pause_from": "2026-13-01"}, "pause_from"),
        ({"pause_from": dt.date(2026, 12, 2), "pause_until": dt.date(2026, 12, 1)}, "pause_until"),
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
    assert info.value.column == reason
    assert "12345678" not in str(info.value)  # a phone number never appears whole


@pytest.mark.parametrize(
    ("typed", "e164"),
    [
        ("090-1234-5678", "+819012345678"),
        ("09012345678", "+819012345678"),
        ("03-1234-5678", "+81312345678"),
        ("(03)1234-5678", "+81312345678"),
        ("０９０－１２３４－５６７８", "+819012345678"),
        ("（０３）１２３４－５６７８", "+81312345678"),
        ("090ー1234ー5678", "+819012345678"),  # the IME's long-vowel mark for a dash
        ("090‐1234−5678", "+819012345678"),
        (" 090 1234 5678 ", "+819012345678"),
        ("+81 90-1234-5678", "+819012345678"),
        ("+8109012345678", "+819012345678"),  # the stray trunk 0 is dropped
        ("+819012345678", "+819012345678"),
        ("0120-123-456", "+81120123456"),
        ("+1 212 555 0123", "+12125550123"),
        ("+7 8 915 123 4567", "+79151234567"),  # a trunk digit after the code: full parser
        ("０３―１２３４―５６７８", "+81312345678"),  # U+2015
    ],
)
def test_phone_numbers_as_typed_in_japan_become_e164(typed: str, e164: str) -> None:
    assert main.normalize_phone(typed, "JP") == e164
    assert main.parse_row(row(phone_number=typed), TOKYO).phone_number == e164  # type: ignore[union-attr]


def test_the_country_of_national_numbers_is_configurable() -> None:
    cfg = main.Config.from_env({"DB_HOST": "x", "DEFAULT_COUNTRY_CODE": "1"}, dry_run=True)
    assert cfg.phone_region == "US"
    assert main.normalize_phone("(212) 555-0123", cfg.phone_region) == "+12125550123"
    for code in ("999", "800"):  # none, and a non-geographic one
        with pytest.raises(main.ConfigError, match=f"DEFAULT_COUNTRY_CODE={code}"):
            main.Config.from_env({"DB_HOST": "x", "DEFAULT_COUNTRY_CODE": code}, dry_run=True)


@pytest.mark.parametrize(
    ("typed", "why"),
    [("+999 1234 5678", "unknown country code"), ("1" * 30, "too long"), ("03-1234", "too short")],
)
def test_phone_reasons_say_what_is_wrong(typed: str, why: str) -> None:
    with pytest.raises(InvalidRow, match=why):
        main.normalize_phone(typed, "JP")


def test_the_quick_path_and_the_full_parser_agree() -> None:
    """The shortcut keeps only valid numbers; whatever it accepts, the full parser
    turns into the same E.164."""
    import phonenumbers

    for national in ("09012345678", "0312345678", "0120123456", "05012345678", "0612345678"):
        for text in (national, "+81" + national[1:]):
            quick = main._quick_number(text, "JP")
            full = phonenumbers.parse(text, "JP")
            assert quick is not None and phonenumbers.is_valid_number(full)
            assert phonenumbers.format_number(quick, 0) == phonenumbers.format_number(full, 0)


_DASH_CHARS = ["-", "－", "ー", "‐", "−", " ", ""]


@st.composite
def japanese_numbers(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A valid Japanese mobile or Tokyo number as digit groups (national form)."""
    if draw(st.booleans()):
        groups = [draw(st.sampled_from(["070", "080", "090"])),
                  draw(st.from_regex(r"[1-9][0-9]{3}", fullmatch=True)),
                  draw(st.from_regex(r"[0-9]{4}", fullmatch=True))]  # fmt: skip
    else:
        groups = ["03", draw(st.from_regex(r"[2-9][0-9]{3}", fullmatch=True)),
                  draw(st.from_regex(r"[0-9]{4}", fullmatch=True))]  # fmt: skip
    national = "".join(groups)
    e164 = "+81" + national[1:]
    return e164, groups


@settings(max_examples=300)
@given(japanese_numbers(), st.sampled_from(_DASH_CHARS), st.booleans(), st.booleans())
def test_every_national_spelling_gives_one_e164(
    number: tuple[str, list[str]], dash: str, full_width: bool, brackets: bool
) -> None:
    e164, groups = number
    first = f"({groups[0]})" if brackets else groups[0] + dash
    text = first + groups[1] + dash + groups[2]
    if full_width:
        text = text.translate(str.maketrans("0123456789()", "０１２３４５６７８９（）"))
    assert main.normalize_phone(text, "JP") == e164
    assert main.normalize_phone(e164, "JP") == e164
    assert main.normalize_phone("+81 " + text.lstrip("(0０"), "JP") == e164


@given(japanese_numbers(), st.integers(1, 6), st.sampled_from("abcxｘ#*,;"))
def test_cut_or_lettered_numbers_are_invalid_with_a_reason(
    number: tuple[str, list[str]], cut: int, letter: str
) -> None:
    national = "".join(number[1])
    with pytest.raises(InvalidRow, match=r"phone_number .*(too short|length|valid|not a phone)"):
        main.normalize_phone(national[: len(national) - cut - 3], "JP")
    with pytest.raises(InvalidRow, match=r"phone_number .*other than digits"):
        main.normalize_phone(national[:5] + letter + national[5:], "JP")


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
    assert main.TASK_ID_RE.fullmatch(main.task_id(42, instant, alternative=2))


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
    if ranges is None:  # no filter: only for a window of about a day or more
        assert window.end - window.start > dt.timedelta(hours=20)
        return
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


# One region per calling code: Japan, the UK, Germany, France, Korea, China, Australia,
# India, Brazil, Singapore; and the US's shared +1, which goes to the library.
_CODES = [81, 44, 49, 33, 82, 86, 61, 91, 55, 65, 1]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(_CODES), st.from_regex(r"[1-9][0-9]{3,13}", fullmatch=True))
def test_the_fast_validity_check_agrees_with_libphonenumber(code: int, national: str) -> None:
    import phonenumbers

    number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
    assert main._valid_number(number) == phonenumbers.is_valid_number(number)


@pytest.mark.parametrize("code", _CODES)
def test_the_fast_validity_check_agrees_on_every_valid_example(code: int) -> None:
    """libphonenumber's own example numbers, of every type, and each one digit shorter
    and longer."""
    import phonenumbers

    for region in phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]:
        for kind in range(12):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            for national in (example.national_number, example.national_number // 10, example.national_number * 10 + 1):
                number = phonenumbers.PhoneNumber(country_code=code, national_number=national)
                assert main._valid_number(number) == phonenumbers.is_valid_number(number), national
