"""rewrite — change the names, types, TTLs and rcodes of queries for the names you choose.

Name
    rewrite

Description
    Each rule matches the query name and does one thing to it:

    * ``to``: a name rule. The query goes on down the chain under the new name (so a
      ``forward`` scoped to the new name's zone answers it), and the answer comes back under
      the name the client asked for (CoreDNS's ``answer auto``): owner names, and CNAME
      targets inside the rewritten part of the namespace, are mapped back. RRSIGs of
      renamed records are dropped and AD is cleared, since the signatures no longer match.
    * ``rcode``: answer at once with ``NXDOMAIN``, ``REFUSED`` or ``NODATA`` (NOERROR with
      no records), with Extended DNS Error 29 (Synthesized).
    * ``ttl = [min, max]``: clamp the TTLs of every record in the answer that comes back.
      Combined with ``to``, the clamp applies to the rewritten answer.

    ``types = ["AAAA"]`` limits a rule to those query types, which gives type rules: the
    AAAA queries of a zone answered with NODATA while its A queries pass.

    Matching (names are compared lower-cased, without the trailing dot):

    ========== ==================================================================
    exact      the name is ``from``
    zone       the name is ``from`` or a name under it (label boundaries)
    prefix     the name starts with ``from``; that prefix is replaced by ``to``
    suffix     the name ends with ``from``; that suffix is replaced by ``to``
    substring  the name contains ``from``; its first occurrence is replaced by ``to``
    regex      the whole name matches ``from`` (anchored); ``{1}``, ``{2}``… in ``to``
               are its groups, ``{0}`` the whole name
    ========== ==================================================================

    Precedence, written down: **exact rules beat all others; otherwise the first matching
    rule in file order wins.** One rule acts per query per step; use two steps to rename
    and then act on the new name.

    Cost: ``exact`` and ``zone`` rules are dictionary lookups however many there are;
    ``prefix``, ``suffix``, ``substring`` and ``regex`` rules are tried one after another
    (only those before the first matching ``zone`` rule), so keep those to a handful and
    use ``blocklist`` for long lists of names.

    For a regex rule only the rewritten name itself is mapped back in the answer (a regex
    has no inverse); for the other kinds, any name in the answer that the rule's ``to``
    side produces is mapped back (a CNAME ``www.example.org`` → ``lb.example.org`` under
    a ``zone`` rule ``staging.example.org`` → ``example.org`` comes back as
    ``lb.staging.example.org``). A rewrite that makes an invalid name (too long) is
    answered YXDOMAIN, as DNAME substitution is (RFC 6672).

Syntax
    ::

        [[chain]]
        plugin = "rewrite"
        rules = [
          { match = "zone", from = "staging.example.org", to = "example.org" },
          { match = "regex", from = "(.+)\\\\.dev\\\\.test", to = "{1}.svc.example.org" },
          { match = "zone", from = "v4only.example.org", types = ["AAAA"], rcode = "NODATA" },
          { match = "zone", from = "example.org", ttl = [60, 3600] },
          { match = "exact", from = "wpad.example.org", rcode = "NXDOMAIN" },
        ]

    Keys of a rule: ``match`` (default ``exact``), ``from`` (required), then ``to``,
    ``rcode`` or ``ttl`` (``to`` and ``ttl`` may be combined), ``types``, and
    ``answer = "auto"`` (the only mode, accepted for CoreDNS users). At most
    ``max_rules`` rules (default 10000).

Metrics
    ``dnsproxy_rewrite_renamed`` (queries renamed), ``dnsproxy_rewrite_synthesized``
    (rcode/NODATA answers), ``dnsproxy_rewrite_clamped`` (answers whose TTLs were clamped).

Examples
    Serve staging names from production, without IPv6 for one zone::

        [[chain]]
        plugin = "rewrite"
        rules = [
          { match = "suffix", from = ".staging.example.org", to = ".example.org" },
          { match = "zone", from = "legacy.example.org", types = ["AAAA"], rcode = "NODATA" },
        ]

        [[chain]]
        plugin = "forward"
        upstreams = ["192.0.2.53"]
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from typing import Any

import attrs
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_SYNTHESIZED, Reply, edns_option, respond
from dnsproxy.wire import Query

KINDS = ("exact", "zone", "prefix", "suffix", "substring", "regex")
RCODES = {"NXDOMAIN": wire.NXDOMAIN, "REFUSED": wire.REFUSED, "NODATA": wire.NOERROR}
RULE_KEYS = ("match", "from", "to", "answer", "types", "rcode", "ttl")
MAX_TTL = 2**31 - 1  # RFC 2181 §8
YXDOMAIN = 6
U32 = struct.Struct("!I")
_GROUP = re.compile(r"\{(\d+)\}")
_PLAIN = b"abcdefghijklmnopqrstuvwxyz0123456789-_"


def key_text(key: bytes) -> str:
    """A lower-cased wire name as text without the final dot, fast for ordinary names.

    Names with any other byte go through dnspython, which escapes them as zone files do.
    """
    labels = []
    off = 0
    while n := key[off]:
        label = key[off + 1 : off + 1 + n]
        if label.translate(None, _PLAIN):
            return wire.key_to_text(key).lower()
        labels.append(label)
        off += n + 1
    return b".".join(labels).decode("ascii")


@attrs.frozen
class Rule:
    """One compiled rule; ``index`` is its position, which decides precedence."""

    index: int
    kind: str
    pattern: str  # ``from``, normalised
    to: str | None
    types: frozenset[int]
    rcode: int | None
    ttl: tuple[int, int] | None
    regex: re.Pattern[str] | None = attrs.field(eq=False)
    label: str

    def applies(self, qtype: int) -> bool:
        return not self.types or qtype in self.types

    def test(self, text: str) -> str | None:
        """For a text kind: the rewritten name (or ``text`` without ``to``) if it matches."""
        pat = self.pattern
        if self.kind == "suffix":
            if not text.endswith(pat):
                return None
            return text if self.to is None else text[: len(text) - len(pat)] + self.to
        if self.kind == "prefix":
            if not text.startswith(pat):
                return None
            return text if self.to is None else self.to + text[len(pat) :]
        if self.kind == "substring":
            if pat not in text:
                return None
            return text if self.to is None else text.replace(pat, self.to, 1)
        assert self.regex is not None
        m = self.regex.fullmatch(text)
        if m is None:
            return None
        if self.to is None:
            return text
        return _GROUP.sub(lambda g: m.group(int(g.group(1))) or "", self.to)

    def rename(self, text: str) -> str:
        """The new name for a matching ``text`` (exact and zone kinds)."""
        assert self.to is not None
        if self.kind == "exact":
            return self.to
        if self.kind == "zone":
            return self.to if text == self.pattern else text[: -len(self.pattern)] + self.to
        result = self.test(text)
        assert result is not None
        return result

    def back(self, text: str) -> str | None:
        """Map a name from the rewritten side back to the asked side, if the rule made it."""
        to, pat = self.to, self.pattern
        assert to is not None
        if self.kind == "zone":
            if text == to:
                return pat
            if text.endswith("." + to):
                return text[: -len(to)] + pat
        elif self.kind == "suffix" and text.endswith(to):
            return text[: len(text) - len(to)] + pat
        elif self.kind == "prefix" and text.startswith(to):
            return pat + text[len(to) :]
        elif self.kind == "substring" and to in text:
            return text.replace(to, pat, 1)
        return None


def _dns_name(value: str, what: str) -> str:
    """Normalise a full domain name (lower-case, no trailing dot), checking it is valid."""
    try:
        name = dns.name.from_text(value)
    except dns.exception.DNSException as exc:
        raise ValueError(f"{what}: {value!r} is not a domain name ({exc})") from exc
    return name.to_text(omit_final_dot=True).lower()


def _ttl_range(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError("ttl: expected [min, max] in seconds, e.g. [60, 3600]")
    lo, hi = value
    if not 0 <= lo <= hi <= MAX_TTL:
        raise ValueError(f"ttl: need 0 <= min <= max <= {MAX_TTL}, got [{lo}, {hi}]")
    return (lo, hi)


def _types(value: object) -> frozenset[int]:
    out = set()
    for item in options.string_tuple(value):
        try:
            out.add(dns.rdatatype.from_text(item))
        except dns.rdatatype.UnknownRdatatype as exc:
            raise ValueError(f"types: unknown record type {item!r}") from exc
    return frozenset(out)


def _rule(index: int, table: object) -> Rule:
    if not isinstance(table, Mapping):
        raise ValueError('expected a table such as { match = "zone", from = ..., to = ... }')
    for key in table:
        if key not in RULE_KEYS:
            raise ValueError(f"unknown key {key!r}{options.suggest(key, RULE_KEYS)}")
    kind = table.get("match", "exact")
    if kind not in KINDS:
        raise ValueError(f"match: must be one of {', '.join(KINDS)}, got {kind!r}")
    pattern, to, rcode_text = table.get("from"), table.get("to"), table.get("rcode")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("from: required, a non-empty string")
    if to is not None and (not isinstance(to, str) or not to.strip(".")):
        raise ValueError("to: must be a non-empty name")
    if table.get("answer", "auto") != "auto":
        raise ValueError('answer: only "auto" is supported (answers are mapped back)')
    if rcode_text is not None and rcode_text not in RCODES:
        raise ValueError(f"rcode: must be one of {', '.join(RCODES)}, got {rcode_text!r}")
    ttl = _ttl_range(table["ttl"]) if "ttl" in table else None
    if to is None and rcode_text is None and ttl is None:
        raise ValueError("needs an action: to, rcode or ttl")
    if rcode_text is not None and (to is not None or ttl is not None):
        raise ValueError("rcode answers at once: it cannot be combined with to or ttl")
    types = _types(table["types"]) if "types" in table else frozenset()
    regex = None
    if kind in ("exact", "zone"):
        pattern = _dns_name(pattern, "from")
        if to is not None:
            to = _dns_name(to, "to")
    elif kind == "regex":
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"from: bad regex {pattern!r}: {exc}") from exc
        for ref in _GROUP.findall(to or ""):
            if int(ref) > regex.groups:
                raise ValueError(f"to: {{{ref}}} but the regex has {regex.groups} group(s)")
        to = to.lower().rstrip(".") if to is not None else None
    else:
        pattern = pattern.lower()
        if kind != "prefix":
            pattern = pattern.rstrip(".") or pattern
        if to is not None:
            to = to.lower() if kind == "prefix" else to.lower().rstrip(".")
    label = f"{kind} {pattern}"
    return Rule(
        index=index,
        kind=kind,
        pattern=pattern,
        to=to,
        types=types,
        rcode=RCODES[rcode_text] if rcode_text is not None else None,
        ttl=ttl,
        regex=regex,
        label=label[:60],
    )


def _rules(value: object) -> tuple[Rule, ...]:
    if isinstance(value, tuple) and all(isinstance(r, Rule) for r in value):
        return value
    if not isinstance(value, list | tuple):
        raise TypeError("expected a list of rule tables")
    out = []
    for i, table in enumerate(value):
        try:
            out.append(_rule(i, table))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[{i}]: {exc}") from exc
    return tuple(out)


@attrs.frozen
class RewriteOptions:
    rules: tuple[Rule, ...] = attrs.field(converter=_rules)
    max_rules: int = attrs.field(default=10000, validator=options.in_range(1, 1_000_000))

    def __attrs_post_init__(self) -> None:
        if not self.rules:
            raise ValueError("'rules' is empty: add at least one rule")
        if len(self.rules) > self.max_rules:
            raise ValueError(
                f"'rules' has {len(self.rules)} entries, more than max_rules = {self.max_rules}"
            )


class Rewrite(Step):
    Options = RewriteOptions

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
            text = key_text(q.key)
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
        return best, best.rename(text or key_text(q.key))

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
        q2 = subquery(q, new_name.to_wire())
        assert self.chain is not None
        reply = await self.chain.pass_on(self, q2)
        if reply is None:  # a later step dropped it; resolve() cannot drop, so refuse
            return respond(q, wire.REFUSED, source=self.setup.name)
        return self._restore(q, reply, rule, key_text(q.key), new_text)

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
        return Reply(msg.to_wire(want_shuffle=False), ede=ede, source=reply.source)

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


def subquery(q: Query, qname: bytes) -> Query:
    """``q`` asked for another name: same ID, flags, client, EDNS (size, DO, options).

    The trace and notes are shared, so what later steps record shows up for ``q``.
    """
    header = wire.HEADER.pack(q.id, q.flags, 1, 0, 0, 1 if q.edns else 0)
    data = header + qname + struct.pack("!HH", q.qtype, q.qclass)
    if q.edns:
        opts = b"".join(edns_option(code, value) for code, value in q.edns_options)
        ttl = wire.EDNS_DO if q.do else 0
        data += b"\x00" + wire.RR_FIXED.pack(wire.OPT, q.udp_size, ttl, len(opts)) + opts
    q2 = wire.parse_query(data, q.client, q.transport)
    if q.notes is None:
        q.notes = {}
    q2.notes = q.notes
    q2.trace = q.trace
    q2.received = q.received
    return q2


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("rewrite", Rewrite)
