"""Long-lived objects that one Server's steps share, across reloads and between steps.

A plugin keeps no mutable state at module level: two Servers in one process (tests, an
embedding application) must not see each other's state. What must outlive one chain (a
parsed blocklist that a reloaded step attaches at once instead of parsing again) lives
in the `Shared` store its Server owns and hands to every step as ``setup.shared``.

The store also holds the server's secret, from which steps derive their keys (`key`):
one dnsproxy instance has one secret, across reloads and in all its worker processes
(``workers = N``: the supervisor hands its secret to every worker it starts).
"""

from __future__ import annotations

import hashlib
import secrets
import weakref
from typing import Any

SECRET_SIZE = 32  # bytes of a server's secret (a blake2b key: at most 64)


class Shared:
    """Named tables of one Server's long-lived objects; each plugin uses its own names.

    ``weak(name)`` is a table whose values stay only while some step holds them (a parsed
    list the running chain uses): a reload's new steps find them, a list nobody uses any
    more is freed. Steps built outside a Server get a store of their own.

    ``secret`` (random unless given) is the server's: a step uses `key`, never the secret
    itself, so that no key a plugin reveals (a token a client or upstream sees) tells
    anything of another plugin's.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secrets.token_bytes(SECRET_SIZE) if secret is None else secret
        self._weak: dict[str, weakref.WeakValueDictionary[Any, Any]] = {}

    def key(self, use: str, size: int = 32) -> bytes:
        """A key of ``size`` bytes (at most 64) for ``use``, a name the plugin owns (e.g.
        "forward.loop"): a keyed hash of the name under the secret, so the same in every
        process of this server and unrelated to the key of any other use."""
        return hashlib.blake2b(use.encode(), key=self.secret, digest_size=size).digest()

    def weak(self, name: str) -> weakref.WeakValueDictionary[Any, Any]:
        """The table ``name`` (made on first use), holding its values weakly."""
        table = self._weak.get(name)
        if table is None:
            table = self._weak[name] = weakref.WeakValueDictionary()
        return table
