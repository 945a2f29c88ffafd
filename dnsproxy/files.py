"""Watching files for change: what the steps that re-read their files compare."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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
