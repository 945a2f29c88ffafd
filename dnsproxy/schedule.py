"""Step schedules: the generic ``active`` key ("mon-fri 21:00-07:00") in the server's time zone.

A schedule is a set of weekly windows. Each window starts on each listed day at its start
time and ends at its end time, on the next day when the end is not after the start
("21:00-07:00" runs over midnight). Checking one costs a clock read and one float
compare: the schedule keeps whether it is on now and the next instant (Unix time) at
which that may change, and recomputes only when that instant has passed.
"""

from __future__ import annotations

import datetime
import os
import re
import time
import zoneinfo
from collections.abc import Callable
from pathlib import Path

import attrs

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(?:([a-z,\-\s]+?)\s+)?(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
LOOKAHEAD_DAYS = 8  # windows are weekly: the next transition is within a week and a day


def _days(text: str) -> frozenset[int]:
    """Weekday numbers (Monday 0) from "mon-fri", "sat,sun", "fri-mon", "daily"."""
    if text in ("daily", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ValueError(f"{part!r} is not a day or day range (mon, tue, ..., sun; mon-fri)")
        a = DAYS.index(first)
        b = DAYS.index(last) if dash else a
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


@attrs.frozen
class Window:
    """One weekly window: start days (Monday 0), start and end as minutes after midnight."""

    days: frozenset[int]
    start: int
    end: int  # not after ``start``: the window ends on the next day

    @classmethod
    def parse(cls, text: str) -> Window:
        """Parse "mon-fri 21:00-07:00", "sat,sun 23:00-08:00" or "22:00-06:30" (every day)."""
        m = _WINDOW.match(text.lower())
        if not m:
            raise ValueError(f'{text!r} is not a window such as "mon-fri 21:00-07:00"')
        days = _days(m.group(1).strip()) if m.group(1) else frozenset(range(7))
        sh, sm, eh, em = (int(g) for g in m.group(2, 3, 4, 5))
        if sh > 23 or eh > 24 or sm > 59 or em > 59 or (eh == 24 and em):
            raise ValueError(f"{text!r}: times run from 00:00 to 24:00")
        return cls(days, sh * 60 + sm, eh * 60 + em)

    def spans(self, today: datetime.date, tz: datetime.tzinfo) -> list[tuple[float, float]]:
        """The [start, end) Unix times of this window's occurrences starting from the day
        before ``today`` to `LOOKAHEAD_DAYS` after."""
        out = []
        for offset in range(-1, LOOKAHEAD_DAYS):
            day = today + datetime.timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            begin = _at(day, self.start, tz)
            end_day = day if self.end > self.start else day + datetime.timedelta(days=1)
            out.append((begin, _at(end_day, self.end, tz)))
        return out


def _at(day: datetime.date, minutes: int, tz: datetime.tzinfo) -> float:
    midnight = datetime.datetime(day.year, day.month, day.day, tzinfo=tz)
    if minutes == 24 * 60:
        return _at(day + datetime.timedelta(days=1), 0, tz)
    local = midnight.replace(hour=minutes // 60, minute=minutes % 60)
    return local.timestamp()


def system_timezone() -> datetime.tzinfo:
    """The system's time zone: $TZ, else /etc/localtime, else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with Path("/etc/localtime").open("rb") as f:
            return zoneinfo.ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return datetime.UTC


def timezone(name: str) -> datetime.tzinfo:
    """The zone named ``name`` ("Europe/Berlin"), or the system's for ""; ValueError if unknown."""
    if not name:
        return system_timezone()
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)"
        ) from exc


def parse_windows(value: object) -> tuple[Window, ...]:
    """The ``active`` key: a list of window strings (one string is a list of one)."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise TypeError('expected a list of windows such as ["mon-fri 21:00-07:00"]')
    if not items:
        raise ValueError("needs at least one window (leave the key out to be always active)")
    return tuple(Window.parse(v) for v in items)


@attrs.define(eq=False)
class Schedule:
    """Whether a step is active now; call it. ``clock`` returns Unix time (injectable)."""

    windows: tuple[Window, ...]
    tz: datetime.tzinfo
    clock: Callable[[], float] = time.time
    on: bool = attrs.field(default=False, init=False)
    until: float = attrs.field(default=float("-inf"), init=False)  # next possible change

    def __call__(self) -> bool:
        now = self.clock()
        if now >= self.until:
            self._recompute(now)
        return self.on

    def key(self) -> tuple[tuple[Window, ...], str]:
        """What makes two schedules equal (reloads pair steps by it)."""
        return self.windows, str(self.tz)

    def _recompute(self, now: float) -> None:
        today = datetime.datetime.fromtimestamp(now, self.tz).date()
        spans = [s for w in self.windows for s in w.spans(today, self.tz)]
        self.on = any(b <= now < e for b, e in spans)
        later = [t for b, e in spans for t in (b, e) if t > now]
        self.until = min(later, default=now + 86400.0)

    def next_change(self) -> str:
        """The local time of the next transition, "21:00" (or "Mon 21:00" beyond a day)."""
        self()
        when = datetime.datetime.fromtimestamp(self.until, self.tz)
        if self.until - self.clock() >= 86400:
            return when.strftime("%a %H:%M")
        return when.strftime("%H:%M")
