"""loadbalance: multi-address answers change order across queries; nothing else changes."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rrset
import pytest

from dnsproxy import wire
from dnsproxy.chain import Step
from dnsproxy.errors import ConfigError
from dnsproxy.reply import Reply, finalize, respond, rr
from dnsproxy.testing import Answer, build_step, make_query, run_chain

ADDRS = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


def order(reply: Reply, q) -> list[str]:
    msg = dns.message.from_wire(finalize(reply, q, 1232))
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


class Fixed(Step):
    """Answers ADDRS in a fixed order: owners compressed to the question, or (``cname``)
    a CNAME to lb.example.net and A records with that owner written out in full."""

    def __init__(self, cname: bool = False) -> None:
        super().__init__(None, Answer({}).setup)
        self.cname = cname

    def query(self, q):
        if not self.cname:
            records = [rr(1, 60, ipaddress.ip_address(a).packed) for a in ADDRS]
            return respond(q, answers=records, source="stub")
        target = wire.name_to_key("lb.example.net")
        records = [rr(5, 60, target)] + [
            rr(1, 60, ipaddress.ip_address(a).packed, name=target) for a in ADDRS
        ]
        return respond(q, answers=records, source="stub")


async def test_round_robin_rotates_addresses_across_queries():
    step = build_step("loadbalance", {})
    nxt = Fixed()
    seen = []
    for _ in range(3):
        q = make_query("www.example.org")
        seen.append(order(await run_chain([step, nxt], q), q))
    assert [s[0] for s in seen] == ["192.0.2.2", "192.0.2.3", "192.0.2.1"]
    assert all(sorted(s) == ADDRS for s in seen)
    assert step.metrics()[0].value == 2  # the third order is the original one


async def test_cname_stays_first_and_uncompressed_records_are_reordered_safely():
    step = build_step("loadbalance", {})
    nxt = Fixed(cname=True)
    firsts = []
    for _ in range(3):
        q = make_query("www.example.org")
        msg = dns.message.from_wire(finalize(await run_chain([step, nxt], q), q, 1232))
        assert msg.answer[0].rdtype == 5  # CNAME first
        firsts.append(next(iter(msg.answer[1])).to_text())
    assert firsts == ["192.0.2.2", "192.0.2.3", "192.0.2.1"]
    assert msg.answer[1].name.to_text() == "lb.example.net."


async def test_random_policy_only_permutes():
    step = build_step("loadbalance", {"policy": "random"})
    nxt = Answer({"www.example.org": ADDRS})
    orders = set()
    for _ in range(30):
        q = make_query("www.example.org")
        got = order(await run_chain([step, nxt], q), q)
        assert sorted(got) == ADDRS
        orders.add(tuple(got))
    assert len(orders) > 1


async def test_single_address_and_other_types_are_untouched():
    step = build_step("loadbalance", {})
    nxt = Answer({"one.example.org": "192.0.2.1", "mx.example.org": ["MX 10 a.", "MX 20 b."]})
    for name, rdtype in (("one.example.org", "A"), ("mx.example.org", "MX")):
        q = make_query(name, rdtype)
        direct = await run_chain([nxt], q)
        assert (await run_chain([step, nxt], q)).wire == direct.wire


def test_bad_policy():
    with pytest.raises(ConfigError, match=r"chain\[0\] \(loadbalance\): option 'policy'"):
        build_step("loadbalance", {"policy": "weighted"})


class Blocked(Fixed):
    """`Fixed`'s answer marked blocked without an EDE and kept out of the caches."""

    def query(self, q):
        reply = super().query(q)
        return Reply(reply.wire, source="policy", blocked=True, cacheable=False)


async def test_a_reordered_reply_stays_blocked_and_uncacheable():
    step = build_step("loadbalance", {})
    for nxt in (Blocked(), Blocked(cname=True)):  # reordered in place, and rebuilt
        q = make_query("www.example.org")
        reply = await run_chain([step, nxt], q)
        assert [a for a in order(reply, q) if a in ADDRS] != ADDRS  # reordered: a new reply
        assert (reply.blocked, reply.cacheable, reply.source) == (True, False, "policy")
