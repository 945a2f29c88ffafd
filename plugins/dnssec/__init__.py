"""dnssec — validate the answers of the steps after it, as a validating stub resolver does.

See README.md beside this file for the options, metrics and examples.
"""

from __future__ import annotations

import attrs
import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
from dnsproxy.plugins.dnssec import anchors
from dnsproxy.plugins.dnssec.validator import (
    BOGUS,
    INSECURE,
    SECURE,
    Budget,
    Validator,
    Verdict,
    supported_algorithms,
)

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import Reply, respond
from dnsproxy.wire import Query

DNSSEC_TYPES = frozenset(
    {dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3, dns.rdatatype.NSEC3PARAM}
)
FETCH_UDP_SIZE = 1232


def _zone_names(value: object) -> tuple[str, ...]:
    out = []
    for item in options.string_tuple(value):
        try:
            out.append(dns.name.from_text(item).to_text().lower())
        except dns.exception.DNSException as exc:
            raise ValueError(f"{item!r} is not a domain name: {exc}") from exc
    return tuple(out)


@attrs.frozen
class DnssecOptions:
    trust_anchors: tuple[str, ...] = attrs.field(default=(), converter=options.string_tuple)
    insecure_zones: tuple[str, ...] = attrs.field(default=(), converter=_zone_names)
    max_keys: int = attrs.field(default=10000, validator=options.in_range(1, 1_000_000))
    max_fetches: int = attrs.field(default=32, validator=options.in_range(1, 256))
    nsec3_max_iterations: int = attrs.field(default=150, validator=options.in_range(0, 2500))


class Dnssec(Step):
    """Asks with DO and CD, validates what comes back, answers AD=1, AD=0 or SERVFAIL."""

    Options = DnssecOptions

    def __init__(self, opts: DnssecOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        paths = [setup.path(p) for p in opts.trust_anchors]
        try:
            self.anchors = anchors.load(paths)
        except anchors.AnchorError as exc:
            raise setup.error("trust_anchors", str(exc)) from exc
        self.validator = Validator(
            self.anchors,
            [dns.name.from_text(z) for z in opts.insecure_zones],
            max_keys=opts.max_keys,
            max_iterations=opts.nsec3_max_iterations,
            algorithms=supported_algorithms(),
        )
        self.counts = {SECURE: 0, INSECURE: 0, BOGUS: 0}
        self.unvalidated = 0

    def query(self, q: Query) -> Reply | None:
        if q.cd:  # the client validates itself: hand it what the upstream gave
            q.explain(f"{self.setup.where}: CD=1, not validated")
            return None
        if q.qclass != dns.rdataclass.IN:
            return None
        return AWAIT

    async def resolve(self, q: Query) -> Reply | None:
        chain = self.chain
        assert chain is not None
        reply = await chain.pass_on(self, derive(q, q.qname, q.qtype))
        if reply is None:
            return respond(q, wire.SERVFAIL, source=self.setup.name, cacheable=False)
        if reply.rcode not in (wire.NOERROR, wire.NXDOMAIN) or reply.source != "forward":
            self.unvalidated += 1  # an error, or made up by a local step after this one
            return _with_ad(reply, False, q.cd)
        try:
            msg = reply.message()
        except (dns.exception.DNSException, ValueError):
            return reply
        budget = Budget(self.options.max_fetches)

        async def fetch(name: dns.name.Name, rdtype: int) -> dns.message.Message | None:
            sub = await chain.pass_on(self, derive(q, name.to_wire(), rdtype))
            if sub is None:
                return None
            try:
                return sub.message()
            except (dns.exception.DNSException, ValueError):
                return None

        verdict = await self.validator.validate(q.name, q.qtype, msg, fetch, budget)
        return self._answer(q, reply, verdict, budget)

    def _answer(self, q: Query, reply: Reply, verdict: Verdict, budget: Budget) -> Reply:
        self.counts[verdict.status] += 1
        q.note("dnssec", verdict.status)
        if q.trace is not None:
            for line in budget.lines:
                q.explain(f"{self.setup.where}: {line}")
            q.explain(f"{self.setup.where}: {verdict.status}: {verdict.why}")
        if verdict.status == BOGUS:
            if self.log.isEnabledFor(10):
                self.log.debug("bogus answer for %s: %s", q.text, verdict.why)
            ede = [(verdict.ede, verdict.why[:80])]
            return respond(q, wire.SERVFAIL, ede=ede, source=self.setup.name)
        if not q.do and q.qtype not in DNSSEC_TYPES:
            reply = _stripped(reply)
        return _with_ad(reply, verdict.status == SECURE, q.cd)

    async def check(self) -> list[str]:
        zones = ", ".join(
            f"{z} ({len(a.ds)} DS, {len(a.keys)} DNSKEY)" for z, a in self.anchors.items()
        )
        return [f"{self.setup.where}: trust anchors: {zones}"]

    def flush(self) -> None:
        self.validator.flush()

    def inherit(self, previous: Step) -> None:
        if isinstance(previous, Dnssec):
            self.validator.store = previous.validator.store
            self.counts = previous.counts
            self.unvalidated = previous.unvalidated
            self.validator.fetches = previous.validator.fetches

    def metrics(self) -> list[Metric]:
        return [
            *(
                Metric(
                    "answers", n, labels=(("result", status),), help="answers by validation result"
                )
                for status, n in self.counts.items()
            ),
            Metric("unvalidated", self.unvalidated, help="errors and local answers passed as is"),
            Metric("fetches", self.validator.fetches, help="DS and DNSKEY queries sent"),
            Metric("keys", len(self.validator.store), kind="gauge", help="DS/DNSKEY sets held"),
        ]


def derive(q: Query, qname: bytes, qtype: int) -> Query:
    """A query this step asks on ``q``'s behalf (same client and transport, so scoped steps
        route it as they route ``q``), with DO and CD set: the answer comes with its RRSIGs and
        unfiltered by a validating upstream, and without the client's EDNS options or notes
    (unlike `Query.derive`, which asks the client's own question again). The one place this
    step builds queries."""
    header = wire.HEADER.pack(q.id, wire.RD | wire.CD, 1, 0, 0, 1)
    opt = wire.opt_record(FETCH_UDP_SIZE, do=True)
    data = header + qname + wire.QTYPE_CLASS.pack(qtype, q.qclass) + opt
    sub = wire.parse_query(data, q.client, q.transport)
    sub.received = q.received
    return sub


def _with_ad(reply: Reply, ad: bool, cd: bool) -> Reply:
    """``reply`` with AD as validated and CD as the client sent it (not as this step asked)."""
    w = reply.wire
    flags = (w[3] & ~(wire.AD | wire.CD)) | (wire.AD if ad else 0) | (wire.CD if cd else 0)
    if flags == w[3]:
        return reply
    return reply.evolve(wire_=w[:3] + bytes((flags,)) + w[4:])


def _stripped(reply: Reply) -> Reply:
    """``reply`` without RRSIG/NSEC/NSEC3, for a client that did not set DO (RFC 4035 §3.2.1)."""
    msg = reply.message()
    if not any(r.rdtype in DNSSEC_TYPES for r in (*msg.answer, *msg.authority)):
        return reply
    out = dns.message.Message(id=msg.id)
    out.flags = msg.flags
    out.set_rcode(msg.rcode())
    out.question = list(msg.question)
    out.answer = [r for r in msg.answer if r.rdtype not in DNSSEC_TYPES]
    out.authority = [r for r in msg.authority if r.rdtype not in DNSSEC_TYPES]
    return reply.evolve(wire_=out.to_wire())


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("dnssec", Dnssec)
