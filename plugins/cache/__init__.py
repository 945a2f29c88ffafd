"""cache — answer repeated questions from memory, RFC 2308/8767 correct and bounded.

The step: the hit path (`Cache.query`, one dictionary lookup and one clock comparison in
the common case), storing on the way back (`Cache.response`), and the background work
(prefetch, serve-stale refreshes) in the nursery of `Cache.run`. What may be cached and for
how long is in `store`. README.md beside this file documents options, metrics, examples.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from dnsproxy import wire
from dnsproxy.chain import AWAIT, Chain, Metric, Scope, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_STALE, EDE_STALE_NXDOMAIN, Reply, respond
from dnsproxy.wire import SERVFAIL, Query

from .store import GOOD_RCODES, CacheOptions, Entry, Key, make_entry, nxdomain_key

STALE_TTL = 30  # RFC 8767 §4


class _Refresh:
    """One background refresh of a key; clients of an expired entry wait on ``done``."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Reply | None = None


class Cache(Step):
    Options = CacheOptions
    pure = True
    clock: Callable[[], float] = time.monotonic  # tests substitute trio.current_time

    def __init__(self, opts: CacheOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self.refreshing: dict[Key, _Refresh] = {}
        self.nursery: trio.Nursery | None = None
        # The scopes of later steps that depend on the client: an answer is cached per
        # client view, i.e. per tuple of their verdicts (`key`). Zone-only scopes depend
        # only on the name, which the key holds already.
        self.view_scopes: tuple[Scope, ...] = ()
        self.views: tuple[Callable[[Query], bool], ...] = ()
        self.hits = self.misses = self.stale = self.evictions = self.prefetches = 0

    def attached(self, chain: Chain) -> None:
        self.view_scopes = tuple(s.scope for s in chain.after(self) if s.scope.depends_on_client)
        self.views = tuple(s.match for s in self.view_scopes if s.match is not None)

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
            e = self._from_nxdomain(key)
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
            e.reply = reply = e.patched(ttl, e.ede)
            e.wire = reply.wire  # keep one copy: every TTL is patched again anyway
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

    def packet_lifetime(self, q: Query) -> tuple[float, float, int] | None:
        """The hit just served to ``q`` holds until its prefetch point (or expiry): then
        queries must reach this step again, to prefetch, refresh or serve stale."""
        e = self.entries.get(self.key(q))
        if e is None or e.shown < 0:
            return None
        left = e.expires - self.clock()
        hold = left - e.prefetch_at if e.prefetch_at > 0 else left
        return (hold, left, e.shown) if hold > 0 else None

    def packet_recount(self, q: Query, reply: Reply) -> Callable[[], None]:
        """A replay of a hit this step served is one more hit."""
        return self._count_hit

    def _count_hit(self) -> None:
        self.hits += 1

    # --- storing ------------------------------------------------------------------------

    def store(self, key: Key, reply: Reply) -> Reply:
        """Cache ``reply`` under ``key`` if RFC 2308/9520 and our bounds allow it.

        Returns the reply to pass on: with the TTLs we cache it for (clamped, negative TTL),
        so clients downstream do not keep it longer than we do.
        """
        entry = make_entry(key, reply, self.options, self.clock())
        if entry is None:
            return reply
        self._insert(key, entry)
        if not entry.offsets:
            return reply
        if reply.wire[3] & 0x0F == wire.NXDOMAIN:
            self._insert(nxdomain_key(key), entry)
        return entry.patched(entry.ttl, reply.ede, reply.source)

    def _insert(self, key: Key, entry: Entry) -> None:
        entries = self.entries
        entries[key] = entry
        entries.move_to_end(key)
        if len(entries) > self.options.max_entries:
            entries.popitem(last=False)
            self.evictions += 1

    def _from_nxdomain(self, key: Key) -> Entry | None:
        """An entry for ``key`` from a live NXDOMAIN for its name and another type.

        RFC 2308 §5: a name that does not exist does not exist for any type, so the
        AAAA query that follows an A query for a missing name needs no upstream query.
        """
        nx = self.entries.get(nxdomain_key(key))
        if nx is None or nx.expires <= self.clock():
            return None
        entry = nx.for_type(key[1])
        self._insert(key, entry)
        return entry

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
        self.nursery.start_soon(self._refresh, key, q.derive(own=True), flight)
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

    def inherit(self, previous: Step) -> None:
        """Take over the entries and counters of the cache this one replaces on reload.

        Keys hold one value per view (a client-scoped step after the cache). An entry made
        in the scope of a view that no longer exists is dropped, and every entry is dropped
        if a view is new (its value for the entry is unknown).
        """
        if not isinstance(previous, Cache):
            return
        self.hits, self.misses = previous.hits, previous.misses
        self.stale, self.evictions = previous.stale, previous.evictions
        self.prefetches = previous.prefetches
        old, new = previous.view_scopes, self.view_scopes
        if old == new:
            self.entries = previous.entries
            return
        if any(view not in old for view in new):
            return
        pick = [old.index(view) for view in new]
        gone = [i for i, view in enumerate(old) if view not in new]
        for key, entry in previous.entries.items():
            values = key[5] if len(key) > 5 else ()
            if any(values[i] for i in gone):
                continue
            if new:
                self.entries[(*key[:5], tuple(values[i] for i in pick))] = entry
            else:
                self.entries[key[:5]] = entry

    def metrics(self) -> list[Metric]:
        return [
            Metric("hits", self.hits, help="answers served from the cache"),
            Metric("misses", self.misses, help="queries the cache could not answer"),
            Metric("stale", self.stale, help="stale answers served (RFC 8767)"),
            Metric("evictions", self.evictions, help="entries dropped to stay in max_entries"),
            Metric("prefetches", self.prefetches, help="background refreshes before expiry"),
            Metric("entries", len(self.entries), "gauge", help="entries held"),
        ]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("cache", Cache)
