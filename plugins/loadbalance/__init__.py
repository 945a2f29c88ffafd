"""loadbalance: rotate the A/AAAA records of an answer across queries, on the way back
(README.md beside this file documents the options, metrics and examples).

The reorder moves wire slices when every record to move is a compression pointer to an
earlier name (nothing can point into such a record), and falls back to dnspython
otherwise; either way the result is a new `Reply`, never a change to a shared one.
"""

from __future__ import annotations

import random
from typing import Literal

import attrs
import dns.exception
import dns.message
import dns.rdatatype

from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import Reply
from dnsproxy.wire import Query

ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


@attrs.frozen
class LoadBalanceOptions:
    policy: Literal["round_robin", "random"] = "round_robin"


class LoadBalance(Step):
    Options = LoadBalanceOptions

    def __init__(self, opts: LoadBalanceOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.turn = 0
        self.rand = random.Random()
        self.rotated = 0

    def _shift(self, n: int) -> list[int]:
        """The new order of ``n`` records."""
        if self.options.policy == "random":
            order = list(range(n))
            self.rand.shuffle(order)
            return order
        self.turn += 1
        k = self.turn % n
        return [*range(k, n), *range(k)]

    def response(self, q: Query, reply: Reply) -> Reply | None:
        if reply.ancount < 2 or q.qtype not in ADDRESS_TYPES:
            return reply
        try:
            recs = reply.records()
        except ValueError:
            return reply
        pos = [i for i, r in enumerate(recs) if r.section == 1 and r.rtype == q.qtype]
        if len(pos) < 2:
            return reply
        order = self._shift(len(pos))
        if order == sorted(order):
            return reply
        self.rotated += 1
        data = reply.wire
        first, last = recs[pos[0]], recs[pos[-1]]
        if pos == list(range(pos[0], pos[-1] + 1)) and all(
            _points_before(data, recs[i].name_off, first.name_off) for i in pos
        ):
            parts = [data[recs[i].name_off : recs[i].end] for i in pos]
            body = b"".join(parts[i] for i in order)
            return reply.evolve(wire_=data[: first.name_off] + body + data[last.end :])
        return _reorder_parsed(reply, q.qtype, order)

    def metrics(self) -> list[Metric]:
        return [Metric("rotated", self.rotated, help="answers whose addresses were reordered")]


def _points_before(data: bytes, off: int, limit: int) -> bool:
    """Whether the name at ``off`` is a single compression pointer to before ``limit``.

    Such records can move without breaking any pointer: nothing points into them.
    """
    return data[off] & 0xC0 == 0xC0 and ((data[off] & 0x3F) << 8 | data[off + 1]) < limit


def _reorder_parsed(reply: Reply, qtype: int, order: list[int]) -> Reply:
    """The same reorder through dnspython, for records the wire path cannot move."""
    try:
        src = reply.message()
    except (dns.exception.DNSException, ValueError):
        return reply
    msg = dns.message.Message(id=src.id)
    msg.flags = src.flags
    msg.set_rcode(src.rcode())
    msg.question = list(src.question)
    msg.authority = list(src.authority)
    msg.additional = list(src.additional)
    rdatas = [(rrset, rd) for rrset in src.answer if rrset.rdtype == qtype for rd in rrset]
    if len(rdatas) != len(order):
        return reply
    copies = {}
    for rrset in src.answer:
        if rrset.rdtype != qtype:
            msg.answer.append(rrset)
            continue
        copy = copies[id(rrset)] = rrset.copy()
        copy.clear()
        msg.answer.append(copy)
    for i in order:
        rrset, rd = rdatas[i]
        copies[id(rrset)].add(rd, rrset.ttl)
    return reply.evolve(wire_=msg.to_wire(want_shuffle=False))


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("loadbalance", LoadBalance)
