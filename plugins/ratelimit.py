"""ratelimit — response rate limiting (BIND 9 RRL), a per-client query limit, minimal ANY.

Description
    Keeps an open or LAN resolver from being used as an amplifier, and one noisy client
    from starving the others. Put it early in the chain: it sees every response on the
    way back, cache hits and blocked answers included.

    * **Response rate limiting** as BIND 9 does it. Each UDP response debits one credit
      from an account keyed by the client's prefix (``ipv4_prefix``/``ipv6_prefix``) and
      the response's class: answers by ⟨qname, qtype⟩, NODATA by qname, NXDOMAIN by the
      zone of the SOA in the authority section (so a random-subdomain flood shares one
      account; without an SOA, the qname's parent), errors by prefix only. An account earns
      its class's rate in credits per second, holds at most one second's worth and owes at
      most ``window`` seconds' worth. While it is negative, responses are dropped, except
      every ``slip``-th (starting with the first), which goes out empty with TC=1 so a real
      client retries over TCP. REFUSED and SERVFAIL cannot be truncated, so they are
      passed unchanged at the slip rate instead. ``all_per_second`` limits all responses
      to a prefix and never slips.
    * TCP (and any other stream transport) cannot be spoofed: its responses are counted,
      never limited.
    * **Query limit** (``queries_per_second``, a token bucket of ``queries_burst`` per
      client prefix, UDP only): over the limit a query is answered REFUSED with Extended
      DNS Error 31 (Rate Limited), or dropped, before it costs anything further down.
    * **Minimal ANY** (RFC 8482 §4.2): an ANY query over UDP gets one synthesised HINFO
      "RFC8482" "" record instead of everything the name has.
    * The account tables are bounded by ``max_table_size``: when full, the least recently
      used account is forgotten, so under a flood from very many prefixes the limiter
      degrades to not limiting rather than growing.
    * A client in ``exempt`` is never limited. With ``log_only`` everything is counted and
      logged and nothing changes on the wire.
    * One log line when an account starts being limited, at most ``log_per_second`` lines.

Syntax
    ::

        [[chain]]
        plugin = "ratelimit"
        responses_per_second = 0    # answers per ⟨prefix, name, type⟩; 0 = no RRL
        nodata_per_second = 20      # each of these defaults to responses_per_second;
        nxdomains_per_second = 20   # 0 turns that class off
        errors_per_second = 20
        all_per_second = 0          # all responses per prefix, dropped, never slipped
        window = 15                 # seconds (1-3600)
        slip = 2                    # 0 = always drop, 1 = always TC, n = every n-th (0-10)
        ipv4_prefix = 24            # 8-32
        ipv6_prefix = 56            # 16-128
        queries_per_second = 0      # per client prefix below; 0 = no query limit
        queries_burst = 0           # bucket size; 0 = queries_per_second
        queries_action = "refuse"   # "refuse" (REFUSED + EDE 31) or "drop"
        queries_ipv4_prefix = 32
        queries_ipv6_prefix = 64
        minimal_any = true
        exempt = ["192.0.2.0/24"]
        log_only = false
        max_table_size = 20000      # accounts per table (responses, queries)
        log_per_second = 10         # 0 = never log

Metrics
    ``responses{action}``: UDP responses by outcome: ``pass``, ``slip``, ``leak`` (an error
    sent unchanged at the slip rate), ``drop``, ``log_only`` (would have been limited),
    and responses not subject to limiting: ``tcp``, ``exempt``.
    ``queries{action}``: queries over the query limit: ``refuse``, ``drop``, ``log_only``.
    ``minimal_any``: ANY queries answered with HINFO. ``evictions``: accounts forgotten
    because a table was full. ``entries`` (gauge): accounts held.

Examples
    A LAN resolver: 20 identical answers per second per /24, a 50 qps allowance per host,
    and monitoring at 192.0.2.10 never limited::

        [[chain]]
        plugin = "ratelimit"
        responses_per_second = 20
        queries_per_second = 50
        queries_burst = 100
        exempt = ["192.0.2.10"]
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Literal

import attrs
import dns.rdatatype
import trio

from dnsproxy import options, wire
from dnsproxy.chain import DROP, Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_RATE_LIMITED, Reply, respond, rr
from dnsproxy.wire import HEADER, TC, U16, Query

ANY = 255
HINFO = 13
SOA = 6
ANY_TTL = 3600
RFC8482_HINFO = b"\x07RFC8482\x00"
PREFIX_CACHE = 4096  # client addresses whose prefixes are remembered (they repeat)
MAX_POINTERS = 32  # compression pointers followed when reading the SOA owner

# Account kinds besides answers (whose kind is the qtype, 0-65535).
NODATA, NXDOMAIN_ZONE, ERRORS, ALL = -1, -2, -3, -4
LEAK_RCODES = (wire.REFUSED, wire.SERVFAIL)
RESPONSE_ACTIONS = ("pass", "slip", "leak", "drop", "log_only", "tcp", "exempt")
QUERY_ACTIONS = ("refuse", "drop", "log_only")
KIND_TEXT = {NODATA: "NODATA", NXDOMAIN_ZONE: "NXDOMAIN", ERRORS: "error", ALL: "all"}


def _rate() -> Any:
    return attrs.field(default=0, validator=options.in_range(0, 1_000_000))


def _class_rate() -> Any:
    return attrs.field(default=None, validator=attrs.validators.optional(options.in_range(0, 1e6)))


@attrs.frozen
class RateLimitOptions:
    responses_per_second: int = _rate()
    nodata_per_second: int | None = _class_rate()
    nxdomains_per_second: int | None = _class_rate()
    errors_per_second: int | None = _class_rate()
    all_per_second: int = _rate()
    window: float = attrs.field(
        default=15.0, converter=options.duration, validator=options.in_range(1, 3600)
    )
    slip: int = attrs.field(default=2, validator=options.in_range(0, 10))
    ipv4_prefix: int = attrs.field(default=24, validator=options.in_range(8, 32))
    ipv6_prefix: int = attrs.field(default=56, validator=options.in_range(16, 128))
    queries_per_second: int = _rate()
    queries_burst: int = _rate()
    queries_action: Literal["refuse", "drop"] = "refuse"
    queries_ipv4_prefix: int = attrs.field(default=32, validator=options.in_range(8, 32))
    queries_ipv6_prefix: int = attrs.field(default=64, validator=options.in_range(16, 128))
    minimal_any: bool = True
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = attrs.field(
        default=(), converter=options.networks
    )
    log_only: bool = False
    max_table_size: int = attrs.field(default=20000, validator=options.in_range(1, 10_000_000))
    log_per_second: int = attrs.field(default=10, validator=options.in_range(0, 1000))


class Account:
    """Credit of one ⟨prefix, class, name⟩ (or one prefix's query bucket)."""

    __slots__ = ("balance", "logged", "slips", "time")

    def __init__(self, balance: float, time: float) -> None:
        self.balance = balance
        self.time = time
        self.slips = 0  # limited responses since the last slip, modulo ``slip``
        self.logged = False  # "now limiting" was logged; cleared on full recovery


class Table:
    """Accounts in least-recently-used order, never more than ``size`` of them."""

    __slots__ = ("accounts", "evictions", "size")

    def __init__(self, size: int) -> None:
        self.accounts: OrderedDict[Hashable, Account] = OrderedDict()
        self.size = size
        self.evictions = 0

    def debit(self, key: Hashable, rate: int, floor: float, now: float) -> Account:
        """RRL: earn ``rate``/s since last use (hold at most ``rate``), pay one, owe ≤ floor."""
        accounts = self.accounts
        acct = accounts.get(key)  # inlined `_get` and `_earn`: this runs per response
        if acct is None:
            acct = self._new(key, rate, now)
        else:
            accounts.move_to_end(key)
        balance = acct.balance + (now - acct.time) * rate
        acct.time = now
        if balance >= rate:
            balance = rate
            acct.logged = False  # fully recovered: a new episode gets a new log line
        balance -= 1
        acct.balance = balance if balance > floor else floor
        return acct

    def take(self, key: Hashable, rate: int, burst: int, now: float) -> Account | None:
        """Token bucket: take one token, or return the account when there is none."""
        acct = self.accounts.get(key)
        if acct is None:
            acct = self._new(key, burst, now)
        else:
            self.accounts.move_to_end(key)
        balance = acct.balance + (now - acct.time) * rate
        acct.time = now
        if balance >= burst:
            balance = burst
            acct.logged = False
        if balance >= 1:
            acct.balance = balance - 1
            return None
        acct.balance = balance
        return acct

    def _new(self, key: Hashable, initial: int, now: float) -> Account:
        accounts = self.accounts
        if len(accounts) >= self.size:
            accounts.popitem(last=False)
            self.evictions += 1
        acct = accounts[key] = Account(initial, now)
        return acct


def soa_zone(data: bytes, fallback: bytes) -> bytes:
    """The lower-cased owner of the first SOA in the authority section, else ``fallback``.

    A direct walk (no Record objects, stops at the SOA): this runs per NXDOMAIN.
    """
    try:
        _, _, qd, an, ns, _ = HEADER.unpack_from(data)
        if not ns:
            return fallback
        off = 12
        for _ in range(qd):
            off = wire.skip_name(data, off) + 4
        for _ in range(an):
            off = wire.skip_name(data, off) + 10
            off += U16.unpack_from(data, off - 2)[0]
        for _ in range(ns):
            owner = off
            off = wire.skip_name(data, off)
            if U16.unpack_from(data, off)[0] == SOA:
                return read_name(data, owner) or fallback
            off += 10 + U16.unpack_from(data, off + 8)[0]
    except (ValueError, struct.error):
        pass
    return fallback


def read_name(data: bytes, off: int) -> bytes | None:
    """A (possibly compressed) name at ``off`` as a lower-cased wire key, None if malformed."""
    parts = []
    start = off
    hops = 0
    end = len(data)
    while True:
        if off >= end:
            return None
        length = data[off]
        if length == 0:
            parts.append(data[start : off + 1])
            break
        if length >= 0xC0:
            if off + 1 >= end or hops >= MAX_POINTERS:
                return None
            parts.append(data[start:off])
            off = start = ((length & 0x3F) << 8) | data[off + 1]
            hops += 1
        elif length > 63:
            return None
        else:
            off += length + 1
    name = b"".join(parts)
    return name.lower() if len(name) <= 255 else None


def parent(key: bytes) -> bytes:
    """A wire name's parent (the root is its own)."""
    return key[key[0] + 1 :] if key[0] else key


class RateLimit(Step):
    Options = RateLimitOptions

    def __init__(
        self, opts: RateLimitOptions, setup: Setup, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__(opts, setup)
        self.clock = clock or trio.current_time
        r = opts.responses_per_second
        self.answer_rate = r
        self.nodata_rate = r if opts.nodata_per_second is None else opts.nodata_per_second
        self.nxdomain_rate = r if opts.nxdomains_per_second is None else opts.nxdomains_per_second
        self.error_rate = r if opts.errors_per_second is None else opts.errors_per_second
        self.all_rate = opts.all_per_second
        self.window = opts.window
        self.rrl = any((r, self.nodata_rate, self.nxdomain_rate, self.error_rate, self.all_rate))
        self.qps = opts.queries_per_second
        self.burst = opts.queries_burst or self.qps
        self.responses = Table(opts.max_table_size)
        self.queries = Table(opts.max_table_size)
        self.counts = dict.fromkeys(RESPONSE_ACTIONS, 0)
        self.query_counts = dict.fromkeys(QUERY_ACTIONS, 0)
        self.any_count = 0
        self._log_until = float("-inf")
        self._log_lines = 0
        self._log_suppressed = 0
        exempt = client_exempt(opts.exempt)
        v4, v6 = opts.ipv4_prefix, opts.ipv6_prefix
        qv4, qv6 = opts.queries_ipv4_prefix, opts.queries_ipv6_prefix

        @functools.lru_cache(maxsize=PREFIX_CACHE)
        def prefixes(host: str) -> tuple[str, str] | None:
            """(RRL prefix, query-limit prefix) of a client, None if it is exempt."""
            addr = exempt(host)
            if addr is None:
                return None
            if addr.version == 4:
                return prefix_text(addr, v4), prefix_text(addr, qv4)
            return prefix_text(addr, v6), prefix_text(addr, qv6)

        self.prefixes = prefixes

    # --- on the way in -------------------------------------------------------------------

    def query(self, q: Query) -> Reply | None:
        if q.transport != "udp":
            return None
        if self.qps:
            limited = self._limit_query(q)
            if limited is not None:
                return limited
        if q.qtype == ANY and self.options.minimal_any:
            self.any_count += 1
            q.note("ratelimit", "minimal_any")
            hinfo = rr(HINFO, ANY_TTL, RFC8482_HINFO, rclass=q.qclass)
            reply = respond(q, wire.NOERROR, [hinfo], source=self.setup.name)
            out = self.response(q, reply)
            return DROP if out is None else out
        return None

    def _limit_query(self, q: Query) -> Reply | None:
        prefixes = self.prefixes(q.client[0])
        if prefixes is None:
            return None
        now = self.clock()
        acct = self.queries.take(prefixes[1], self.qps, self.burst, now)
        if acct is None:
            return None
        if not acct.logged:
            acct.logged = True
            self._log(now, f"limiting queries from {prefixes[1]} to {self.qps}/s")
        action = "log_only" if self.options.log_only else self.options.queries_action
        self.query_counts[action] += 1
        q.note("ratelimit", f"query_{action}")
        if q.trace is not None:
            q.explain(f"{self.setup.where}: {prefixes[1]} over {self.qps} queries/s: {action}")
        if action == "log_only":
            return None
        if action == "drop":
            return DROP
        return respond(q, wire.REFUSED, ede=[(EDE_RATE_LIMITED, "")], source=self.setup.name)

    # --- on the way back -----------------------------------------------------------------

    def response(self, q: Query, reply: Reply) -> Reply | None:
        if q.transport != "udp":
            self.counts["tcp"] += 1
            return reply
        if not self.rrl:
            self.counts["pass"] += 1
            return reply
        prefixes = self.prefixes(q.client[0])
        if prefixes is None:
            self.counts["exempt"] += 1
            return reply
        prefix = prefixes[0]
        data = reply.wire
        rcode = data[3] & 0x0F
        if rcode == wire.NOERROR:
            if data[6] or data[7]:
                key: tuple[str, bytes, int] = (prefix, q.key, q.qtype)
                rate = self.answer_rate
            else:
                key, rate = (prefix, q.key, NODATA), self.nodata_rate
        elif rcode == wire.NXDOMAIN:
            zone = soa_zone(data, parent(q.key))
            key, rate = (prefix, zone, NXDOMAIN_ZONE), self.nxdomain_rate
        else:
            key, rate = (prefix, b"", ERRORS), self.error_rate
        now = self.clock()
        acct = None
        if rate:
            acct = self.responses.debit(key, rate, -self.window * rate, now)
            if acct.balance >= 0:
                acct = None
        all_rate = self.all_rate
        if all_rate:
            all_key = (prefix, b"", ALL)
            total = self.responses.debit(all_key, all_rate, -self.window * all_rate, now)
            if total.balance < 0:
                acct, key, rate = total, all_key, all_rate
        if acct is None:
            self.counts["pass"] += 1
            return reply
        return self._limited(q, reply, acct, key, rate, now)

    def _limited(
        self,
        q: Query,
        reply: Reply,
        acct: Account,
        key: tuple[str, bytes, int],
        rate: int,
        now: float,
    ) -> Reply | None:
        if not acct.logged:
            acct.logged = True
            self._log(now, f"limiting {describe(key)} responses to {key[0]} to {rate}/s")
        slip = self.options.slip
        action = "drop"
        if slip and key[2] != ALL:
            if acct.slips == 0:
                action = "leak" if reply.rcode in LEAK_RCODES else "slip"
            acct.slips = (acct.slips + 1) % slip
        if self.options.log_only:
            action = "log_only"
        self.counts[action] += 1
        q.note("ratelimit", action)
        if q.trace is not None:
            q.explain(f"{self.setup.where}: {describe(key)} for {key[0]} over {rate}/s: {action}")
        if action == "drop":
            return None
        if action == "slip":
            return truncated(q, reply)
        return reply

    def _log(self, now: float, line: str) -> None:
        """Log ``line`` unless ``log_per_second`` lines went out in the last second."""
        limit = self.options.log_per_second
        if not limit:
            return
        if now >= self._log_until:
            self._log_until = now + 1.0
            self._log_lines = 0
        if self._log_lines >= limit:
            self._log_suppressed += 1
            return
        self._log_lines += 1
        if self._log_suppressed:
            line += f" ({self._log_suppressed} similar lines suppressed)"
            self._log_suppressed = 0
        self.log.warning("%s: %s", self.setup.where, line)

    def flush(self) -> None:
        self.responses.accounts.clear()
        self.queries.accounts.clear()

    def metrics(self) -> list[Metric]:
        out = [
            Metric("responses", n, labels=(("action", a),), help="responses by outcome")
            for a, n in self.counts.items()
        ]
        out += [
            Metric("queries", n, labels=(("action", a),), help="queries over the query limit")
            for a, n in self.query_counts.items()
        ]
        evictions = self.responses.evictions + self.queries.evictions
        entries = len(self.responses.accounts) + len(self.queries.accounts)
        return [
            *out,
            Metric("minimal_any", self.any_count, help="ANY queries answered with HINFO"),
            Metric("evictions", evictions, help="accounts forgotten because a table was full"),
            Metric("entries", entries, kind="gauge", help="accounts held"),
        ]


def truncated(q: Query, reply: Reply) -> Reply:
    """The slipped form of ``reply``: its header with TC set and the question only."""
    flags = reply.flags | TC
    header = HEADER.pack(q.id, flags, 1, 0, 0, 0)
    return Reply(header + q.question, ede=[(EDE_RATE_LIMITED, "")], source=reply.source)


def describe(key: tuple[str, bytes, int]) -> str:
    """A log-friendly name of an account's class and name."""
    _, name, kind = key
    what = KIND_TEXT.get(kind) or dns.rdatatype.to_text(kind)
    return f"{what} {wire.key_to_text(name) or '.'}" if name else what


def prefix_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int) -> str:
    return str(ipaddress.ip_network((addr, length), strict=False))


def client_exempt(
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> Callable[[str], ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """Parse a client address (v4-mapped as v4); None if unparsable or in ``nets``."""

    def parse(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            addr = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in n for n in nets):
            return None
        return addr

    return parse


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("ratelimit", RateLimit)
