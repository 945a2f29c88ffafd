"""Watching files for change: what the steps that re-read their files compare."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import trio

Stamp = tuple[int, int] | None


def stamp(path: Path) -> Stamp:
    """(mtime_ns, size) of ``path``, None when it cannot be read: a file is re-read when
    its stamp changes (an editor's save, certbot's renewal, a list appearing)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def stamps(paths: Iterable[Path]) -> tuple[Stamp, ...]:
    """The stamp of each of ``paths``, in order."""
    return tuple(stamp(p) for p in paths)


async def watch(
    paths: Sequence[Path], every: float, seen: tuple[Stamp, ...], changed: Callable[[], None]
) -> None:
    """Call ``changed`` whenever the stamps of ``paths`` differ from ``seen`` (those of the
    files as last read), polling every ``every`` seconds. The stamps are taken before
    ``changed`` reads the files, so a write during the read is seen at the next poll; a
    file that fails to load is reported once per change, not at every poll."""
    while True:
        await trio.sleep(every)
        now = stamps(paths)
        if now != seen:
            seen = now
            changed()
