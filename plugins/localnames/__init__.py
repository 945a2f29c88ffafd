"""localnames: answer RFC 6761/6303 special-use names and single-label names locally,
so they never leak to the internet's resolvers (README.md beside this file documents the
behaviour, options, metrics and examples).

Every answer is prepared when the step is built; a name covered by a later step's
``zones`` is left to that step (learned in `attached` through `Chain.after`).
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Callable
from typing import Any, Literal

import attrs
import dns.exception
import dns.name
import dns.rdatatype

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Chain, Metric, Scope, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_SYNTHESIZED, Reply, respond, rr
from dnsproxy.wire import AAAA, NS, PTR, SOA, A, Query

ZONE_TYPES = frozenset({SOA, NS, dns.rdatatype.DS, dns.rdatatype.DNSKEY})
LOCALHOST = wire.name_to_key("localhost")
LOOPBACK_V4 = ipaddress.ip_address("127.0.0.1").packed
LOOPBACK_V6 = ipaddress.ip_address("::1").packed
LOCALHOST_PTRS = frozenset(
    wire.name_to_key(ipaddress.ip_address(a).reverse_pointer) for a in ("127.0.0.1", "::1")
)


def _reverse_zones() -> tuple[str, ...]:
    """RFC 6303 §4 (IPv4 and IPv6) and RFC 7793 (100.64.0.0/10) zone names."""
    v4 = ["0", "10", "127", "254.169", "2.0.192", "100.51.198", "113.0.203", "255.255.255.255"]
    v4 += [f"{i}.172" for i in range(16, 32)] + ["168.192"]
    v4 += [f"{i}.100" for i in range(64, 128)]
    zeros = ".".join(["0"] * 31)
    v6 = [f"0.{zeros}", f"1.{zeros}", "d.f", "8.e.f", "9.e.f", "a.e.f", "b.e.f"]
    v6 += ["8.b.d.0.1.0.0.2"]
    return tuple(f"{z}.in-addr.arpa" for z in v4) + tuple(f"{z}.ip6.arpa" for z in v6)


REVERSE_ZONES = _reverse_zones()


def _zone_names(value: object) -> tuple[str, ...]:
    out = []
    for item in options.string_tuple(value):
        try:
            out.append(dns.name.from_text(item).to_text(omit_final_dot=True).lower())
        except dns.exception.DNSException as exc:
            raise ValueError(f"{item!r} is not a domain name") from exc
    return tuple(out)


@attrs.frozen
class LocalNamesOptions:
    localhost: bool = True
    nxdomain_zones: tuple[str, ...] = attrs.field(
        default=("invalid", "test", "local", "onion"), converter=_zone_names
    )
    reverse: bool = True
    single_label: Literal["nxdomain", "forward", "pass"] = "nxdomain"
    upstreams: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    ttl: int = attrs.field(default=10800, validator=options.in_range(0, 604800))

    def __attrs_post_init__(self) -> None:
        if self.single_label == "forward" and not self.upstreams:
            raise ValueError("single_label = 'forward' needs 'upstreams' (e.g. your router)")
        if self.upstreams and self.single_label != "forward":
            raise ValueError("'upstreams' is only used with single_label = 'forward'")


def _soa_rdata(ttl: int) -> bytes:
    mname = wire.name_to_key("localhost")
    rname = wire.name_to_key("nobody.invalid")
    return mname + rname + struct.pack("!IIIII", 1, 3600, 1200, 604800, ttl)


class _Zone:
    """One locally answered zone, with everything its answers need built in advance."""

    __slots__ = ("ede", "kind", "note", "soa", "text")

    def __init__(self, key: bytes, kind: str, ttl: int) -> None:
        self.kind = kind
        self.text = wire.key_to_text(key)
        self.note = f"special-use {self.text}"
        self.ede = ((EDE_SYNTHESIZED, f"special-use name ({self.text})"),)
        self.soa = [rr(SOA, ttl, _soa_rdata(ttl), name=key)]


class LocalNames(Step):
    Options = LocalNamesOptions
    pure = True

    def __init__(self, opts: LocalNamesOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        kinds: dict[bytes, str] = {}
        for zone in opts.nxdomain_zones:
            kinds[wire.name_to_key(zone)] = "nxdomain"
        if opts.reverse:
            for zone in REVERSE_ZONES:
                kinds.setdefault(wire.name_to_key(zone), "reverse")
        if opts.localhost:
            kinds[LOCALHOST] = "localhost"
        self.local = {key: _Zone(key, kind, opts.ttl) for key, kind in kinds.items()}
        self.forward: Step | None = None
        if opts.single_label == "forward":
            if setup.make_step is None:
                raise setup.error("single_label", "'forward' needs a setup that builds steps")
            # The helper shares this step's setup, so its errors and logs name this step;
            # not its scope (forward trims answers to its zones).
            helper = attrs.evolve(setup, scope=Scope())
            self.forward = setup.make_step("forward", {"upstreams": list(opts.upstreams)}, helper)
        self.deferred: frozenset[bytes] = frozenset()
        self.answered = dict.fromkeys(("localhost", "nxdomain", "reverse", "single_label"), 0)
        self.forwarded = 0

    def attached(self, chain: Chain) -> None:
        """Learn the zones of the steps after this one: names under them are theirs."""
        self.deferred = frozenset(z for s in chain.after(self) for z in s.scope.zones)

    def packet_recount(self, q: Query, reply: Reply) -> Callable[[], None]:
        """A replay counts as the kind of local name it answered, as `query` counted it."""
        kind = "single_label"
        for parent in wire.parents(q.key):
            zone = self.local.get(parent)
            if zone is not None:
                kind = zone.kind
                break
        return functools.partial(self._count, kind)

    def _count(self, kind: str) -> None:
        self.answered[kind] += 1

    def query(self, q: Query) -> Any:
        key = q.key
        zones = self.local
        for parent in wire.parents(key):
            zone = zones.get(parent)
            if zone is not None:
                if self._routed(key):
                    return None
                return self._answer(q, parent, zone)
        if len(key) > 1 and key[0] + 2 == len(key) and q.qtype not in ZONE_TYPES:
            if self.options.single_label == "pass" or self._routed(key):
                return None
            if self.forward is not None:
                self.forwarded += 1
                return AWAIT
            self.answered["single_label"] += 1
            q.note("rule", "single-label name")
            return respond(
                q,
                wire.NXDOMAIN,
                ede=[(EDE_SYNTHESIZED, "single-label name, not sent upstream")],
                source=self.setup.name,
            )
        return None

    def _routed(self, key: bytes) -> bool:
        deferred = self.deferred
        return bool(deferred) and any(p in deferred for p in wire.parents(key))

    def _answer(self, q: Query, key: bytes, zone: _Zone) -> Reply:
        kind = zone.kind
        self.answered[kind] += 1
        q.note("rule", zone.note)
        q.explain(f"{self.setup.where}: {zone.text} is answered locally ({kind})")
        ttl = self.options.ttl
        answers: list[bytes] = []
        if kind == "localhost":
            if q.qtype == A:
                answers = [rr(A, ttl, LOOPBACK_V4)]
            elif q.qtype == AAAA:
                answers = [rr(AAAA, ttl, LOOPBACK_V6)]
        elif kind == "reverse" and q.qtype == PTR and q.key in LOCALHOST_PTRS:
            answers = [rr(PTR, ttl, LOCALHOST)]
        name = self.setup.name
        if answers:
            return respond(q, answers=answers, aa=True, ede=zone.ede, source=name)
        if kind == "localhost" or (kind == "reverse" and q.key == key):
            if q.key == key and q.qtype == SOA:
                return respond(q, answers=zone.soa, aa=True, ede=zone.ede, source=name)
            return respond(q, authority=zone.soa, aa=True, ede=zone.ede, source=name)
        return respond(q, wire.NXDOMAIN, authority=zone.soa, aa=True, ede=zone.ede, source=name)

    def begin(self, q: Query, done: Callable[[Reply | None], None]) -> None:
        assert self.forward is not None
        self.forward.begin(q, done)

    def ready(self) -> bool:
        return self.forward is None or self.forward.ready()

    def metrics(self) -> list[Metric]:
        out = [
            Metric("answered", n, labels=(("kind", kind),), help="queries answered locally")
            for kind, n in self.answered.items()
        ]
        out.append(Metric("forwarded", self.forwarded, help="single-label names forwarded"))
        return out

    def close(self) -> None:
        if self.forward is not None:
            self.forward.close()


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("localnames", LocalNames)
