"""One upstream query in flight (`Ask`): the attempts in policy order until one answers,
and the per-upstream health that orders them."""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from dnsproxy import wire
from dnsproxy.errors import UpstreamError
from dnsproxy.reply import EDE_NETWORK_ERROR, EDE_NO_REACHABLE_AUTHORITY, Reply, respond
from dnsproxy.udpclient import UdpUpstream
from dnsproxy.upstream import Request, Upstream
from dnsproxy.wire import Query

from .trim import leaves_zones, trim

if TYPE_CHECKING:
    from . import Forward

log = logging.getLogger("dnsproxy.plugins.forward")

NO_EDNS_MEMORY = 600.0  # seconds an EDNS-intolerant upstream is asked without EDNS
FAILOVER_RCODES = (wire.SERVFAIL, wire.REFUSED)
NO_EDNS_RCODES = (wire.FORMERR, wire.NOTIMP)


LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Health:
    """Per-upstream latency estimate (for ``fastest`` and ``parallel``), recent failures,
    back-off state and a fixed-bucket latency histogram (for /metrics).

    An upstream that failed ``backoff_after`` times in a row is backed off: no client
    query is sent to it until a probe (`Forward.run`) gets an answer from it; each failed
    probe doubles the wait, up to the maximum.
    """

    __slots__ = (
        "answers",
        "backoff",
        "errors",
        "failures",
        "histogram",
        "last",
        "no_edns_until",
        "probe_at",
        "probes",
        "queries",
        "srtt",
    )

    def __init__(self) -> None:
        self.srtt = 0.0  # smoothed round-trip time; 0 = unknown, tried first
        self.failures = 0  # consecutive
        self.queries = 0
        self.answers = 0
        self.errors = 0
        self.no_edns_until = 0.0  # an upstream that rejected EDNS is asked without it
        self.backoff = 0.0  # seconds of the current back-off; 0 = up
        self.probe_at = 0.0  # trio time of the next probe while backed off
        self.probes = 0
        self.last: Request | None = None  # the last question it answered: the probe's
        self.histogram = [0] * (len(LATENCY_BUCKETS) + 1)

    def ok(self, rtt: float, req: Request) -> None:
        self.srtt = rtt if self.srtt == 0 else 0.7 * self.srtt + 0.3 * rtt
        self.failures = 0
        self.answers += 1
        self.last = req
        self.histogram[bisect_left(LATENCY_BUCKETS, rtt)] += 1

    def failed(self, timeout: float) -> None:
        self.failures += 1
        self.errors += 1
        self.srtt = max(self.srtt, timeout) * 1.5

    def score(self, timeout: float) -> float:
        """Lower is better: the latency estimate plus a timeout per recent failure."""
        return self.srtt + self.failures * timeout

    def quantile(self, fraction: float) -> float:
        """The upper bound of the bucket holding ``fraction`` of the answers (0: none)."""
        total = sum(self.histogram)
        if not total:
            return 0.0
        seen = 0
        for i, count in enumerate(self.histogram):
            seen += count
            if seen >= fraction * total:
                return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else math.inf
        return math.inf


class Race:
    """The two `Ask`s of one ``parallel`` query: the first good answer wins; one that
    runs out of upstreams waits for the other, and the client gets the answer of neither
    only when both gave up."""

    __slots__ = ("loser", "over")

    def __init__(self) -> None:
        self.over = False  # an answer went to the client: late outcomes only update health
        self.loser: Ask | None = None  # the Ask that gave up first


Done = Callable[[Reply | None], None]
Then = Callable[["Ask", Reply | None, str], None]  # an Ask method, called with its Ask


async def exchange_task(
    up: Upstream, req: Request, deadline: float, done: Callable[[bytes | None, str], None]
) -> None:
    """One exchange over a transport with only the async ``exchange`` (TCP, DoT, DoH).

    A system task, like the stream clients' own: forward has no nursery per query, and the
    attempt's deadline bounds it.
    """
    data, err = None, "timeout"
    try:
        with trio.move_on_at(deadline):
            data, err = await up.exchange(req), ""
    except UpstreamError as exc:
        err = str(exc)
    except trio.Cancelled:  # the run is ending
        done(None, "shutting down")
        raise
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
    try:
        done(data, err)
    except Exception as exc:  # a bug must not end the run (this is a system task)
        log.error("forward: completing a query failed: %r", exc, exc_info=exc)


class Ask:
    """One upstream query in flight: the attempts in policy order until one answers.

    Driven by callbacks (`UdpUpstream.send`, or `exchange_task`): TC retries over TCP,
    FORMERR/NOTIMP/BADVERS retries without EDNS, and failover are each one more attempt,
    and only one attempt is in flight at a time. Built, it sends its first attempt.
    """

    __slots__ = (
        "deadline",
        "errors",
        "fwd",
        "health",
        "key",
        "last_bad",
        "order",
        "plain",
        "q",
        "race",
        "req",
        "sent",
        "then",
        "timeouts",
        "tried",
        "up",
        "via",
    )
    # Set by `next` (up, health, plain) and `attempt` (via, then, sent) before any outcome.
    health: Health  # of the upstream being asked
    up: Upstream  # the upstream being asked
    via: Upstream  # the transport of the attempt: up, or its TCP twin
    plain: bool  # asked without EDNS (it rejected EDNS lately)
    then: Then  # what the attempt's outcome goes to
    sent: float  # time.monotonic() at the attempt's send, for its latency

    def __init__(
        self,
        fwd: Forward,
        q: Query,
        key: tuple[Any, ...],
        hops: bytes,
        order: list[Upstream],
        race: Race | None = None,
    ) -> None:
        self.fwd = fwd
        self.race = race
        self.q = q
        self.key = key
        self.req = Request(
            q.question, q.key, q.qtype, q.qclass, q.flags & (wire.RD | wire.CD), q.do, True, hops
        )
        self.order = order
        self.tried = 0  # upstreams of ``order`` asked so far
        self.timeouts = 0
        self.errors: tuple[str, ...] = ()  # why each failed attempt failed (a tuple: no
        self.last_bad: Reply | None = None  # allocation while there is none)
        now = fwd.now()
        self.deadline = now + fwd.options.budget
        self.next(now)

    def next(self, now: float) -> None:
        """Ask the next upstream at ``now`` (Trio clock), or give up."""
        tried = self.tried
        if tried == len(self.order) or now >= self.deadline:
            self.lost()
            return
        self.tried = tried + 1
        self.up = up = self.order[tried]
        self.health = health = self.fwd.health[up.name]
        until = health.no_edns_until
        self.plain = plain = until != 0.0 and until > time.monotonic()
        req = attrs.evolve(self.req, edns=False) if plain else self.req
        self.attempt(up, req, Ask.answered, now)

    def attempt(self, via: Upstream, req: Request, then: Then, now: float) -> None:
        """Send ``req`` over ``via``; ``then`` gets the outcome. ``now`` is the Trio clock.

        ``then`` is a plain function, not a bound method: an `Ask` holding its own bound
        method would be a reference cycle, left for the garbage collector instead of
        being freed the moment the query is answered.
        """
        self.health.queries += 1
        self.via = via
        self.then = then
        self.sent = time.monotonic()
        deadline = now + self.fwd.options.timeout
        if deadline > self.deadline:
            deadline = self.deadline
        send = getattr(via, "send", None)
        if send is not None:
            send(req, deadline, self.done)
        else:
            trio.lowlevel.spawn_system_task(exchange_task, via, req, deadline, self.done)

    def done(self, data: bytes | None, err: str) -> None:
        """An attempt's outcome: the answer trimmed (`trim`), or why there is none."""
        fwd, q, health = self.fwd, self.q, self.health
        reply = None
        if data is not None:
            try:
                reply = Reply(trim(data, q), source=fwd.setup.name)
            except ValueError as exc:
                err = f"malformed answer ({exc})"
        if reply is None:
            fwd.failed(self.up.name, health, fwd.options.timeout if err == "timeout" else 0.0)
            q.explain(f"{fwd.setup.where}: {self.via.name}: {err}")
        else:
            health.ok(time.monotonic() - self.sent, self.req)
            if health.backoff:  # all were down and this one answered a client's query
                fwd.recovered(self.up.name, health)
            if q.trace is not None:
                q.explain(f"{fwd.setup.where}: {self.via.name} answered rcode {reply.rcode}")
        if self.race is not None and self.race.over:
            return  # the other upstream of a parallel query answered first
        self.then(self, reply, err)

    def answered(self, reply: Reply | None, err: str) -> None:
        if reply is None:
            self.judge(reply, err)
            return
        w = reply.wire
        if w[2] & (wire.TC >> 8) and isinstance(self.up, UdpUpstream):
            # TC: the whole answer over TCP
            self.attempt(self.up.tcp, self.req, Ask.whole, self.fwd.now())
        elif w[3] & 0x0F in NO_EDNS_RCODES:
            self.whole(reply, err)
        else:  # the common case, `whole` would pass it on unchanged
            self.judge(reply, err)

    def whole(self, reply: Reply | None, err: str) -> None:
        if reply is not None and reply.rcode in NO_EDNS_RCODES and not self.plain:
            req = attrs.evolve(self.req, edns=False)
            self.attempt(self.up, req, Ask.without_edns, self.fwd.now())
        else:
            self.judge(reply, err)

    def without_edns(self, reply: Reply | None, err: str) -> None:
        if reply is not None and reply.rcode not in NO_EDNS_RCODES:
            self.health.no_edns_until = time.monotonic() + NO_EDNS_MEMORY
            self.fwd.log.info("%s rejects EDNS; asking it without EDNS for 10 min", self.up.name)
        self.judge(reply, err)

    def judge(self, reply: Reply | None, err: str) -> None:
        name = self.up.name
        if reply is not None and reply.wire[3] & 0x0F not in FAILOVER_RCODES:
            if self.race is not None:
                self.race.over = True
            self.q.note("upstream", name)
            fwd = self.fwd
            if fwd.zone_set and reply.ancount:
                cut = leaves_zones(reply, self.q, fwd.zone_set)
                if cut is not None:
                    trio.lowlevel.spawn_system_task(fwd.follow, self.q, self.key, reply, *cut)
                    return
            fwd.complete(self.key, reply)
            return
        if reply is not None:
            self.last_bad = reply
            self.errors += (f"{name}: rcode {reply.rcode}",)
        elif err == "timeout":
            self.timeouts += 1
            self.errors += (f"{name}: timeout",)
        else:
            self.errors += (f"{name}: {err}",)
        self.next(self.fwd.now())

    def lost(self) -> None:
        """No upstream of this Ask answered: SERVFAIL, unless the other of a race is still
        trying (its outcome decides, with this one's errors joined to its own)."""
        race = self.race
        if race is not None:
            other = race.loser
            if other is None:
                race.loser = self
                return
            race.over = True
            self.errors = other.errors + self.errors
            self.timeouts += other.timeouts
            self.last_bad = self.last_bad or other.last_bad
        self.fwd.complete(self.key, self.give_up())

    def give_up(self) -> Reply:
        """SERVFAIL with EDE 22/23, or an upstream's REFUSED if that is all there was."""
        q, errors = self.q, self.errors
        last_bad = self.last_bad
        if last_bad is not None and not self.timeouts and last_bad.rcode == wire.REFUSED:
            return last_bad
        where = self.fwd.setup.where
        q.explain(f"{where}: all upstreams failed: {'; '.join(errors) or 'no time left'}")
        ede = EDE_NO_REACHABLE_AUTHORITY if self.timeouts or not errors else EDE_NETWORK_ERROR
        text = "; ".join(errors)[:80] or "upstreams did not answer in time"
        return respond(q, wire.SERVFAIL, ede=[(ede, text)], source=self.fwd.setup.name)
