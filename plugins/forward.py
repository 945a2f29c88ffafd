"""forward — send queries to upstream resolvers.

Description
    Answers every query in its scope from the first upstream that gives a usable answer.
    Upstreams are plain DNS over UDP (with TCP when the answer is truncated), plain TCP, or
    any scheme another plugin registers (``tls://`` from ``dot``, ``https://`` from ``doh``).

    * Every query goes out with a fresh random ID and from a fresh random source port, and
      only a response from the right address and port with the right ID and question is
      accepted (RFC 5452); anything else is ignored and the wait goes on.
    * Identical questions in flight at once (same name, type, class, DO and CD) share one
      upstream query (the birthday defence: DNSpooq, CoreDNS CVE-2023-30464).
    * The client's EDNS options (cookies, padding, keepalive, ECS) are hop-by-hop and are
      not forwarded; DO and CD are, and unknown types pass through untouched.
    * Timeout, SERVFAIL, REFUSED and network errors fail over to the next upstream, within
      ``timeout`` per attempt and 5 s per query. FORMERR/NOTIMP to an EDNS query is retried
      once without EDNS. If all fail the client gets SERVFAIL with Extended DNS Error 22
      (No Reachable Authority: timeouts) or 23 (Network Error).

Syntax
    ::

        [[chain]]
        plugin = "forward"
        upstreams = ["system"]      # required
        policy = "sequential"       # sequential | random | round_robin | fastest
        timeout = 2.0               # seconds per attempt
        budget = 5.0                # seconds per query, all attempts together
        max_follow = 8              # CNAME targets outside ``zones`` followed per query

    Upstream forms: ``"system"`` (the nameservers of /etc/resolv.conf, minus our own
    listeners), ``"192.0.2.1"``, ``"192.0.2.1:5300"``, ``"[2001:db8::1]:53"``,
    ``"tcp://192.0.2.1:53"``, and for other schemes a table such as
    ``{ url = "tls://192.0.2.1:853", server_name = "dns.example.org" }``.

    An upstream that is one of our own listen addresses is a config error (a loop). Loops
    through other dnsproxy instances are caught at run time: each appends a token to a
    private EDNS option (code 65053) of the queries it forwards, and a query that arrives
    carrying our own token is answered SERVFAIL at once (never cached) and logged
    (``loop_detect = false`` turns this off). The token is a keyed hash of the question
    under a per-process secret, so a client cannot make one up: a client's own option 65053
    never counts as a loop (a malformed one is replaced, a long one keeps its newest hops).

    Answers are trimmed to the CNAME chain from the query name plus, for negative answers,
    the SOA and NSEC/NSEC3 proof (RFC 2181 §5.4.1): unsolicited NS, glue and other names
    never reach the client or a cache. Records of another class than the question's are
    dropped, TTLs with the top bit set become 0 (RFC 2181 §8), AA is cleared (a proxy is not
    the authority) and RA set (the proxy offers recursion, whatever the upstream said).

    A forward with ``zones`` speaks only for those zones: where the CNAME chain of its
    answer leaves them, the chain is cut and the target is resolved through the chain from
    its start, so the step that owns the target answers for it (at most ``max_follow``
    targets per query, 1-16; past that, or when the chain comes back to a name already
    followed, the answer is SERVFAIL, as CONFORMANCE.md A8 asks). Without
    ``zones``, the upstream's whole chain is relayed.

Metrics
    ``dnsproxy_forward_upstream_queries{upstream}``, ``..._upstream_errors{upstream}``
    (counters), ``..._upstream_rtt_seconds{upstream}`` (gauge, smoothed), ``..._inflight``
    (gauge), ``..._coalesced`` and ``..._loops`` (counters).

Examples
    Send ``corp.example.org`` to the VPN's resolver and everything else to two public ones::

        [[chain]]
        plugin = "forward"
        zones = ["corp.example.org"]
        upstreams = ["10.8.0.1"]

        [[chain]]
        plugin = "forward"
        upstreams = ["192.0.2.53", "198.51.100.53"]
        policy = "fastest"
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import dns.exception
import dns.message
import dns.name
import dns.rrset
import trio
from dnsproxy.plugins.rewrite import subquery

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step, Suspended
from dnsproxy.errors import UpstreamError
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import (
    EDE_NETWORK_ERROR,
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_OTHER,
    Reply,
    edns_option,
    respond,
    response_message,
)
from dnsproxy.streamclient import PipelinedTcpUpstream
from dnsproxy.udpclient import UdpUpstream
from dnsproxy.upstream import Request, Upstream, UpstreamSpec
from dnsproxy.wire import Query

log = logging.getLogger("dnsproxy.plugins.forward")

RESOLV_CONF = Path("/etc/resolv.conf")
NO_EDNS_MEMORY = 600.0  # seconds an EDNS-intolerant upstream is asked without EDNS
MAX_CNAME_CHAIN = 16  # CONFORMANCE.md A8: resolvers stop at 10-16 hops

# Forwarding-loop marker: each dnsproxy on a path appends its token to this private EDNS
# option (local-use range, RFC 6891 §9); a query carrying our own token has looped. The
# token is a keyed hash of the question under a per-process secret, so a client cannot
# make one up, and one seen by an upstream is good for that question only.
LOOP_OPTION = 65053
LOOP_KEY = secrets.token_bytes(16)
TOKEN_SIZE = 8
MAX_HOPS = 8
CNAME, SOA, DNAME, RRSIG, NSEC, NSEC3, ANY = 5, 6, 39, 46, 47, 50, 255
CLASS_ANY = 255
DROPPED = 65535  # reserved type (RFC 6895): marks records of another class for removal
NEGATIVE_PROOF = (NSEC, NSEC3)
FAILOVER_RCODES = (wire.SERVFAIL, wire.REFUSED)
NO_EDNS_RCODES = (wire.FORMERR, wire.NOTIMP)


def _upstream_list(value: object) -> tuple[str | Mapping[str, Any], ...]:
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("needs at least one upstream")
    for item in value:
        UpstreamSpec.parse(item)  # raises ValueError with the offending entry
    return tuple(value)


@attrs.frozen
class ForwardOptions:
    upstreams: tuple[str | Mapping[str, Any], ...] = attrs.field(converter=_upstream_list)
    policy: Literal["sequential", "random", "round_robin", "fastest"] = "sequential"
    timeout: float = options.seconds(2.0, 0.01, 60)
    budget: float = options.seconds(5.0, 0.01, 300)
    loop_detect: bool = True
    max_follow: int = attrs.field(default=8, validator=options.in_range(1, 16))


def system_nameservers() -> list[str]:
    """The ``nameserver`` lines of resolv.conf (zone ids dropped)."""
    try:
        lines = RESOLV_CONF.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(parts[1].partition("%")[0])
    return out


class Health:
    """Per-upstream latency estimate (for ``fastest``) and recent failures."""

    __slots__ = ("errors", "failures", "no_edns_until", "queries", "srtt")

    def __init__(self) -> None:
        self.srtt = 0.0  # smoothed round-trip time; 0 = unknown, tried first
        self.failures = 0  # consecutive
        self.queries = 0
        self.errors = 0
        self.no_edns_until = 0.0  # an upstream that rejected EDNS is asked without it

    def ok(self, rtt: float) -> None:
        self.srtt = rtt if self.srtt == 0 else 0.7 * self.srtt + 0.3 * rtt
        self.failures = 0

    def failed(self, timeout: float) -> None:
        self.failures += 1
        self.errors += 1
        self.srtt = max(self.srtt, timeout) * 1.5


Done = Callable[[Reply | None], None]
Then = Callable[["_Ask", Reply | None, str], None]  # an _Ask method, called with its _Ask


async def _exchange_task(
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


class _Ask:
    """One upstream query in flight: the attempts in policy order until one answers.

    Driven by callbacks (`UdpUpstream.send`, or `_exchange_task`): TC retries over TCP,
    FORMERR/NOTIMP/BADVERS retries without EDNS, and failover are each one more attempt,
    and only one attempt is in flight at a time.
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
        "req",
        "sent",
        "then",
        "timeouts",
        "up",
        "via",
    )
    health: Health  # of the upstream being asked; set by `next` before any attempt

    def __init__(self, fwd: Forward, q: Query, key: tuple[Any, ...], hops: bytes) -> None:
        self.fwd = fwd
        self.q = q
        self.key = key
        self.req = Request(
            q.question, q.key, q.qtype, q.qclass, q.flags & (wire.RD | wire.CD), q.do, True, hops
        )
        self.order = iter(fwd.order())
        self.deadline = trio.current_time() + fwd.options.budget
        self.timeouts = 0
        self.errors: list[str] = []
        self.last_bad: Reply | None = None
        self.up: Upstream | None = None  # the upstream being asked
        self.via: Upstream | None = None  # the transport of the attempt: up, or its TCP twin
        self.plain = False
        self.sent = 0.0
        self.then: Then = _Ask.answered

    def next(self) -> None:
        """Ask the next upstream, or give up."""
        up = next(self.order, None)
        if up is None or (self.up is not None and trio.current_time() >= self.deadline):
            self.fwd.complete(self.key, self.give_up())
            return
        self.up = up
        self.health = self.fwd.health[up.name]
        self.plain = self.health.no_edns_until > time.monotonic()
        self.attempt(up, attrs.evolve(self.req, edns=False) if self.plain else self.req)

    def attempt(self, via: Upstream, req: Request, then: Then | None = None) -> None:
        """Send ``req`` over ``via``; ``then`` (default: `answered`) gets the outcome.

        ``then`` is a plain function, not a bound method: an `_Ask` holding its own bound
        method would be a reference cycle, left for the garbage collector instead of
        being freed the moment the query is answered.
        """
        self.health.queries += 1
        self.via = via
        self.then = then or _Ask.answered
        self.sent = time.monotonic()
        deadline = min(self.deadline, trio.current_time() + self.fwd.options.timeout)
        send = getattr(via, "send", None)
        if send is not None:
            send(req, deadline, self.done)
        else:
            trio.lowlevel.spawn_system_task(_exchange_task, via, req, deadline, self.done)

    def done(self, data: bytes | None, err: str) -> None:
        """An attempt's outcome: the answer trimmed (`minimal`), or why there is none."""
        fwd, q, health = self.fwd, self.q, self.health
        reply = None
        if data is not None:
            try:
                body, rcode = _direct_answer(data, q), 0
                if body is None:
                    body, recs, rcode = wire.strip_opt(data)
                    body, recs = _scrub(body, recs, q)
                    body = _relayed(minimal(body, recs, q))
            except ValueError as exc:
                err = f"malformed answer ({exc})"
            else:
                if rcode > 15:  # BADVERS and the like: EDNS trouble, as FORMERR would be
                    body = body[:3] + bytes([(body[3] & 0xF0) | wire.FORMERR]) + body[4:]
                reply = Reply(body, source=fwd.setup.name)
        assert self.via is not None
        if reply is None:
            health.failed(fwd.options.timeout if err == "timeout" else 0.0)
            q.explain(f"{fwd.setup.where}: {self.via.name}: {err}")
        else:
            health.ok(time.monotonic() - self.sent)
            if q.trace is not None:
                q.explain(f"{fwd.setup.where}: {self.via.name} answered rcode {reply.rcode}")
        self.then(self, reply, err)

    def answered(self, reply: Reply | None, err: str) -> None:
        if reply is not None and reply.truncated and isinstance(self.up, UdpUpstream):
            self.attempt(self.up.tcp, self.req, _Ask.whole)  # TC: the whole answer over TCP
        else:
            self.whole(reply, err)

    def whole(self, reply: Reply | None, err: str) -> None:
        if reply is not None and reply.rcode in NO_EDNS_RCODES and not self.plain:
            assert self.up is not None
            self.attempt(self.up, attrs.evolve(self.req, edns=False), _Ask.without_edns)
        else:
            self.judge(reply, err)

    def without_edns(self, reply: Reply | None, err: str) -> None:
        if reply is not None and reply.rcode not in NO_EDNS_RCODES:
            assert self.up is not None
            self.health.no_edns_until = time.monotonic() + NO_EDNS_MEMORY
            self.fwd.log.info("%s rejects EDNS; asking it without EDNS for 10 min", self.up.name)
        self.judge(reply, err)

    def judge(self, reply: Reply | None, err: str) -> None:
        assert self.up is not None
        name = self.up.name
        if reply is not None and reply.rcode not in FAILOVER_RCODES:
            self.q.note("upstream", name)
            fwd = self.fwd
            if fwd.zone_set and reply.ancount:
                cut = _leaves_zones(reply, self.q, fwd.zone_set)
                if cut is not None:
                    trio.lowlevel.spawn_system_task(fwd.follow, self.q, self.key, reply, *cut)
                    return
            fwd.complete(self.key, reply)
            return
        if reply is not None:
            self.last_bad = reply
            self.errors.append(f"{name}: rcode {reply.rcode}")
        elif err == "timeout":
            self.timeouts += 1
            self.errors.append(f"{name}: timeout")
        else:
            self.errors.append(f"{name}: {err}")
        self.next()

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


class Forward(Step):
    Options = ForwardOptions

    def __init__(self, opts: ForwardOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.upstreams: list[Upstream] = []
        for item in opts.upstreams:
            if item == "system":
                self.upstreams.extend(self._system(setup))
            else:
                self.upstreams.append(setup.make_upstream(UpstreamSpec.parse(item), setup))
        self.health = {u.name: Health() for u in self.upstreams}
        self.flights: dict[tuple[Any, ...], list[Done]] = {}  # one upstream query, its clients
        self._zone_set: frozenset[bytes] | None = None
        self.loops = 0
        self.coalesced = 0
        self._loop_logged = -1e9
        self._rr = 0
        self._rand = random.Random()

    def _system(self, setup: Setup) -> list[Upstream]:
        found = [h for h in system_nameservers() if not _own_listener(h, 53, setup)]
        if not found:
            raise setup.error(
                "upstreams", f"'system': no usable nameserver in {RESOLV_CONF}; name one instead"
            )
        return [setup.make_upstream(UpstreamSpec.parse(h), setup) for h in found]

    @property
    def zone_set(self) -> frozenset[bytes]:
        """The ``zones`` scope as a set."""
        if self._zone_set is None:
            self._zone_set = frozenset(self.setup.scope.zones)
        return self._zone_set

    def query(self, q: Query) -> Any:
        return AWAIT

    def begin(self, q: Query, done: Done) -> None:
        hops = b""
        if self.options.loop_detect:  # before coalescing: a looped query must not wait on itself
            hops = _loop_marker(q)
            if hops is None:
                done(self._loop(q))
                return
        key = (q.key, q.qtype, q.qclass, q.flags & wire.CD, q.do)
        waiting = self.flights.get(key)
        if waiting is not None:
            q.note("coalesced", True)
            self.coalesced += 1
            waiting.append(done)
            return
        self.flights[key] = [done]
        _Ask(self, q, key, hops).next()

    def complete(self, key: tuple[Any, ...], reply: Reply) -> None:
        """Hand ``reply`` to every client query that waited for this upstream query."""
        for done in self.flights.pop(key):
            done(reply)

    async def follow(
        self, q: Query, key: tuple[Any, ...], reply: Reply, kept: list[Any], target: Any
    ) -> None:
        """Finish an answer whose CNAME chain leaves this step's zones: the upstream's
        CNAMEs up to the exit, plus the target resolved through the chain from its start,
        so the step that owns the target answers for it (a system task, like
        `_exchange_task`; the budget bounds it)."""
        result: Reply | None = None
        try:
            with trio.move_on_after(self.options.budget):
                result = await self._follow(q, reply, kept, target)
        except trio.Cancelled:  # the run is ending
            self.complete(key, respond(q, wire.SERVFAIL, source=self.setup.name))
            raise
        except Exception as exc:  # a step failed on the target: SERVFAIL, as for a query
            self.log.debug("following %s failed: %r", target, exc)
        if result is None:
            text = f"CNAME target {target} not resolved"
            q.explain(f"{self.setup.where}: {text}")
            ede = [(EDE_NO_REACHABLE_AUTHORITY, text[:80])]
            result = respond(q, wire.SERVFAIL, ede=ede, source=self.setup.name)
        self.complete(key, result)

    async def _follow(self, q: Query, reply: Reply, kept: list[Any], target: Any) -> Reply | None:
        # The names of this query's chain so far, shared with its subqueries (notes are):
        # a target among them would wait on itself (coalescing) until the budget ran out.
        followed = list((q.notes or {}).get("followed", ())) or [q.text]
        text = target.to_text().lower()
        if len(followed) > self.options.max_follow or text in followed:
            q.explain(f"{self.setup.where}: CNAME chain too long or looping at {text}")
            return None
        q.explain(f"{self.setup.where}: CNAME target {text} is outside this step's zones")
        q.note("followed", [*followed, text])
        chain = self.chain
        assert chain is not None
        sub = subquery(q, target.to_wire())
        result = chain.start(sub)
        if isinstance(result, Suspended):
            result = await chain.resume(sub, result)
        if result is None:
            return None
        if result.rcode not in (wire.NOERROR, wire.NXDOMAIN):
            return respond(q, result.rcode, ede=result.ede, source=self.setup.name)
        other = result.message()
        msg = response_message(q, result.rcode)
        msg.flags |= reply.flags & result.flags & wire.AD
        msg.answer = [*kept, *other.answer]
        msg.authority = list(other.authority)
        return Reply.from_message(msg, ede=result.ede, source=self.setup.name)

    def order(self) -> list[Upstream]:
        """The upstreams in the order the policy asks them for one query."""
        ups = self.upstreams
        policy = self.options.policy
        if policy == "sequential" or len(ups) == 1:
            return ups
        if policy == "random":
            return self._rand.sample(ups, len(ups))
        if policy == "round_robin":
            self._rr = (self._rr + 1) % len(ups)
            return ups[self._rr :] + ups[: self._rr]
        return sorted(ups, key=lambda u: self.health[u.name].srtt)

    def _loop(self, q: Query) -> Reply:
        self.loops += 1
        now = time.monotonic()
        if now - self._loop_logged > 10:
            self._loop_logged = now
            self.log.warning(
                "forwarding loop: %s came back to this proxy through its upstreams %s;"
                " check the upstreams of every proxy on the path",
                q.text,
                ", ".join(u.name for u in self.upstreams),
            )
        q.explain(f"{self.setup.where}: forwarding loop detected")
        ede = [(EDE_OTHER, "forwarding loop detected")]
        return respond(q, wire.SERVFAIL, ede=ede, source=self.setup.name, cacheable=False)

    def ready(self) -> bool:
        return any(h.failures < 3 for h in self.health.values())

    def metrics(self) -> list[Metric]:
        out = [
            Metric("inflight", len(self.flights), "gauge", help="Upstream queries in flight."),
            Metric("coalesced", self.coalesced, help="Client queries that joined one in flight."),
            Metric("loops", self.loops, help="Queries that came back through a forwarding loop."),
        ]
        for name, h in self.health.items():
            labels = (("upstream", name),)
            out += [
                Metric("upstream_queries", h.queries, labels=labels, help="Attempts sent."),
                Metric("upstream_errors", h.errors, labels=labels, help="Failed attempts."),
                Metric("upstream_rtt_seconds", h.srtt, "gauge", labels, "Smoothed latency."),
            ]
        return out

    def close(self) -> None:
        for up in self.upstreams:
            up.close()


def loop_token(q: Query) -> bytes:
    """Our hop token for ``q``'s question: only this process can make it."""
    data = q.key + struct.pack("!HH", q.qtype, q.qclass)
    return hashlib.blake2b(data, key=LOOP_KEY, digest_size=TOKEN_SIZE).digest()


def _loop_marker(q: Query) -> bytes | None:
    """The loop option to send upstream, or None if this query already passed through us.

    Only our own token counts. The hops of other proxies are passed on (their loops are
    theirs to detect), the newest `MAX_HOPS` - 1 of them; an option that is not a list of
    tokens came from a client and is dropped.
    """
    token = loop_token(q)
    hops = next((data for code, data in q.edns_options if code == LOOP_OPTION), None)
    if hops is None or len(hops) % TOKEN_SIZE:
        return edns_option(LOOP_OPTION, token)
    for i in range(0, len(hops), TOKEN_SIZE):
        if hops[i : i + TOKEN_SIZE] == token:
            return None
    return edns_option(LOOP_OPTION, hops[-(MAX_HOPS - 1) * TOKEN_SIZE :] + token)


def _relayed(body: bytes) -> bytes:
    """The header of an answer we relay: AA cleared (a proxy is not the authority for the
    name) and RA set (we offer recursion, as every answer we make ourselves says)."""
    b2, b3 = body[2] & ~(wire.AA >> 8), body[3] | wire.RA
    if b2 == body[2] and b3 == body[3]:
        return body
    return body[:2] + bytes((b2, b3)) + body[4:]


def _scrub(body: bytes, recs: list[wire.Record], q: Query) -> tuple[bytes, list[wire.Record]]:
    """Records of another class than the question's dropped (all sections), and TTLs with
    the top bit set made 0 (RFC 2181 §8), before anything reads or caches them."""
    qclass = q.qclass
    high = [r for r in recs if body[r.ttl_off] & 0x80]
    foreign = [] if qclass == CLASS_ANY else [r for r in recs if r.rclass != qclass]
    if not high and not foreign:
        return body, recs
    out = bytearray(body)
    for r in high:
        out[r.ttl_off : r.ttl_off + 4] = bytes(4)
    if not foreign:
        return bytes(out), recs
    for r in foreign:  # parsed as opaque data of a reserved type, then left out
        struct.pack_into("!HH", out, r.ttl_off - 4, DROPPED, qclass)
    try:
        msg = dns.message.from_wire(bytes(out))
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as exc:
        raise ValueError(str(exc)) from exc
    for section in (msg.answer, msg.authority, msg.additional):
        section[:] = [rrset for rrset in section if rrset.rdtype != DROPPED]
    body = msg.to_wire(want_shuffle=False)
    return body, wire.records(body)[1]


def _in_zones(name: dns.name.Name, zones: frozenset[bytes]) -> bool:
    return any(p in zones for p in wire.parents(name.to_wire().lower()))


def _leaves_zones(
    reply: Reply, q: Query, zones: frozenset[bytes]
) -> tuple[list[dns.rrset.RRset], dns.name.Name] | None:
    """Where the CNAME chain of a scoped upstream's answer leaves its zones: the records
    it may speak for (the chain up to the exit, with their RRSIGs) and the target outside.
    None when the chain stays inside (the common case, decided without a parse)."""
    if not any(r.section == 1 and r.rtype == CNAME for r in reply.records()):
        return None
    try:
        msg = reply.message()
    except (dns.exception.DNSException, ValueError):
        return None
    chain = [q.name]
    for _ in range(MAX_CNAME_CHAIN):
        rrset = next((r for r in msg.answer if r.rdtype == CNAME and r.name == chain[-1]), None)
        if rrset is None:
            return None
        target = rrset[0].target
        if not _in_zones(target, zones):
            names = set(chain)
            kept = [r for r in msg.answer if r.name in names and CNAME in (r.rdtype, r.covers)]
            return kept, target
        if target in chain:
            return None
        chain.append(target)
    return None


def _direct_answer(data: bytes, q: Query) -> bytes | None:
    """The common answer in one pass: NOERROR, and answer records all owned by the question
    name (a pointer to it) and of the asked type. Returns them alone, cutting authority and
    additional records unread (there is no extended rcode to find: errors have no answers);
    None for anything else, which `minimal` then handles.
    """
    an = (data[6] << 8) | data[7]
    if not an or data[3] & 0x0F:
        return None
    off = 12 + len(q.qname) + 4  # `matches` checked the question is exactly the client's
    end = len(data)
    for _ in range(an):
        if off + 12 > end or data[off] != 0xC0 or data[off + 1] != 0x0C:
            return None
        rtype, rclass, ttl, rdlen = wire.RR_FIXED.unpack_from(data, off + 2)
        if rtype != q.qtype or rclass != q.qclass or ttl & 0x8000_0000:
            return None  # another class or a TTL to clear: `_scrub` does that
        off += 12 + rdlen
    if off > end:
        return None
    flags = bytes((data[2] & ~(wire.AA >> 8), data[3] | wire.RA))
    return data[:2] + flags + data[4:6] + struct.pack("!HHH", an, 0, 0) + data[12:off]


def _keep(body: bytes, recs: list[wire.Record], q: Query) -> list[int] | None:
    """Indexes of the records `minimal` keeps, found at wire level (None: let dnspython do it)."""
    owners = [wire.read_name(body, r.name_off) for r in recs]
    chain = [q.key]
    for _ in range(MAX_CNAME_CHAIN):
        for r, owner in zip(recs, owners, strict=True):
            if r.section == 1 and r.rtype == CNAME and owner == chain[-1]:
                target = wire.read_name(body, r.rdata_off)
                break
        else:
            break
        if target in chain:
            break
        chain.append(target)
    names = set(chain)
    final = chain[-1]
    keep = []
    answered = False
    for i, (r, owner) in enumerate(zip(recs, owners, strict=True)):
        if r.section != 1:
            continue
        if r.rtype == DNAME:
            return None  # rare: let dnspython sort out DNAME synthesis
        covered = r.rtype
        if r.rtype == RRSIG and r.rdlen >= 2:
            covered = struct.unpack_from("!H", body, r.rdata_off)[0]
        if owner in names and (covered in (q.qtype, CNAME) or q.qtype == ANY):
            keep.append(i)
            answered = answered or (owner == final and r.rtype == q.qtype)
    if not answered:
        parents = set(wire.parents(final))
        for i, (r, owner) in enumerate(zip(recs, owners, strict=True)):
            if r.section != 2:
                continue
            covered = r.rtype
            if r.rtype == RRSIG and r.rdlen >= 2:
                covered = struct.unpack_from("!H", body, r.rdata_off)[0]
            if covered in NEGATIVE_PROOF or (covered == SOA and owner in parents):
                keep.append(i)
    return keep


def minimal(body: bytes, recs: list[wire.Record], q: Query) -> bytes:
    """Keep only what answers the question (RFC 2181 §5.4.1; CONFORMANCE.md C2).

    That is the CNAME/DNAME chain from the query name with the records of the asked type at
    its end (and their RRSIGs), plus, for negative answers, the SOA and the NSEC/NSEC3
    proof. Unsolicited NS, glue and records about other names are dropped, so they can
    neither reach the client nor poison a cache. Answers that are already minimal (every
    answer record owned by the question name and of its type, nothing else) are returned
    without a parse.
    """
    direct = 0  # leading answer records owned by the question name, of the asked type
    for r in recs:
        if r.section != 1 or r.rtype != q.qtype or body[r.name_off : r.name_off + 2] != b"\xc0\x0c":
            break
        direct += 1
    if direct == len(recs):
        return body
    if direct and recs[direct].section != 1:  # a plain answer plus NS/glue: cut the rest
        end = recs[direct - 1].end
        return body[:6] + struct.pack("!HHH", direct, 0, 0) + body[12:end]
    keep = _keep(body, recs, q)
    if keep is not None:
        if len(keep) == len(recs):
            return body
        if keep == list(range(len(keep))):  # a prefix: cut the rest, pointers stay valid
            counts = [0, 0, 0]
            for r in recs[: len(keep)]:
                counts[r.section - 1] += 1
            cut = recs[len(keep) - 1].end if keep else wire.records(body)[0]
            return body[:6] + struct.pack("!HHH", *counts) + body[12:cut]
    try:
        msg = dns.message.from_wire(body)
    except (dns.exception.DNSException, ValueError, IndexError) as exc:
        raise ValueError(str(exc)) from exc
    name = q.name
    chain = [name]
    for _ in range(MAX_CNAME_CHAIN):
        target = None
        for rrset in msg.answer:
            if rrset.rdtype == CNAME and rrset.name == chain[-1]:
                target = rrset[0].target
                break
        if target is None or target in chain:
            break
        chain.append(target)
    names = set(chain)
    final = chain[-1]
    answer = []
    for rrset in msg.answer:
        covered = rrset.covers if rrset.rdtype == RRSIG else rrset.rdtype
        if rrset.name in names:
            keep = covered in (q.qtype, CNAME) or q.qtype == ANY
        else:
            keep = covered == DNAME and any(n.is_subdomain(rrset.name) for n in names)
        if keep:
            answer.append(rrset)
    answered = any(r.name == final and r.rdtype == q.qtype for r in answer)
    authority = []
    if not answered:
        for rrset in msg.authority:
            covered = rrset.covers if rrset.rdtype == RRSIG else rrset.rdtype
            soa = covered == SOA and final.is_subdomain(rrset.name)
            if soa or covered in NEGATIVE_PROOF:
                authority.append(rrset)
    unchanged = len(answer) == len(msg.answer) and len(authority) == len(msg.authority)
    if unchanged and not msg.additional:
        return body
    msg.answer = answer
    msg.authority = authority
    msg.additional = []
    return msg.to_wire()


def _own_listener(host: str, port: int, setup: Setup) -> bool:
    """Whether host:port is one of our listeners (a wildcard listener covers local addresses)."""
    try:
        target = ipaddress.ip_address(host)
    except ValueError:
        return False
    for addr in setup.server.listen:
        if addr.port != port:
            continue
        try:
            mine = ipaddress.ip_address(addr.host)
        except ValueError:
            continue
        if mine == target:
            return True
        if mine.is_unspecified and mine.version == target.version and _is_local(target):
            return True
    return False


def _is_local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``addr`` belongs to this host: only local addresses can be bound."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((str(addr), 0))
        except OSError:
            return False
    return True


def _plain(tcp_only: bool) -> Any:
    """The factory of plain DNS upstreams: UDP with TCP for truncated answers, or TCP only.

    TCP is one reused, pipelined connection per upstream (RFC 7766 §6.2.1).
    """

    def factory(spec: UpstreamSpec, setup: Setup) -> Upstream:
        if spec.extra:
            key = next(iter(spec.extra))
            raise setup.error("upstreams", f"{spec.url}: unknown option {key!r}")
        port = spec.port or 53
        if _own_listener(spec.host, port, setup):
            raise setup.error(
                "upstreams", f"{spec.url} is this proxy's own listener (a forwarding loop)"
            )
        try:
            ipaddress.ip_address(spec.host)
        except ValueError as exc:
            raise setup.error(
                "upstreams", f"{spec.url}: plain DNS upstreams must be IP addresses"
            ) from exc
        tcp = PipelinedTcpUpstream(spec.host, port)
        return tcp if tcp_only else UdpUpstream(spec.host, port, tcp)

    return factory


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("forward", Forward)


@hookimpl
def dnsproxy_add_upstream_schemes(registry: Registry) -> None:
    registry.add_scheme("udp", _plain(tcp_only=False))
    registry.add_scheme("tcp", _plain(tcp_only=True))
