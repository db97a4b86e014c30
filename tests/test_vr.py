"""DA/TM/DT parsing (PS3.5 6.2, Table 6.2-1), for stored values and query values alike."""

from __future__ import annotations

import datetime as dt

import pytest

from dicomweb_server.attributes import Level
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import RangeMatch, SingleValueMatch
from dicomweb_server.query import parse
from dicomweb_server.vr import parse_da, parse_dt, parse_tm, parse_utc_offset


def test_a_leap_second_is_a_time_and_later_seconds_are_not() -> None:
    """PS3.5 Table 6.2-1: seconds 00-60, 60 for a leap second; 61-99 were read as 59."""
    assert parse_tm("235960") == dt.time(23, 59, 59)
    assert parse_tm("235960", latest=True) == dt.time(23, 59, 59, 999999)
    assert parse_tm("235960.5") == dt.time(23, 59, 59, 500000)
    for value in ("235961", "120099", "12:00:61", "120075.5"):
        assert parse_tm(value) is None, value
        assert parse_tm(value, latest=True) is None, value
    assert parse_dt("20161231235960") == dt.datetime(2016, 12, 31, 23, 59, 59)
    for value in ("20161231235961", "20240101120099+0000", "20240101120070.1"):
        assert parse_dt(value) is None, value
        assert parse_dt(value, latest=True) is None, value


@pytest.mark.parametrize("value", ["2024.5", "202401.5", "2024010112.5", "202401011230.5"])
def test_a_dt_fraction_needs_the_seconds(value: str) -> None:
    """PS3.5 Table 6.2-1: `.FFFFFF` follows SS; a fraction of a year or a minute is no DT."""
    assert parse_dt(value) is None
    assert parse_dt(value, latest=True) is None


def test_a_dt_fraction_after_the_seconds_is_read() -> None:
    assert parse_dt("20240101123005.5") == dt.datetime(2024, 1, 1, 12, 30, 5, 500000)
    assert parse_dt("20240101123005.25+0100", latest=True) == dt.datetime(
        2024, 1, 1, 12, 30, 5, 259999, tzinfo=dt.timezone(dt.timedelta(hours=1))
    )


# U+0661 ARABIC-INDIC DIGIT ONE, U+FF12 FULLWIDTH DIGIT TWO, U+0E53 THAI DIGIT THREE:
# `\d` took them and int() read them as 1, 2, 3.
@pytest.mark.parametrize(
    ("parser", "value"),
    [
        (parse_da, "2024010\u0661"),
        (parse_da, "\uff12024.01.01"),
        (parse_tm, "12\u0e530"),
        (parse_tm, "120000.\u0661"),
        (parse_dt, "2024010112000\u0661"),
        (parse_dt, "20240101120000+010\u0661"),
        (parse_utc_offset, "+010\u0661"),
    ],
)
def test_only_ascii_digits_are_digits(parser: object, value: str) -> None:
    assert callable(parser)
    assert parser(value) is None


def _one(level: Level, key: str, value: str) -> object:
    (m,) = parse(level, [(key, value)], {}).matches
    return m


@pytest.mark.parametrize(
    ("level", "key", "value"),
    [
        (Level.STUDY, "StudyTime", "120061"),
        (Level.STUDY, "StudyTime", "120099-"),
        (Level.STUDY, "StudyTime", "-235961"),
        (Level.STUDY, "StudyTime", "1200\u0661\u0662"),
        (Level.STUDY, "StudyDate", "2024010\u0661"),
        (Level.INSTANCE, "AcquisitionDateTime", "2024.5"),
        (Level.INSTANCE, "AcquisitionDateTime", "202401011230.5"),
        (Level.INSTANCE, "AcquisitionDateTime", "202401011230.5-2025"),
        (Level.INSTANCE, "AcquisitionDateTime", "20240101120061"),
        (Level.INSTANCE, "AcquisitionDateTime", "2024010112006\u0661"),
    ],
)
def test_invalid_query_values_are_refused_with_a_reason(level: Level, key: str, value: str) -> None:
    with pytest.raises(BadRequestError, match=f"{key}: .* is not a valid (TM|DA|DT)") as exc:
        _one(level, key, value)
    assert exc.value.status == 400


def test_a_leap_second_in_a_query() -> None:
    m = _one(Level.STUDY, "StudyTime", "235960")
    assert isinstance(m, SingleValueMatch) and m.value == dt.time(23, 59, 59)
    m = _one(Level.STUDY, "StudyTime", "-235960")
    assert isinstance(m, RangeMatch) and m.upper == dt.time(23, 59, 59, 999999)
    m = _one(Level.INSTANCE, "AcquisitionDateTime", "20161231235960+0000")
    assert isinstance(m, SingleValueMatch) and m.value == dt.datetime(2016, 12, 31, 23, 59, 59)
