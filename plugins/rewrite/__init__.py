"""rewrite: change the names, types, TTLs and rcodes of queries for the names you choose
(README.md beside this file). The rules are parsed in `rules`; this is the step."""

from __future__ import annotations

import struct
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset

from dnsproxy import wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_SYNTHESIZED, Reply, respond
from dnsproxy.wire import Query

from .rules import RewriteOptions, Rule

YXDOMAIN = 6
U32 = struct.Struct("!I")


class Rewrite(Step):
    Options = RewriteOptions
    pure = True

    def __init__(self, opts: RewriteOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.exact: dict[bytes, list[Rule]] = {}
        self.zone: dict[bytes, list[Rule]] = {}
        self.text_rules: list[Rule] = []
        for rule in opts.rules:
            if rule.kind == "exact":
                self.exact.setdefault(wire.name_to_key(rule.pattern), []).append(rule)
            elif rule.kind == "zone":
                self.zone.setdefault(wire.name_to_key(rule.pattern), []).append(rule)
            else:
                self.text_rules.append(rule)
        self.has_ttl = any(r.ttl is not None and r.to is None for r in opts.rules)
        self.renamed = 0
        self.synthesized = 0
        self.clamped = 0

    def find(self, q: Query) -> tuple[Rule, str] | None:
        """The rule for ``q`` and the matched name as text (the new name for a ``to`` rule)."""
        qtype = q.qtype
        for rule in self.exact.get(q.key, ()):
            if rule.applies(qtype):
                return rule, rule.to or rule.pattern
        best: Rule | None = None
        if self.zone:
            for parent in wire.parents(q.key):
                for rule in self.zone.get(parent, ()):
                    if rule.applies(qtype) and (best is None or rule.index < best.index):
                        best = rule
                        break
        text = ""
        if self.text_rules:
            text = wire.key_to_text(q.key)
            for rule in self.text_rules:
                if best is not None and rule.index > best.index:
                    break
                if rule.applies(qtype):
                    new = rule.test(text)
                    if new is not None:
                        return rule, new
        if best is None:
            return None
        if best.to is None:
            return best, best.pattern
        return best, best.rename(text or wire.key_to_text(q.key))

    def query(self, q: Query) -> Any:
        found = self.find(q)
        if found is None:
            return None
        rule, _ = found
        q.note("rewrite", rule.label)
        if rule.rcode is not None:
            self.synthesized += 1
            q.explain(f"{self.setup.where}: rule {rule.index} ({rule.label}): rcode answer")
            return respond(
                q,
                rule.rcode,
                ede=[(EDE_SYNTHESIZED, f"rewrite: {rule.label}")],
                source=self.setup.name,
            )
        if rule.to is not None:
            return AWAIT
        return None  # a TTL rule: acts in response()

    async def resolve(self, q: Query) -> Reply | None:
        found = self.find(q)
        assert found is not None and found[0].to is not None
        rule, new_text = found
        try:
            new_name = dns.name.from_text(new_text + ".")
        except dns.exception.DNSException:
            q.explain(f"{self.setup.where}: rule {rule.index}: {new_text!r} is not a valid name")
            return respond(
                q,
                YXDOMAIN,
                ede=[(EDE_SYNTHESIZED, f"rewrite: {rule.label}")],
                source=self.setup.name,
            )
        self.renamed += 1
        q.explain(f"{self.setup.where}: rule {rule.index} ({rule.label}): renamed to {new_text}")
        q2 = q.derive(new_name.to_wire())
        assert self.chain is not None
        reply = await self.chain.pass_on(self, q2)
        if reply is None:  # a later step dropped it; resolve() cannot drop, so refuse
            return respond(q, wire.REFUSED, source=self.setup.name)
        return self._restore(q, reply, rule, wire.key_to_text(q.key), new_text)

    def _restore(self, q: Query, reply: Reply, rule: Rule, asked: str, new: str) -> Reply:
        """The downstream reply under the asked name: a new message, the old one untouched."""
        try:
            src = reply.message()
        except (dns.exception.DNSException, ValueError):
            return respond(q, wire.SERVFAIL, source=self.setup.name)
        renamed: dict[dns.name.Name, dns.name.Name] = {}

        def restore(name: dns.name.Name) -> dns.name.Name:
            if name in renamed:
                return renamed[name]
            text = name.to_text(omit_final_dot=True).lower()
            back = asked if text == new else rule.back(text)
            out = name
            if back is not None:
                try:
                    out = q.name if back == asked else dns.name.from_text(back + ".")
                except dns.exception.DNSException:
                    out = name
            renamed[name] = out
            return out

        msg = dns.message.Message(id=src.id)
        msg.flags = src.flags & ~wire.AD
        msg.set_rcode(src.rcode())
        msg.question = [dns.rrset.RRset(q.name, q.qclass, q.qtype)]
        clamp = rule.ttl
        for section, out in (
            (src.answer, msg.answer),
            (src.authority, msg.authority),
            (src.additional, msg.additional),
        ):
            for rrset in section:
                owner = restore(rrset.name)
                if rrset.rdtype == dns.rdatatype.RRSIG and owner != rrset.name:
                    continue
                ttl = rrset.ttl
                if clamp is not None:
                    ttl = min(max(ttl, clamp[0]), clamp[1])
                copy = dns.rrset.RRset(owner, rrset.rdclass, rrset.rdtype, rrset.covers)
                for rd in rrset:
                    if rrset.rdtype == dns.rdatatype.CNAME:
                        rd = rd.replace(target=restore(rd.target))
                    copy.add(rd)
                copy.ttl = ttl
                out.append(copy)
        if clamp is not None:
            self.clamped += 1
        ede = (*reply.ede, (EDE_SYNTHESIZED, f"rewrite: {rule.label}"))
        # No OPT in msg; keep the downstream record order (dnspython shuffles by default).
        return reply.evolve(wire_=msg.to_wire(want_shuffle=False), ede=ede, blocked=reply.blocked)

    def response(self, q: Query, reply: Reply) -> Reply | None:
        if not self.has_ttl:
            return reply
        found = self.find(q)
        if found is None or found[0].ttl is None:
            return reply
        lo, hi = found[0].ttl
        try:
            recs = reply.records()
        except ValueError:
            return reply
        data: bytearray | None = None
        for rec in recs:
            ttl = U32.unpack_from(reply.wire, rec.ttl_off)[0]
            if lo <= ttl <= hi:
                continue
            if data is None:
                data = bytearray(reply.wire)
            U32.pack_into(data, rec.ttl_off, lo if ttl < lo else hi)
        if data is None:
            return reply
        self.clamped += 1
        q.explain(f"{self.setup.where}: rule {found[0].index}: TTLs clamped to [{lo}, {hi}]")
        return reply.evolve(wire_=bytes(data))

    def metrics(self) -> list[Metric]:
        return [
            Metric("renamed", self.renamed, help="queries sent on under a rewritten name"),
            Metric("synthesized", self.synthesized, help="queries answered by an rcode rule"),
            Metric("clamped", self.clamped, help="answers whose TTLs were clamped"),
        ]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("rewrite", Rewrite)
