"""Cache entries: what may be cached, for how long, and the wire bytes a hit is served from.

Nothing here parses with dnspython: the lifetime is read from the record TTLs and the SOA's
MINIMUM field at offsets found by `dnsproxy.wire.records`.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

from dnsproxy import options, wire
from dnsproxy.reply import EDE_CACHED_ERROR, Reply
from dnsproxy.wire import SERVFAIL, SOA, TC

U32 = struct.Struct("!I")
PREFETCH_FRACTION = 0.1  # refresh when a hit comes in the last tenth of an entry's life
NEVER = float("inf")
GOOD_RCODES = (wire.NOERROR, wire.NXDOMAIN)

Key = tuple[Any, ...]


@attrs.frozen
class CacheOptions:
    max_entries: int = attrs.field(default=100_000, validator=options.in_range(1, 50_000_000))
    min_ttl: int = attrs.field(default=0, validator=options.in_range(0, 604_800))
    max_ttl: int = attrs.field(default=86_400, validator=options.in_range(1, 604_800))
    max_negative_ttl: int = attrs.field(default=3600, validator=options.in_range(0, 86_400))
    servfail_ttl: float = options.seconds(1.0, 0, 300)
    max_records: int = attrs.field(default=100, validator=options.in_range(1, 10_000))
    prefetch: bool = True
    serve_stale: bool = True
    stale_max_age: float = options.seconds(86_400.0, 0, 604_800)
    stale_client_timeout: float = options.seconds(1.8, 0.01, 30)
    stale_refresh_time: float = options.seconds(30.0, 0, 3600)
    max_refreshes: int = attrs.field(default=256, validator=options.in_range(1, 100_000))

    def __attrs_post_init__(self) -> None:
        if self.min_ttl > self.max_ttl:
            raise ValueError(f"min_ttl {self.min_ttl} is above max_ttl {self.max_ttl}")


class Entry:
    """One cached answer: wire bytes with TTL offsets, and the Reply last built from them."""

    __slots__ = (
        "blocked",
        "ede",
        "expires",
        "offsets",
        "prefetch_at",
        "reply",
        "retry_at",
        "shown",
        "stale_reply",
        "stale_until",
        "steady_until",
        "ttl",
        "wire",
    )

    def __init__(
        self,
        data: bytes,
        offsets: tuple[int, ...],
        ttl: int,
        expires: float,
        stale_until: float,
        prefetch_at: float,
        ede: tuple[tuple[int, str], ...],
        blocked: bool,
    ) -> None:
        self.wire = data
        self.offsets = offsets
        self.ttl = ttl  # the lifetime it was stored with
        self.expires = expires
        self.stale_until = stale_until
        self.prefetch_at = prefetch_at  # prefetch when a hit sees less life left than this
        self.ede = ede
        self.blocked = blocked  # a policy's answer, with or without an EDE saying so
        self.retry_at = 0.0  # after a failed refresh: serve stale without asking until then
        self.shown = -1  # the TTL in ``reply``; -1 before the first hit
        self.steady_until = -NEVER  # until then a hit just returns ``reply`` (see query)
        self.reply: Reply | None = None
        self.stale_reply: Reply | None = None

    def patched(self, ttl: int, ede: tuple[tuple[int, str], ...], source: str = "cache") -> Reply:
        """A Reply with every TTL set to ``ttl``."""
        data = bytearray(self.wire)
        pack = U32.pack_into
        for off in self.offsets:
            pack(data, off, ttl)
        return Reply(bytes(data), ede=ede, source=source, blocked=self.blocked)

    def for_type(self, qtype: int) -> Entry:
        """A copy answering the same name for ``qtype`` (for NXDOMAIN, valid for all types)."""
        data = bytearray(self.wire)
        qname_end = wire.skip_name(data, 12)
        struct.pack_into("!H", data, qname_end, qtype)
        return Entry(
            bytes(data),
            self.offsets,
            self.ttl,
            self.expires,
            self.stale_until,
            self.prefetch_at,
            self.ede,
            self.blocked,
        )


def nxdomain_key(key: Key) -> Key:
    """Where an NXDOMAIN is also kept: the same key with the type replaced by -1 (any)."""
    return (key[0], -1, *key[2:])


def make_entry(key: Key, reply: Reply, opts: CacheOptions, now: float) -> Entry | None:
    """An entry for ``reply`` if RFC 2308/9520 and the bounds in ``opts`` allow caching it."""
    if not reply.cacheable:  # about this query's path, not the name (a forwarding loop)
        return None
    data = reply.wire
    if len(data) < 12 or data[2] & (TC >> 8) or not same_question(data, key):
        return None
    if data[2] & (wire.AA >> 8):  # an answer from our memory is not authoritative
        data = data[:2] + bytes([data[2] & ~(wire.AA >> 8)]) + data[3:]
    rcode = data[3] & 0x0F
    if rcode == SERVFAIL:
        if not opts.servfail_ttl:
            return None
        ede = (*reply.ede, (EDE_CACHED_ERROR, "cached upstream failure"))
        return Entry(data, (), 0, now + opts.servfail_ttl, 0.0, -1.0, ede, reply.blocked)
    if rcode not in GOOD_RCODES:
        return None
    try:
        recs = reply.records()
    except ValueError:
        return None
    if len(recs) > opts.max_records:
        return None
    ttl = lifetime(data, recs, rcode, opts.max_negative_ttl)
    if ttl <= 0:
        return None
    ttl = min(max(ttl, opts.min_ttl), opts.max_ttl)
    expires = now + ttl
    stale_until = expires + opts.stale_max_age if opts.serve_stale else expires
    prefetch_at = ttl * PREFETCH_FRACTION if opts.prefetch and ttl >= 2 else -1.0
    offsets = tuple(r.ttl_off for r in recs)
    return Entry(data, offsets, ttl, expires, stale_until, prefetch_at, reply.ede, reply.blocked)


def same_question(data: bytes, key: Key) -> bool:
    """Whether the message answers the question of ``key`` (name, type and class)."""
    name = key[0]
    end = 12 + len(name)
    return (
        data[5] == 1
        and data[4] == 0
        and data[12:end].lower() == name
        and data[end : end + 4] == struct.pack("!HH", key[1], key[2])
    )


def lifetime(data: bytes, recs: list[wire.Record], rcode: int, max_negative: int) -> int:
    """The lifetime of an answer: its smallest TTL, or the RFC 2308 negative TTL."""
    ttl = NEVER
    for r in recs:
        t = U32.unpack_from(data, r.ttl_off)[0]
        ttl = min(ttl, 0 if t & 0x8000_0000 else t)
    answers = sum(1 for r in recs if r.section == 1)
    if rcode == wire.NXDOMAIN or answers == 0:
        soa = next((r for r in recs if r.section == 2 and r.rtype == SOA), None)
        if soa is None or soa.rdlen < 22:
            return 0  # RFC 2308 §5: a negative answer without SOA is not cached
        minimum = U32.unpack_from(data, soa.end - 4)[0]
        ttl = min(ttl, minimum, max_negative)
    return 0 if ttl == NEVER else int(ttl)
