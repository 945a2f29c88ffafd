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

import attrs
import trio

log = logging.getLogger("dnsproxy")


@attrs.define(eq=False)
class Blocking:
    """The pause state of one server; ``paused_until`` is on the Trio clock (inf: no end)."""

    paused_until: float | None = None
    wall_until: float | None = None  # the same end as a Unix time, for the API (None: no end)
    generation: int = 0  # bumped by every pause and resume (the packet cache's answers go)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def pause(self, duration: float | None = None) -> None:
        """Stop blocking for ``duration`` seconds, or until `resume`."""
        if duration is None:
            self.paused_until, self.wall_until = math.inf, None
            log.info("blocking paused until resumed")
        else:
            self.paused_until = trio.current_time() + duration
            self.wall_until = time.time() + duration
            log.info("blocking paused for %g s", duration)
        self.generation += 1
        self._changed.set()

    def resume(self) -> None:
        """Block again now; logs "blocking resumed" if blocking was paused."""
        if self.paused_until is None:
            return
        self.paused_until = self.wall_until = None
        log.info("blocking resumed")
        self.generation += 1
        self._changed.set()

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
            end = self.paused_until
            if end is None or end == math.inf:
                await changed.wait()
                continue
            with trio.move_on_at(end):
                await changed.wait()
            self.active()
