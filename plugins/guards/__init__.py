"""guards: keep clients on this resolver and its filtering (the Firefox canary, iCloud
Private Relay, DNS-rebinding protection). README.md beside this file documents the
options, metrics and examples.
"""

from __future__ import annotations

import ipaddress

import attrs

from dnsproxy import options, wire
from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_BLOCKED, Reply, respond
from dnsproxy.wire import Query

CANARY = wire.name_to_key("use-application-dns.net")
PRIVATE_RELAY = frozenset(wire.name_to_key(n) for n in ("mask.icloud.com", "mask-h2.icloud.com"))
PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def _zones(value: object) -> tuple[bytes, ...]:
    if isinstance(value, tuple) and all(isinstance(v, bytes) for v in value):
        return value
    return tuple(wire.name_to_key(z) for z in options.string_tuple(value))


@attrs.frozen
class GuardsOptions:
    canary: bool = True
    icloud_private_relay: bool = False
    rebinding: bool = True
    rebinding_allow: tuple[bytes, ...] = attrs.field(default=(), converter=_zones)


def private(rtype: int, rdata: bytes) -> bool:
    """Whether an A or AAAA record's address is private, loopback or link-local."""
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    if rtype == wire.A and len(rdata) == 4:
        addr = ipaddress.IPv4Address(rdata)
    elif rtype == wire.AAAA and len(rdata) == 16:
        addr = ipaddress.IPv6Address(rdata)
        addr = addr.ipv4_mapped or addr
    else:
        return False
    return any(addr in net for net in PRIVATE)


class Guards(Step):
    """Answers the bypass canaries and drops rebinding answers (see the module doc)."""

    Options = GuardsOptions

    def __init__(self, opts: GuardsOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.opts = opts
        self.allow = frozenset(opts.rebinding_allow)
        self.counts = {"canary": 0, "private_relay": 0, "rebinding": 0}

    def query(self, q: Query) -> Reply | None:
        key = q.key
        if key == CANARY and self.opts.canary:
            self.counts["canary"] += 1
            q.explain(f"{self.setup.where}: the Firefox DoH canary: NXDOMAIN")
            return respond(q, wire.NXDOMAIN, source="guards")
        if key in PRIVATE_RELAY and self.opts.icloud_private_relay:
            self.counts["private_relay"] += 1
            q.explain(f"{self.setup.where}: iCloud Private Relay: NXDOMAIN")
            return respond(q, wire.NXDOMAIN, source="guards")
        return None

    def response(self, q: Query, reply: Reply) -> Reply | None:
        if not self.opts.rebinding or not reply.ancount:
            return reply
        if self.allow and any(p in self.allow for p in wire.parents(q.key)):
            return reply
        try:
            recs = reply.records()
        except ValueError:
            return reply
        data = reply.wire
        for r in recs:
            if r.section == 1 and private(r.rtype, data[r.rdata_off : r.end]):
                self.counts["rebinding"] += 1
                q.explain(f"{self.setup.where}: a private address for a public name: NXDOMAIN")
                q.note("guard", "rebinding")
                ede = [(EDE_BLOCKED, "rebinding")]
                return respond(q, wire.NXDOMAIN, ede=ede, source="guards")
        return reply

    def metrics(self) -> list[Metric]:
        return [Metric(name, value) for name, value in self.counts.items()]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("guards", Guards)
