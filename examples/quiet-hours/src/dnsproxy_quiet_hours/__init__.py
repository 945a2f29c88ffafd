"""quiet_hours: a third-party dnsproxy policy plugin (see README.md).

It uses only dnsproxy's public plugin API: a `Step` with an attrs `Options` class, the
wire-level helpers for names and answers, and the `dnsproxy_add_steps` hook.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import attrs

from dnsproxy import wire
from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.options import string_tuple
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_FILTERED, Reply, respond


def _minutes(value: object) -> int:
    """Minutes since midnight from "HH:MM" ("24:00" is the end of the day)."""
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise TypeError('expected a time such as "21:30"')
    hours, sep, minutes = value.partition(":")
    if not (sep and hours.isdigit() and minutes.isdigit()):
        raise ValueError(f"expected HH:MM, got {value!r}")
    total = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or total > 24 * 60:
        raise ValueError(f"{value!r} is not a time of day")
    return total


@attrs.frozen
class Options:
    domains: tuple[str, ...] = attrs.field(converter=string_tuple)
    start: int = attrs.field(default="21:00", converter=_minutes)
    end: int = attrs.field(default="07:00", converter=_minutes)


def _now_minutes() -> int:
    now = datetime.datetime.now()
    return now.hour * 60 + now.minute


class QuietHours(Step):
    """NXDOMAIN for the configured domains while the clock is inside [start, end)."""

    Options = Options

    def __init__(
        self, options: Options, setup: Setup, clock: Callable[[], int] = _now_minutes
    ) -> None:
        super().__init__(options, setup)
        self.keys = frozenset(wire.name_to_key(d) for d in options.domains)
        self.clock = clock
        self.filtered = 0

    def quiet(self) -> bool:
        now, start, end = self.clock(), self.options.start, self.options.end
        return start <= now < end if start <= end else now >= start or now < end

    def query(self, q: wire.Query) -> Reply | None:
        if not any(p in self.keys for p in wire.parents(q.key)) or not self.quiet():
            return None
        self.filtered += 1
        q.note("rule", "quiet_hours")
        q.explain(f"{self.setup.where}: {q.text} is filtered during quiet hours")
        return respond(
            q, wire.NXDOMAIN, ede=[(EDE_FILTERED, "quiet hours")], source=self.setup.name
        )

    def metrics(self) -> list[Metric]:
        return [Metric("filtered", self.filtered, help="queries answered NXDOMAIN")]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("quiet_hours", QuietHours)
