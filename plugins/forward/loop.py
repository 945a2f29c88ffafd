"""Forwarding loops through other dnsproxy instances: a hop token in a private EDNS option.

Each dnsproxy on a path appends its token to the option (local-use range, RFC 6891 §9); a
query carrying our own token has looped. The token is a keyed hash of the question under
the server's key for this use (`LoopKey`, from ``setup.shared.key``), so a client cannot
make one up, one seen by an upstream is good for that question only, a second server in
the same process forwarding to this one is a hop, not a loop, and the workers of one
server (``workers = N``) know each other's tokens: a loop through two of them is caught
at its first return.
"""

from __future__ import annotations

import hashlib

from dnsproxy.wire import QTYPE_CLASS, Query, edns_option

LOOP_OPTION = 65053
TOKEN_SIZE = 8
MAX_HOPS = 8
LOOP_KEY_USE = "forward.loop"  # the name of the loop key, `Shared.key`
OUR_HOP = QTYPE_CLASS.pack(LOOP_OPTION, TOKEN_SIZE)  # the option's header for our token alone


class LoopKey:
    """A server's loop key, as a keyed hash with the key already absorbed: only ever
    copied, never updated itself (a copy costs a third of keying a new one)."""

    __slots__ = ("keyed",)

    def __init__(self, key: bytes) -> None:
        self.keyed = hashlib.blake2b(key=key, digest_size=TOKEN_SIZE)


def loop_token(q: Query, key: LoopKey) -> bytes:
    """Our hop token for ``q``'s question: only this server can make it."""
    h = key.keyed.copy()
    h.update(q.key + QTYPE_CLASS.pack(q.qtype, q.qclass))
    return h.digest()


def loop_marker(q: Query, key: LoopKey) -> bytes | None:
    """The loop option to send upstream, or None if this query already passed through us.

    Only our own token counts. The hops of other proxies are passed on (their loops are
    theirs to detect), the newest `MAX_HOPS` - 1 of them; an option that is not a list of
    tokens came from a client and is dropped.
    """
    token = loop_token(q, key)
    if not q.edns_options:  # the common case: the first hop
        return OUR_HOP + token
    hops = next((data for code, data in q.edns_options if code == LOOP_OPTION), None)
    if hops is None or len(hops) % TOKEN_SIZE:
        return edns_option(LOOP_OPTION, token)
    for i in range(0, len(hops), TOKEN_SIZE):
        if hops[i : i + TOKEN_SIZE] == token:
            return None
    return edns_option(LOOP_OPTION, hops[-(MAX_HOPS - 1) * TOKEN_SIZE :] + token)
