"""Long-lived objects that one Server's steps share, across reloads and between steps.

A plugin keeps no mutable state at module level: two Servers in one process (tests, an
embedding application) must not see each other's state. What must outlive one chain (a
parsed blocklist that a reloaded step attaches at once instead of parsing again) lives
in the `Shared` store its Server owns and hands to every step as ``setup.shared``.
"""

from __future__ import annotations

import weakref
from typing import Any


class Shared:
    """Named tables of one Server's long-lived objects; each plugin uses its own names.

    ``weak(name)`` is a table whose values stay only while some step holds them (a parsed
    list the running chain uses): a reload's new steps find them, a list nobody uses any
    more is freed. Steps built outside a Server get a store of their own.
    """

    def __init__(self) -> None:
        self._weak: dict[str, weakref.WeakValueDictionary[Any, Any]] = {}

    def weak(self, name: str) -> weakref.WeakValueDictionary[Any, Any]:
        """The table ``name`` (made on first use), holding its values weakly."""
        table = self._weak.get(name)
        if table is None:
            table = self._weak[name] = weakref.WeakValueDictionary()
        return table
