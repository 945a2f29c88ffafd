"""cache — answer repeated questions from memory, RFC 2308/8767 correct and bounded.

Description
    Stores the answers that come back through it and answers the same question from memory
    until its TTL runs out. An entry is the answer's wire bytes plus the offset of every
    record's TTL, so a hit is a dictionary lookup, a clock read and (once per second of
    countdown) a copy with the TTLs patched: no dnspython parse and no task.

    * Key: lower-cased name, type, class, DO and CD bits, and which client-scoped steps
      after the cache apply to this client, so per-client policy never leaks through the
      cache (CoreDNS CVE-2024-0874).
    * Positive answers live for the smallest TTL in the message, clamped to
      ``min_ttl``/``max_ttl``; TTLs count down in the answers sent. A TTL with the top bit
      set counts as 0 (RFC 2181 §8); TTL 0 is not cached.
    * Negative answers (NXDOMAIN, NODATA) live for min(SOA TTL, SOA MINIMUM) capped by
      ``max_negative_ttl`` (RFC 2308 §5); without an SOA they are not cached. SERVFAIL is
      cached for ``servfail_ttl`` (RFC 9520) and served with EDE 13. Truncated answers,
      other rcodes, answers to another question and answers with more than ``max_records``
      records are passed on but not cached.
    * ``prefetch``: an entry hit in the last tenth of its life is refreshed in the
      background, one refresh per key at a time, so popular names never miss.
    * ``serve_stale`` (RFC 8767): an expired entry up to ``stale_max_age`` old is refreshed
      first; if the rest of the chain fails or takes longer than ``stale_client_timeout``
      (1.8 s) the client gets the stale answer with TTL 30 and EDE 3 (19 for NXDOMAIN)
      while the refresh goes on. After a failed refresh the stale answer is served
      directly, and the upstreams asked again at most every ``stale_refresh_time``.
    * Identical misses in flight are coalesced by ``forward``: one upstream query each.
    * Bounded: ``max_entries`` with LRU eviction; at most ``max_refreshes`` background
      refreshes at once. SIGUSR1 empties the cache.

Syntax
    ::

        [[chain]]
        plugin = "cache"
        max_entries = 100000
        min_ttl = 0                 # seconds
        max_ttl = 86400
        max_negative_ttl = 3600
        servfail_ttl = 1            # 0 disables; at most 300 s
        max_records = 100           # larger answers are not cached
        prefetch = true
        serve_stale = true
        stale_max_age = "1d"
        stale_client_timeout = 1.8
        stale_refresh_time = 30
        max_refreshes = 256

Metrics
    ``dnsproxy_cache_hits``, ``_misses``, ``_stale`` (stale answers served), ``_evictions``,
    ``_prefetches`` (background refreshes started), counters; ``_entries``, a gauge.

Examples
    A cache in front of the forwarder, never holding answers for more than an hour::

        [[chain]]
        plugin = "cache"
        max_ttl = 3600

        [[chain]]
        plugin = "forward"
        upstreams = ["192.0.2.53"]
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
import trio

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Chain, Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import (
    EDE_CACHED_ERROR,
    EDE_STALE,
    EDE_STALE_NXDOMAIN,
    Reply,
    respond,
)
from dnsproxy.wire import CD, HEADER, OPT, RD, SERVFAIL, TC, Query

U32 = struct.Struct("!I")
SOA = 6
STALE_TTL = 30  # RFC 8767 §4
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
    servfail_ttl: float = attrs.field(
        default=1.0, converter=options.duration, validator=options.in_range(0, 300)
    )
    max_records: int = attrs.field(default=100, validator=options.in_range(1, 10_000))
    prefetch: bool = True
    serve_stale: bool = True
    stale_max_age: float = attrs.field(
        default=86_400.0, converter=options.duration, validator=options.in_range(0, 604_800)
    )
    stale_client_timeout: float = attrs.field(
        default=1.8, converter=options.duration, validator=options.in_range(0.01, 30)
    )
    stale_refresh_time: float = attrs.field(
        default=30.0, converter=options.duration, validator=options.in_range(0, 3600)
    )
    max_refreshes: int = attrs.field(default=256, validator=options.in_range(1, 100_000))

    def __attrs_post_init__(self) -> None:
        if self.min_ttl > self.max_ttl:
            raise ValueError(f"'min_ttl' ({self.min_ttl}) is above max_ttl ({self.max_ttl})")


class Entry:
    """One cached answer: wire bytes with TTL offsets, and the Reply last built from them."""

    __slots__ = (
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
    ) -> None:
        self.wire = data
        self.offsets = offsets
        self.ttl = ttl  # the lifetime it was stored with
        self.expires = expires
        self.stale_until = stale_until
        self.prefetch_at = prefetch_at  # prefetch when a hit sees less life left than this
        self.ede = ede
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
        return Reply(bytes(data), ede=ede, source=source)


class _Refresh:
    """One background refresh of a key; clients of an expired entry wait on ``done``."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Reply | None = None


def client_scopes(chain: Chain, step: Step) -> tuple[Callable[[Query], bool], ...]:
    """The scope tests of steps after ``step`` whose outcome can depend on the client.

    Zone-only scopes depend only on the name, which the key already holds, so they are
    left out (they would only cost time per hit); anything else is kept.
    """
    after = chain.links[chain.steps.index(step) + 1 :]
    return tuple(
        link.in_scope
        for link in after
        if link.in_scope is not None
        and getattr(link.in_scope, "__code__", None) is not None
        and link.in_scope.__code__.co_freevars != ("zone_set",)
    )


def internal_query(q: Query) -> Query:
    """A copy of ``q`` for a background refresh: same question, client and DO/CD bits."""
    ar = 1 if q.edns else 0
    data = (
        HEADER.pack(0, RD | (q.flags & CD), 1, 0, 0, ar)
        + q.key
        + struct.pack("!HH", q.qtype, q.qclass)
    )
    if q.edns:
        data += b"\x00" + struct.pack("!HHIH", OPT, 1232, wire.EDNS_DO if q.do else 0, 0)
    return wire.parse_query(data, q.client, "internal")


class Cache(Step):
    Options = CacheOptions
    clock: Callable[[], float] = time.monotonic  # tests substitute trio.current_time

    def __init__(self, opts: CacheOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self.refreshing: dict[Key, _Refresh] = {}
        self.nursery: trio.Nursery | None = None
        self.views: tuple[Callable[[Query], bool], ...] = ()
        self.hits = self.misses = self.stale = self.evictions = self.prefetches = 0

    @property  # type: ignore[override]
    def chain(self) -> Chain | None:
        return self._chain

    @chain.setter
    def chain(self, chain: Chain | None) -> None:
        """Set by the compiled chain; the client-scoped steps after this one are known now."""
        self._chain = chain
        self.views = client_scopes(chain, self) if chain is not None else ()

    def key(self, q: Query) -> Key:
        if self.views:
            return (q.key, q.qtype, q.qclass, q.cd, q.do, tuple([f(q) for f in self.views]))
        return (q.key, q.qtype, q.qclass, q.cd, q.do)

    # --- the hot path -------------------------------------------------------------------

    def query(self, q: Query) -> Any:
        key = self.key(q) if self.views else (q.key, q.qtype, q.qclass, q.cd, q.do)
        e = self.entries.get(key)
        # The common case costs one comparison: the entry's reply holds until its shown
        # TTL would change, its prefetch point comes, or it expires.
        if e is not None and self.clock() < e.steady_until:
            self.hits += 1
            notes = q.notes
            if notes is None:
                q.notes = {"cache": "hit"}
            else:
                notes["cache"] = "hit"
            return e.reply
        return self._lookup(key, e, q)

    def _lookup(self, key: Key, e: Entry | None, q: Query) -> Any:
        """A miss, an expired entry, or a hit whose TTL, LRU place or prefetch is due."""
        if e is None:
            self.misses += 1
            q.note("cache", "miss")
            return None
        now = self.clock()
        left = e.expires - now
        if left <= 0:
            return self._expired(key, e, q, now)
        self.entries.move_to_end(key)  # LRU order with one-second resolution
        self.hits += 1
        q.note("cache", "hit")
        ttl = int(left)
        if ttl != e.shown:
            e.reply = e.patched(ttl, e.ede)
            e.shown = ttl
        e.steady_until = e.expires - ttl
        if left < e.prefetch_at:
            if key not in self.refreshing:
                self._prefetch(key, q)
        elif e.prefetch_at > 0:
            e.steady_until = min(e.steady_until, e.expires - e.prefetch_at)
        return e.reply

    def _expired(self, key: Key, e: Entry, q: Query, now: float) -> Any:
        if now < e.stale_until:
            if now < e.retry_at:  # a refresh failed lately: do not ask again yet
                return self._serve_stale(e, q)
            return AWAIT
        del self.entries[key]
        self.misses += 1
        q.note("cache", "miss")
        return None

    def response(self, q: Query, reply: Reply) -> Reply:
        return self.store(self.key(q), reply)

    # --- storing ------------------------------------------------------------------------

    def store(self, key: Key, reply: Reply) -> Reply:
        """Cache ``reply`` under ``key`` if RFC 2308/9520 and our bounds allow it.

        Returns the reply to pass on: with the TTLs we cache it for (clamped, negative TTL),
        so clients downstream do not keep it longer than we do.
        """
        entry = self._entry(key, reply)
        if entry is None:
            return reply
        entries = self.entries
        entries[key] = entry
        entries.move_to_end(key)
        if len(entries) > self.options.max_entries:
            entries.popitem(last=False)
            self.evictions += 1
        if not entry.offsets:
            return reply
        return entry.patched(entry.ttl, reply.ede, reply.source)

    def _entry(self, key: Key, reply: Reply) -> Entry | None:
        data = reply.wire
        opts = self.options
        if len(data) < 12 or data[2] & (TC >> 8) or not _same_question(data, key):
            return None
        rcode = data[3] & 0x0F
        now = self.clock()
        if rcode == SERVFAIL:
            if not opts.servfail_ttl:
                return None
            ede = (*reply.ede, (EDE_CACHED_ERROR, "cached upstream failure"))
            return Entry(data, (), 0, now + opts.servfail_ttl, 0.0, -1.0, ede)
        if rcode not in GOOD_RCODES:
            return None
        try:
            recs = reply.records()
        except ValueError:
            return None
        if len(recs) > opts.max_records:
            return None
        ttl = _ttl(data, recs, rcode, opts.max_negative_ttl)
        if ttl <= 0:
            return None
        ttl = min(max(ttl, opts.min_ttl), opts.max_ttl)
        expires = now + ttl
        stale_until = expires + opts.stale_max_age if opts.serve_stale else expires
        prefetch_at = ttl * PREFETCH_FRACTION if opts.prefetch and ttl >= 2 else -1.0
        offsets = tuple(r.ttl_off for r in recs)
        return Entry(data, offsets, ttl, expires, stale_until, prefetch_at, reply.ede)

    # --- refreshes: prefetch and serve-stale ---------------------------------------------

    def _prefetch(self, key: Key, q: Query) -> None:
        if self._start_refresh(key, q) is not None:
            self.prefetches += 1
            q.explain(f"{self.setup.where}: prefetching")

    def _start_refresh(self, key: Key, q: Query) -> _Refresh | None:
        """Refresh ``key`` in the background; None without a nursery or over the bound."""
        if self.nursery is None or len(self.refreshing) >= self.options.max_refreshes:
            return None
        flight = self.refreshing[key] = _Refresh()
        self.nursery.start_soon(self._refresh, key, internal_query(q), flight)
        return flight

    async def _refresh(self, key: Key, q: Query, flight: _Refresh) -> None:
        try:
            flight.result = await self._ask(key, q)
        finally:
            del self.refreshing[key]
            flight.done.set()

    async def _ask(self, key: Key, q: Query) -> Reply | None:
        """Run the rest of the chain; store a good answer, else hold off retries."""
        assert self.chain is not None
        try:
            reply = await self.chain.pass_on(self, q)
        except Exception as exc:  # a failing step must not end the refresh task badly
            self.log.warning("%s: refresh failed: %s", self.setup.where, exc)
            reply = None
        if reply is not None and reply.rcode in GOOD_RCODES:
            return self.store(key, reply)
        else:
            e = self.entries.get(key)
            if e is not None:
                e.retry_at = self.clock() + self.options.stale_refresh_time
        return reply

    async def resolve(self, q: Query) -> Reply | None:
        """An expired entry that may be served stale: refresh, or go stale after 1.8 s.

        The refresh runs in the background nursery so that it outlives the client's wait;
        without one (or over ``max_refreshes``) it runs here and is cut at the timeout.
        """
        key = self.key(q)
        reply = None
        with trio.move_on_after(self.options.stale_client_timeout):
            flight = self.refreshing.get(key) or self._start_refresh(key, q)
            if flight is None:
                reply = await self._ask(key, q)
            else:
                await flight.done.wait()
                reply = flight.result
        if reply is not None and reply.rcode in GOOD_RCODES:
            q.note("cache", "miss")
            return reply
        e = self.entries.get(key)
        if e is not None and e.expires <= self.clock() < e.stale_until:
            return self._serve_stale(e, q)
        # The entry went (flush, eviction) while we waited: answer as a plain miss would.
        if reply is None:
            reply = await self._ask(key, q)
        return reply if reply is not None else respond(q, SERVFAIL, source="cache")

    def _serve_stale(self, e: Entry, q: Query) -> Reply:
        self.stale += 1
        q.note("cache", "stale")
        q.explain(f"{self.setup.where}: serving a stale answer")
        if e.stale_reply is None:
            nx = e.wire[3] & 0x0F == wire.NXDOMAIN
            ede = (EDE_STALE_NXDOMAIN, "stale NXDOMAIN") if nx else (EDE_STALE, "stale answer")
            e.stale_reply = e.patched(STALE_TTL, (*e.ede, ede))
        return e.stale_reply

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                await trio.sleep_forever()
            finally:
                self.nursery = None

    def flush(self) -> None:
        self.entries.clear()

    def metrics(self) -> list[Metric]:
        return [
            Metric("hits", self.hits, help="answers served from the cache"),
            Metric("misses", self.misses, help="queries the cache could not answer"),
            Metric("stale", self.stale, help="stale answers served (RFC 8767)"),
            Metric("evictions", self.evictions, help="entries dropped to stay in max_entries"),
            Metric("prefetches", self.prefetches, help="background refreshes before expiry"),
            Metric("entries", len(self.entries), "gauge", help="entries held"),
        ]


def _same_question(data: bytes, key: Key) -> bool:
    """Whether the message answers the question of ``key`` (name, type and class)."""
    name = key[0]
    end = 12 + len(name)
    return (
        data[5] == 1
        and data[4] == 0
        and data[12:end].lower() == name
        and data[end : end + 4] == struct.pack("!HH", key[1], key[2])
    )


def _ttl(data: bytes, recs: list[wire.Record], rcode: int, max_negative: int) -> int:
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


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("cache", Cache)
