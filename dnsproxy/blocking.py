"""Whether blocking is paused: the user's intent, owned by the Server across reloads.

The HTTP API pauses and resumes blocking here; every step that blocks (the blocklist)
reads the same object through `Setup.blocking`, so a step built by a reload honours a
pause that began before it, and the pause ends exactly once, logged, whether by the
API, by its timer or by the first query after it ran out.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

log = logging.getLogger("dnsproxy")


@attrs.define(eq=False)
class Blocking:
    """The pause state of one server; ``paused_until`` is on the Trio clock (inf: no end)."""

    paused_until: float | None = None
    wall_until: float | None = None  # the same end as a Unix time, for the API (None: no end)
    # Pauses of one group of clients ([groups]): name -> (Trio clock end, Unix end or None).
    groups: dict[str, tuple[float, float | None]] = attrs.field(factory=dict)
    generation: int = 0  # bumped by every pause and resume, of all or of a group (the
    # packet cache forgets its answers)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    # Called after every change (a `workers.Supervisor` pushes the state to its workers).
    on_change: Callable[[], None] | None = None

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        if self.on_change is not None:
            self.on_change()

    def export(self) -> dict[str, object]:
        """The pauses as seconds left (inf: until resumed), for `restore` in another
        process (another Trio clock)."""
        now = trio.current_time()
        until = self.paused_until
        return {
            "all": None if until is None else (until - now, self.wall_until),
            "groups": {g: (end - now, wall) for g, (end, wall) in self.groups.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take the pauses `export` gave, as they are now (no log line: the exporting
        process logged the change)."""
        now = trio.current_time()
        whole = state["all"]
        if whole is None:
            self.paused_until = self.wall_until = None
        else:
            left, self.wall_until = whole
            self.paused_until = now + left
        self.groups = {g: (now + left, wall) for g, (left, wall) in state["groups"].items()}
        self._bump()

    def pause_group(self, group: str, duration: float | None = None) -> None:
        """Stop blocking for the clients of ``group`` for ``duration`` seconds (or until
        `resume_group`)."""
        if duration is None:
            self.groups[group] = (math.inf, None)
            log.info("blocking paused for group %s until resumed", group)
        else:
            self.groups[group] = (trio.current_time() + duration, time.time() + duration)
            log.info("blocking paused for group %s for %g s", group, duration)
        self._bump()

    def resume_group(self, group: str) -> None:
        """Block the clients of ``group`` again now."""
        if self.groups.pop(group, None) is not None:
            log.info("blocking resumed for group %s", group)
            self._bump()

    def paused_for(self, groups: frozenset[str]) -> bool:
        """Whether a pause of one of ``groups`` holds now (pauses that ran out end here).
        Callers check ``self.groups`` first, so with no group paused this is never called."""
        now = trio.current_time()
        paused = False
        for group in groups & self.groups.keys():
            if now < self.groups[group][0]:
                paused = True
            else:
                self.resume_group(group)
        return paused

    def group_status(self) -> dict[str, dict[str, object]]:
        """The API's view of group pauses: group -> ``disabled_until``, ``seconds_left``."""
        now = trio.current_time()
        out = {}
        for group, (end, wall) in list(self.groups.items()):
            if now >= end:
                self.resume_group(group)
                continue
            out[group] = {
                "disabled_until": wall,
                "seconds_left": None if end == math.inf else round(end - now, 1),
            }
        return out

    def pause(self, duration: float | None = None) -> None:
        """Stop blocking for ``duration`` seconds, or until `resume`."""
        if duration is None:
            self.paused_until, self.wall_until = math.inf, None
            log.info("blocking paused until resumed")
        else:
            self.paused_until = trio.current_time() + duration
            self.wall_until = time.time() + duration
            log.info("blocking paused for %g s", duration)
        self._bump()

    def resume(self) -> None:
        """Block again now; logs "blocking resumed" if blocking was paused."""
        if self.paused_until is None:
            return
        self.paused_until = self.wall_until = None
        log.info("blocking resumed")
        self._bump()

    def active(self) -> bool:
        """Whether blocking applies now (a pause that ran out is ended here)."""
        if self.paused_until is None:
            return True
        if trio.current_time() < self.paused_until:
            return False
        self.resume()
        return True

    def seconds_left(self) -> float | None:
        """Seconds until a timed pause ends; None when not paused or paused without end."""
        if self.active() or self.paused_until is None or self.paused_until == math.inf:
            return None
        return max(0.0, self.paused_until - trio.current_time())

    def status(self) -> dict[str, object]:
        """The API's view: ``disabled_until`` (Unix time), ``seconds_left``, ISO-8601 (UTC)."""
        enabled = self.active()
        left = self.seconds_left()
        until = None if enabled else self.wall_until
        iso = None
        if until is not None:
            stamp = datetime.datetime.fromtimestamp(until, datetime.UTC)
            iso = stamp.isoformat(timespec="seconds").replace("+00:00", "Z")
        return {
            "enabled": enabled,
            "disabled_until": until,
            "seconds_left": None if left is None else round(left, 1),
            "disabled_until_iso": iso,
        }

    async def run(self) -> None:
        """End timed pauses on time, so "blocking resumed" is logged with no query arriving."""
        while True:
            changed = self._changed = trio.Event()
            ends = [e for e, _ in self.groups.values()]
            if self.paused_until is not None:
                ends.append(self.paused_until)
            end = min(ends, default=math.inf)
            if end == math.inf:
                await changed.wait()
                continue
            with trio.move_on_at(end):
                await changed.wait()
            self.active()
            self.group_status()
