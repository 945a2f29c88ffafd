"""Step schedules (the ``active`` key): windows over midnight and DST, an injected clock."""

from __future__ import annotations

import datetime
import zoneinfo

import attrs
import pytest

from dnsproxy.chain import Chain, Scope
from dnsproxy.errors import ConfigError
from dnsproxy.loader import build_chain, load
from dnsproxy.schedule import Schedule, parse_windows
from dnsproxy.testing import Answer, make_query
from tests.core.test_server import write_config

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


class Clock:
    """Unix time the test sets: no sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def at(self, *when: int) -> None:
        self.now = datetime.datetime(*when, tzinfo=BERLIN).timestamp()

    def __call__(self) -> float:
        return self.now


def bedtime(windows: list[str]) -> tuple[Schedule, Clock]:
    clock = Clock()
    return Schedule(parse_windows(windows), BERLIN, clock), clock


@pytest.mark.parametrize(
    ("when", "on"),
    [
        ((2024, 6, 12, 22, 0), True),  # Wednesday 22:00
        ((2024, 6, 13, 6, 59), True),  # Thursday 06:59, after midnight
        ((2024, 6, 13, 7, 0), False),
        ((2024, 6, 13, 12, 0), False),
        ((2024, 6, 13, 20, 59), False),
        ((2024, 6, 13, 21, 0), True),
        ((2024, 6, 12, 23, 59), True),
        ((2024, 6, 13, 0, 0), True),  # midnight itself
    ],
)
def test_a_night_window_is_on_from_its_start_to_its_end_the_next_morning(when, on):
    schedule, clock = bedtime(["21:00-07:00"])
    clock.at(*when)
    assert schedule() is on


def test_transitions_are_found_as_the_clock_moves_on_without_recomputing_between():
    schedule, clock = bedtime(["21:00-07:00"])
    clock.at(2024, 6, 12, 12, 0)
    assert not schedule() and schedule.next_change() == "21:00"
    until = schedule.until
    clock.at(2024, 6, 12, 20, 59)
    assert not schedule() and schedule.until == until  # nothing recomputed
    for when, on in [
        ((2024, 6, 12, 22, 0), True),
        ((2024, 6, 13, 6, 59), True),
        ((2024, 6, 13, 7, 0), False),
        ((2024, 6, 13, 12, 0), False),
    ]:
        clock.at(*when)
        assert schedule() is on, when


@pytest.mark.parametrize(
    ("when", "on"),
    [
        # spring forward: 2024-03-31 02:00 CET -> 03:00 CEST, inside the window
        ((2024, 3, 30, 22, 0), True),
        ((2024, 3, 31, 1, 59), True),
        ((2024, 3, 31, 3, 30), True),
        ((2024, 3, 31, 6, 59), True),
        ((2024, 3, 31, 7, 0), False),
        ((2024, 3, 31, 12, 0), False),
        # fall back: 2024-10-27 03:00 CEST -> 02:00 CET, inside the window
        ((2024, 10, 26, 22, 0), True),
        ((2024, 10, 27, 2, 30), True),
        ((2024, 10, 27, 6, 59), True),
        ((2024, 10, 27, 7, 0), False),
        ((2024, 10, 27, 12, 0), False),
        ((2024, 10, 27, 21, 0), True),
    ],
)
def test_local_times_hold_across_daylight_saving_changes(when, on):
    schedule, clock = bedtime(["21:00-07:00"])
    clock.at(2024, 1, 1, 12, 0)
    schedule()  # computed long before: the clock runs through the change
    clock.at(*when)
    assert schedule() is on


def test_the_end_after_a_dst_change_is_local_seven_not_seven_elapsed_hours():
    schedule, clock = bedtime(["21:00-07:00"])
    clock.at(2024, 10, 26, 22, 0)
    assert schedule()
    end = datetime.datetime.fromtimestamp(schedule.until, BERLIN)
    assert (end.hour, end.minute, end.day) == (7, 0, 27)
    assert schedule.until - clock.now == 10 * 3600  # 9 h of wall clock plus the extra hour


def test_days_pick_which_nights_a_window_starts_on():
    schedule, clock = bedtime(["mon-fri 21:00-07:00", "sat,sun 23:00-08:00"])
    clock.at(2024, 6, 14, 22, 0)  # Friday night
    assert schedule()
    clock.at(2024, 6, 15, 7, 30)  # Saturday morning: Friday's window ended at 07:00
    assert not schedule()
    clock.at(2024, 6, 15, 22, 0)  # Saturday 22:00: the weekend window starts at 23:00
    assert not schedule() and schedule.next_change() == "23:00"
    clock.at(2024, 6, 16, 7, 59)  # Sunday morning, inside Saturday's window
    assert schedule()
    clock.at(2024, 6, 17, 7, 59)  # Monday morning: Sunday's window runs to 08:00
    assert schedule()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"someday 21:00-07:00"', "'someday' is not a day"),
        ('["21:00-25:00"]', "times run from 00:00 to 24:00"),
        ('["at night"]', "is not a window such as"),
        ("[]", "needs at least one window"),
        ("3", "expected a list of windows"),
    ],
)
def test_bad_windows_are_config_errors_naming_the_key(tmp_path, value, message):
    path = write_config(tmp_path, f'[[chain]]\nplugin = "static"\nactive = {value}\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "config.toml: chain[0] (static): active:" in str(err.value)
    assert message in str(err.value)


def test_an_unknown_time_zone_is_a_config_error(tmp_path):
    path = write_config(tmp_path, '[[chain]]\nplugin = "static"\n', 'timezone = "Mars/Olympus"')
    with pytest.raises(ConfigError, match=r"server: .*timezone.*Mars/Olympus"):
        load(path)


def test_outside_its_windows_a_step_passes_the_query_on_and_the_trace_says_until_when():
    schedule, clock = bedtime(["21:00-07:00"])
    blocker = Answer({"example.org": "0.0.0.0"})
    blocker.setup = attrs.evolve(blocker.setup, scope=Scope(active=schedule))
    fallback = Answer({"example.org": "192.0.2.1"})
    chain = Chain([blocker, fallback])
    clock.at(2024, 6, 12, 12, 0)
    q = make_query("example.org")
    q.trace = []
    reply = chain.start(q)
    assert "192.0.2.1" in str(reply.message().answer)
    assert any("inactive until 21:00" in line for line in q.trace)
    clock.at(2024, 6, 12, 22, 0)
    assert "0.0.0.0" in str(chain.start(make_query("example.org")).message().answer)


def test_the_loader_builds_schedules_in_the_server_time_zone(tmp_path):
    path = write_config(
        tmp_path,
        '[[chain]]\nplugin = "static"\nactive = ["mon-fri 21:00-07:00"]\n',
        'timezone = "Europe/Berlin"',
    )
    cfg, registry, _ = load(path)
    (step,) = build_chain(cfg, registry).steps
    active = step.setup.scope.active
    assert active is not None and str(active.tz) == "Europe/Berlin"
    windows = parse_windows(["mon-fri 21:00-07:00"])
    assert step.setup.scope == Scope(active=Schedule(windows, BERLIN))
