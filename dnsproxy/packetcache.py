"""The packet cache: the chain's replies replayed from the bytes a client sent.

A question the chain already answered for the same client view is answered without
`parse_query`, the step walk or `finalize`: the query's bytes after the ID (the name
lower-cased) and the client's view are the key; the stored reply is copied with the
client's ID and question (its case) put back and, when a cache step made it, its TTLs
aged as that step ages them. What is stored, and what still happens on a replay:

- Only a reply the chain gave without I/O (so nothing changed while it ran), with rcode
  NOERROR or NXDOMAIN, not truncated, `Reply.cacheable`, to a plain query: UDP, TCP, DoT
  or DoH (each its own entries), without a DoT/DoH client identifier (views are per
  address: such a query is neither replayed nor stored), one uncompressed question, no
  EDNS option but padding and cookie, not traced, not a zone transfer. Equal bytes make
  equal queries, so a replay needs no other check.
- Every step in the query's scope must be `Step.pure` up to the one that answered (the
  reply's ``source``), or up to a step that keeps answers for the steps after it
  (`Step.packet_lifetime`, the cache): then the entry lives until that step would prefetch
  or let it expire, and serve-stale and prefetch stay its business. A step that must see
  every response (`Step.packet_account`, ratelimit) is charged on every replay through
  `Step.packet_charge`, which may slip or drop it as the step would.
- A client's view is the ACL's verdict and whether each client-dependent scope of the chain
  takes it: worked out once per client address (`view`), it is part of the key, so a reply
  made for a client in a step's scope is never replayed to one outside it. A step's
  ``active`` schedule is left out of views: no entry outlives the next change of any
  schedule in the chain. A step whose answers depend on anything else must not be pure,
  or must call `Step.changed` when they change.
- Entries go at once when the chain is replaced (a reload builds a new packet cache), when
  a step calls `Step.changed` (a list or file reloaded), when blocking is paused or resumed
  (for all or for a group), when the client records change (leases, PTR answers: views are
  worked out again), and on `clear` (`Server.flush`: SIGUSR1, the HTTP API, the
  dashboard's allow/block).
- A replay counts in the metrics of the step whose answer it is (`Step.packet_recount`).
- At most ``[server] packet_cache_size`` entries; 0 turns it off. A full cache admits a
  new entry (dropping the oldest) only for one store in `ADMIT_WHEN_FULL`, at random:
  strict oldest-first would keep nothing of a set of names cycled just past the size (each
  entry dropped right before it is asked again: 0 hits for 10,001 names in 10,000 slots),
  and a flood of one-off names would flush every popular entry. Sampled admission keeps
  most of such a set, lets a flood replace only a fraction, and still lets a new working
  set in over a few of its misses.
- Observers see every replayed query, with the source of the step that made the reply.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from dnsproxy import wire
from dnsproxy.chain import Step, _overrides
from dnsproxy.reply import Reply, finalize
from dnsproxy.wire import Query, parse_query

if TYPE_CHECKING:
    from dnsproxy.server import Sender, Server

PLAIN_OPTIONS = frozenset((wire.PADDING_OPTION, wire.COOKIE_OPTION))  # replayable EDNS options
KEPT_RCODES = (wire.NOERROR, wire.NXDOMAIN)
TRANSFERS = (251, 252)  # IXFR, AXFR
ADMIT_WHEN_FULL = 8  # a full cache admits one store in this many (module docstring)
TRANSPORTS = {"udp": b"u", "tcp": b"t", "tls": b"s", "https": b"h"}  # the first byte of a key
U32 = struct.Struct("!I")
H2 = struct.Struct("!HH")

Charge = Callable[[str, Any], Callable[[Query, Reply], Reply | None] | None]

# What the store walk makes of a step in scope.
PURE, KEEPER, ACCOUNTANT, OPAQUE = range(4)


class Entry:
    """One stored reply: the bytes around the question, and how to age and account it."""

    __slots__ = (
        "accounts",
        "base",
        "due",
        "expires",
        "head",
        "notes",
        "offsets",
        "qclass",
        "qend",
        "qtype",
        "recount",
        "reply",
        "shown",
        "tail",
    )

    def __init__(self, out: bytes, qend: int, q: Query, reply: Reply) -> None:
        self.head = out[2:12]  # the reply's flags and counts
        self.qend = qend  # where the question's name ends (client bytes go in 12:qend)
        self.tail = out[qend:]  # type, class, records, OPT: TTLs as last shown
        self.qtype = q.qtype
        self.qclass = q.qclass
        self.notes = dict(q.notes) if q.notes else None
        self.reply = reply  # what observers are shown, and what `packet_charge` may change
        self.accounts: tuple[tuple[Charge, Any], ...] = ()
        self.recount: Callable[[], None] | None = None  # the answering step's counter
        self.expires: float | None = None  # None: holds until invalidated
        self.due: float | None = None  # when a replay must first see `PacketCache._tick`
        self.base = 0.0  # when the aged TTLs reach 0 (packet cache clock)
        self.offsets: tuple[int, ...] = ()  # TTLs to age, as offsets into ``tail``
        self.shown = -1

    def retime(self, ttl: int) -> None:
        """Show ``ttl`` in every aged TTL."""
        tail = bytearray(self.tail)
        for off in self.offsets:
            U32.pack_into(tail, off, ttl)
        self.tail = bytes(tail)
        self.shown = ttl


class PacketCache:
    """The packet cache of one chain (a reload builds another)."""

    clock: Callable[[], float] = time.monotonic  # tests substitute trio.current_time

    def __init__(self, server: Server, size: int) -> None:
        self.server = server
        self.chain = server.chain
        self.blocking = server.blocking
        self.clients = server.clients
        self.size = size
        self.admit = random.Random()  # for the admission of a store into a full cache
        self.entries: dict[bytes, Entry] = {}
        self.views: dict[tuple[str, str], bytes] = {}  # (address, transport): key prefix
        self.view_ids: dict[tuple[bool, ...], int] = {}
        self.generation = self._generations()
        self.stats = server.stats
        self.hits_before = server.stats.packet_hits
        # The client-only part of each client-dependent scope: a client's view. Schedules
        # are left out here: they change with time, not with the client (see `schedules`).
        self.view_tests = tuple(
            match
            for step in self.chain.steps
            if step.setup.scope.depends_on_client
            and (match := attrs.evolve(step.setup.scope, zones=(), active=None).match) is not None
        )
        # The chain's step schedules (``active``): no entry outlives the next change of one.
        self.schedules = tuple(
            active for step in self.chain.steps if (active := step.setup.scope.active) is not None
        )
        self.walk = tuple((link.in_scope, link.step, _role(link.step)) for link in self.chain.links)

    @property
    def hits(self) -> int:
        """Queries this packet cache answered (limited replays are not counted)."""
        return self.stats.packet_hits - self.hits_before

    # --- the hot path -------------------------------------------------------------------

    def answer(self, data: bytes, client: tuple[str, int], transport: str, send: Sender) -> bool:
        """Answer ``data`` if its reply is here (True), else leave it to the chain.

        ``send`` is called before this returns, if at all (the UDP listener relies on it).
        """
        host = client[0]
        prefix = self.views.get((host, transport))
        if prefix is None:
            prefix = self._view(host, transport)
        end = data.find(0, 12)
        if not prefix or end < 0:
            return False
        if (
            self.chain.generation + self.blocking.generation + self.clients.generation
            != self.generation
        ):
            self.clear()
            return False
        key = prefix + data[2:end].lower() + data[end:]
        e = self.entries.get(key)
        if e is None:
            return False
        if e.due is not None:
            now = self.clock()
            if now >= e.due and not self._tick(e, key, now):
                return False
        qend = e.qend
        out = b"".join((data[:2], e.head, data[12:qend], e.tail))
        observers = self.server._observers
        start = time.monotonic() if observers else 0.0
        if e.accounts:
            for charge, account in e.accounts:
                finish = charge(host, account)
                if finish is not None:
                    self._limited(e, finish, data, client, transport, send, out, start)
                    return True
        stats = self.stats
        stats.queries += 1
        stats.packet_hits += 1
        if e.recount is not None:
            e.recount()
        send(out)
        if observers:
            msg_id, flags = H2.unpack_from(data)
            q = Query(data, msg_id, flags, data[12:qend], e.qtype, e.qclass, qend + 4, client,
                      transport)  # fmt: skip
            q.notes = dict(e.notes) if e.notes else None
            elapsed = time.monotonic() - start
            for observe in observers:
                observe(q, e.reply, elapsed)
        return True

    def _tick(self, e: Entry, key: bytes, now: float) -> bool:
        """At ``e.due``: forget ``e`` if it expired (False), else age its TTLs to ``now``
        and note when to look again."""
        expires = e.expires
        assert expires is not None  # ``due`` is set only with ``expires``
        if now >= expires:
            del self.entries[key]
            return False
        if e.offsets:
            ttl = int(e.base - now)
            if ttl != e.shown:
                e.retime(ttl)
            e.due = min(expires, e.base - e.shown)  # when int(base - now) changes
        else:
            e.due = expires
        return True

    def _limited(
        self,
        e: Entry,
        finish: Callable[[Query, Reply], Reply | None],
        data: bytes,
        client: tuple[str, int],
        transport: str,
        send: Sender,
        out: bytes,
        start: float,
    ) -> None:
        """A replay a step limits (a slip, a drop): it decides on the parsed query."""
        server = self.server
        server.stats.queries += 1
        q = parse_query(data, client, transport)  # the bytes parsed when the entry was made
        q.notes = dict(e.notes) if e.notes else None
        reply = finish(q, e.reply)
        if reply is None:
            send(None)
        elif reply is e.reply:
            send(out)
        else:
            send(finalize(reply, q, server.edns_udp_size))
        observers = server._observers
        if observers:
            elapsed = time.monotonic() - start
            for observe in observers:
                observe(q, reply, elapsed)

    # --- views --------------------------------------------------------------------------

    def view(self, host: str, transport: str) -> tuple[bool, ...]:
        """Whether each client-dependent scope of the chain takes client ``host``, and
        whether it is in each group whose blocking is paused (its answers are its own)."""
        probe = Query(b"", 0, 0, b"\x00", wire.A, 1, 0, (host, 0), transport)
        tests = tuple(test(probe) for test in self.view_tests)
        paused = self.blocking.groups  # a pause or resume clears the views (generation)
        if not paused:
            return tests
        groups = self.clients.record(probe).groups
        return (*tests, *(group in groups for group in sorted(paused)))

    def _view(self, host: str, transport: str) -> bytes:
        """The key prefix of a client: its transport and view; empty: never cached (a
        client the ACL refuses, another transport)."""
        if len(self.views) >= self.size:
            self.views.clear()
        tag = TRANSPORTS.get(transport)
        if tag is None or not self.server.allowed(host):
            prefix = b""
        else:
            ids = self.view_ids
            index = ids.setdefault(self.view(host, transport), len(ids))
            prefix = tag + index.to_bytes(4, "big")
        self.views[(host, transport)] = prefix
        return prefix

    # --- storing ------------------------------------------------------------------------

    def store(self, q: Query, reply: Reply, out: bytes) -> None:
        """Keep ``out``, the chain's reply to ``q`` made without I/O, if it may be replayed
        (module docstring)."""
        if (
            not reply.cacheable
            or q.client_id is not None  # views know no client ids (`Server.handle`)
            or q.qend == 0  # an unusual message, read by the slow parser
            or q.trace is not None
            or q.qtype in TRANSFERS
            or out[3] & 0x0F not in KEPT_RCODES
            or out[2] & (wire.TC >> 8)
            or (q.edns_options and any(c not in PLAIN_OPTIONS for c, _ in q.edns_options))
        ):
            return
        if self._generations() != self.generation:  # before the view: it may be stale
            self.clear()
        host, transport = q.client[0], q.transport
        prefix = self.views.get((host, transport))
        if prefix is None:
            prefix = self._view(host, transport)
        qend = 12 + len(q.qname)
        data = q.data
        end = data.find(0, 12)
        if not prefix or end < 0 or out[12:qend] != q.qname:
            return
        if len(self.entries) >= self.size and self.admit.random() * ADMIT_WHEN_FULL >= 1:
            return  # full: admitted once in ADMIT_WHEN_FULL stores (module docstring)
        # Walk the steps first: most refusals (a step not declared pure) come before any
        # entry is made.
        accounts = []
        life = recount = None
        source = reply.source
        for in_scope, step, role in self.walk:
            if in_scope is not None and not in_scope(q):
                continue
            if role == KEEPER:
                life = step.packet_lifetime(q)
                if life is None:
                    return
                recount = step.packet_recount(q, reply)
                break
            if role == ACCOUNTANT:
                account = step.packet_account(q, reply)
                if account is None:
                    return
                accounts.append((step.packet_charge, account))
                continue
            if role == OPAQUE:
                return
            if source == step.setup.name:
                recount = step.packet_recount(q, reply)
                break  # the step that answered: the ones after it did not see the query
        e = Entry(out, qend, q, reply)
        if life is not None:
            self._age(e, out, life)
        e.recount = recount
        e.accounts = tuple(accounts)
        if self.schedules:
            for active in self.schedules:
                active()  # brings its next change (``until``) up to date
            left = min(active.until - active.clock() for active in self.schedules)
            change = self.clock() + left
            e.expires = change if e.expires is None else min(e.expires, change)
        if e.expires is not None:  # the first replay ages its TTLs, if any (`_tick`)
            e.due = self.clock() if e.offsets else e.expires
        entries = self.entries
        if len(entries) >= self.size:
            del entries[next(iter(entries))]
        entries[prefix + data[2:end].lower() + data[end:]] = e

    def _age(self, e: Entry, out: bytes, life: tuple[float, float, int]) -> None:
        """Make ``e`` age like the answer of the keeping step: its TTLs that show the
        step's TTL count down, and it expires when the step's answer would change."""
        hold, left, shown = life
        now = self.clock()
        e.expires = now + hold
        e.base = now + left
        e.shown = shown
        try:
            recs = wire.records(out)[1]
        except ValueError:
            e.expires = now  # unreadable: let the chain answer
            return
        e.offsets = tuple(
            r.ttl_off - e.qend
            for r in recs
            if r.rtype != wire.OPT and U32.unpack_from(out, r.ttl_off)[0] == shown
        )

    def _generations(self) -> int:
        """What invalidates entries: list changes, blocking pauses, client records. Each
        count only grows, so their sum changes whenever one does."""
        return self.chain.generation + self.blocking.generation + self.clients.generation

    def clear(self) -> None:
        """Forget every entry and view (and note the generations now current)."""
        self.entries.clear()
        self.views.clear()
        self.generation = self._generations()


def _role(step: Step) -> int:
    if _overrides(step, "packet_lifetime"):
        return KEEPER
    if _overrides(step, "packet_account"):
        return ACCOUNTANT
    return PURE if step.pure else OPAQUE


def packet_cache(server: Server) -> PacketCache | None:
    """The packet cache of ``server``'s current chain; None when turned off."""
    size = server.config.server.packet_cache_size
    return PacketCache(server, size) if size else None
