"""Parsing of DICOM date and time value representations (PS3.5 6.2). Pure."""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["parse_da", "parse_dt", "parse_tm"]

_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")


def parse_da(value: str) -> dt.date | None:
    """DA (PS3.5 6.2) to a date; None when the value is not a valid date."""
    m = _DA.match(value.strip())
    if not m:
        return None
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def parse_tm(value: str) -> dt.time | None:
    """TM to a time (HH, HHMM, HHMMSS, HHMMSS.FFFFFF; colons tolerated)."""
    m = _TM.match(value.strip())
    if not m:
        return None
    try:
        frac = int((m[4] or "0").ljust(6, "0"))
        return dt.time(int(m[1]), int(m[2] or 0), min(int(m[3] or 0), 59), frac)
    except ValueError:
        return None


def parse_dt(value: str) -> dt.datetime | None:
    """DT to a naive datetime (the UTC offset suffix is ignored)."""
    m = _DT.match(value.strip())
    if not m:
        return None
    try:
        frac = int((m[7] or "0").ljust(6, "0"))
        return dt.datetime(
            int(m[1]), int(m[2] or 1), int(m[3] or 1), int(m[4] or 0), int(m[5] or 0),
            min(int(m[6] or 0), 59), frac,
        )  # fmt: skip
    except ValueError:
        return None
