"""ratelimit — response rate limiting (BIND 9 RRL), a per-client query limit, minimal ANY.

The user documentation (Description, Syntax, Metrics, Examples) is README.md beside this
file; the credit accounting is in `accounts`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from typing import Any, Literal

import attrs
import dns.rdatatype
import trio

from dnsproxy import options, wire
from dnsproxy.chain import DROP, Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_RATE_LIMITED, Reply, respond, rr, truncate
from dnsproxy.wire import ANY, HINFO, Query

from .accounts import Account, Table, client_exempt, parent, prefix_text, soa_zone

ANY_TTL = 3600
RFC8482_HINFO = b"\x07RFC8482\x00"
PREFIX_CACHE = 4096  # client addresses whose prefixes are remembered (they repeat)

# Account kinds besides answers (whose kind is the qtype, 0-65535).
NODATA, NXDOMAIN_ZONE, ERRORS, ALL = -1, -2, -3, -4
LEAK_RCODES = (wire.REFUSED, wire.SERVFAIL)
RESPONSE_ACTIONS = ("pass", "slip", "leak", "drop", "log_only", "tcp", "exempt")
QUERY_ACTIONS = ("refuse", "drop", "log_only")
KIND_TEXT = {NODATA: "NODATA", NXDOMAIN_ZONE: "NXDOMAIN", ERRORS: "error", ALL: "all"}


def _rate() -> Any:
    return attrs.field(default=0, validator=options.in_range(0, 1_000_000))


def _class_rate() -> Any:
    return attrs.field(
        default=None, validator=attrs.validators.optional(options.in_range(0, 1_000_000))
    )


@attrs.frozen
class RateLimitOptions:
    responses_per_second: int = _rate()
    nodata_per_second: int | None = _class_rate()
    nxdomains_per_second: int | None = _class_rate()
    errors_per_second: int | None = _class_rate()
    all_per_second: int = _rate()
    window: float = options.seconds(15.0, 1, 3600)
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


class RateLimit(Step):
    """The step: the query limit and minimal ANY in `query`, RRL in `response`.

    ``clock`` is injectable because `query`/`response` are synchronous and unit tests may
    call them outside a Trio run; inside one, ``trio.current_time`` follows autojump_clock.
    Without one, `run` binds the run's clock itself: it reads the same time, and
    ``trio.current_time`` costs more than the rest of a packet-cache replay's charge.
    """

    Options = RateLimitOptions

    def __init__(
        self, opts: RateLimitOptions, setup: Setup, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__(opts, setup)
        self.clock = clock or trio.current_time
        self.own_clock = clock is None  # `run` may bind the run's clock
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
        return self._over_query_limit(q, prefixes, acct, now)

    def _over_query_limit(
        self, q: Query, prefixes: tuple[str, str], acct: Account, now: float
    ) -> Reply | None:
        """What `query` does for a client with no token left (DROP, REFUSED or None)."""
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
        refused = respond(q, wire.REFUSED, ede=[(EDE_RATE_LIMITED, "")], source=self.setup.name)
        out = self.response(q, refused)  # an error response like any other: RRL accounts it
        return DROP if out is None else out

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
        name, kind, rate = self._account_of(q, reply)
        over = self._debit((prefixes[0], name, kind), rate)
        if over is None:
            self.counts["pass"] += 1
            return reply
        return self._limited(q, reply, *over)

    def _account_of(self, q: Query, reply: Reply) -> tuple[bytes, int, int]:
        """The (name, kind, rate) of the account ``reply`` is debited to."""
        data = reply.wire
        rcode = data[3] & 0x0F
        if rcode == wire.NOERROR:
            if data[6] or data[7]:
                return q.key, q.qtype, self.answer_rate
            return q.key, NODATA, self.nodata_rate
        if rcode == wire.NXDOMAIN:
            return soa_zone(data, parent(q.key)), NXDOMAIN_ZONE, self.nxdomain_rate
        return b"", ERRORS, self.error_rate

    def _debit(
        self, key: tuple[str, bytes, int], rate: int
    ) -> tuple[Account, tuple[str, bytes, int], int, float] | None:
        """Debit one response to account ``key`` (prefix, name, kind); the account over
        its limit, if any."""
        now = self.clock()
        acct = None
        if rate:
            acct = self.responses.debit(key, rate, -self.window * rate, now)
            if acct.balance >= 0:
                acct = None
        all_rate = self.all_rate
        if all_rate:
            all_key = (key[0], b"", ALL)
            total = self.responses.debit(all_key, all_rate, -self.window * all_rate, now)
            if total.balance < 0:
                acct, key, rate = total, all_key, all_rate
        return None if acct is None else (acct, key, rate, now)

    # --- replays from the server's packet cache ------------------------------------------

    def packet_account(self, q: Query, reply: Reply) -> Replay | None:
        """A replay of ``reply`` to ``q`` is debited as `response` debited it: to the
        account (name, kind, rate) of the replaying client's prefix (counted ``"tcp"`` off
        UDP). None for a reply this step made or limited: those are never replayed."""
        if q.notes is not None and "ratelimit" in q.notes:
            return None
        if q.qtype == ANY and self.options.minimal_any:
            return None
        if q.transport != "udp":
            return Replay(b"", 0, 0, 0.0, udp=False)
        name, kind, rate = self._account_of(q, reply)
        return Replay(name, kind, rate, -self.window * rate)

    def packet_charge(
        self, host: str, account: Replay
    ) -> Callable[[Query, Reply], Reply | None] | None:
        """`query` and `response` for one replay: the query limit, then RRL. None: send
        the reply; else the function that limits it (slip, drop) on the parsed query.

        ``account`` keeps what it was charged to for the last client that got it: clients
        repeat their questions, so the common replay (RRL on one account only) debits
        that `Account` directly while it is still in the table."""
        acct = account.acct
        if acct is not None and host == account.host and account.epoch == self.responses.epoch:
            key = account.key
            self.responses.accounts.move_to_end(key)  # as `Table.debit` does
            now = self.clock()
            if acct.debit(account.rate, account.floor, now) >= 0:
                self.counts["pass"] += 1
                return None
            return functools.partial(self._replay_limited, (acct, key, account.rate, now))
        if not account.udp:
            self.counts["tcp"] += 1
            return None
        if host != account.host:
            prefixes = account.prefixes = self.prefixes(host)
            account.key = None if prefixes is None else (prefixes[0], account.name, account.kind)
            account.host = host
        account.acct = None
        prefixes = account.prefixes
        if self.qps and prefixes is not None:
            now = self.clock()
            acct = self.queries.take(prefixes[1], self.qps, self.burst, now)
            if acct is not None:
                return functools.partial(self._replay_over_query_limit, prefixes, acct, now)
        key = account.key
        if key is None or not self.rrl:
            self.counts["exempt" if self.rrl else "pass"] += 1
            return None
        over = self._debit(key, account.rate)
        if account.rate and not (self.all_rate or self.qps):  # RRL on one account only
            account.acct = self.responses.accounts[key]
            account.epoch = self.responses.epoch
        if over is None:
            self.counts["pass"] += 1
            return None
        return functools.partial(self._replay_limited, over)

    def _replay_limited(
        self,
        over: tuple[Account, tuple[str, bytes, int], int, float],
        q: Query,
        reply: Reply,
    ) -> Reply | None:
        return self._limited(q, reply, *over)

    def _replay_over_query_limit(
        self, prefixes: tuple[str, str], acct: Account, now: float, q: Query, reply: Reply
    ) -> Reply | None:
        out = self._over_query_limit(q, prefixes, acct, now)
        if out is DROP:
            return None
        return self.response(q, reply) if out is None else out

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
            return truncate(reply, q, [(EDE_RATE_LIMITED, "")])
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

    async def run(self) -> None:
        if self.own_clock:
            self.clock = trio.lowlevel.current_clock().current_time

    def inherit(self, previous: Step) -> None:
        """Take over the accounts and counters of the step this one replaces on reload."""
        if not isinstance(previous, RateLimit):
            return
        self.responses, self.queries = previous.responses, previous.queries
        self.counts, self.query_counts = previous.counts, previous.query_counts
        self.any_count = previous.any_count

    def flush(self) -> None:
        self.responses.clear()
        self.queries.clear()

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


class Replay:
    """What packet-cache replays of one reply are charged to (`RateLimit.packet_account`):
    the RRL account's name, kind and rate, and for the last client that got the replay
    its prefixes, account key and (while the table holds it) `Account`, so the next
    replay to that client is debited without a lookup."""

    __slots__ = ("acct", "epoch", "floor", "host", "key", "kind", "name", "prefixes", "rate", "udp")

    def __init__(
        self, name: bytes, kind: int, rate: int, floor: float, *, udp: bool = True
    ) -> None:
        self.name = name
        self.kind = kind
        self.rate = rate
        self.floor = floor  # the most the account may owe (`Table.debit`)
        self.udp = udp  # off UDP a replay is only counted
        self.host: str | None = None  # the client ``prefixes`` and ``key`` are of
        self.prefixes: tuple[str, str] | None = None  # None: an exempt client
        self.key: tuple[str, bytes, int] | None = None
        self.acct: Account | None = None  # ``key``'s, when RRL debits nothing else
        self.epoch = 0  # the responses table's epoch when ``acct`` was taken


def describe(key: tuple[str, bytes, int]) -> str:
    """A log-friendly name of an account's class and name."""
    _, name, kind = key
    what = KIND_TEXT.get(kind) or dns.rdatatype.to_text(kind)
    return f"{what} {wire.key_to_text(name) or '.'}" if name else what


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("ratelimit", RateLimit)
