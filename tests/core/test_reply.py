"""Fitting a reply to its client: ID, case, flags, OPT, size limits and TC."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from dnsproxy import reply as rp
from dnsproxy import wire
from dnsproxy.testing import make_query
from dnsproxy.wire import Reject, parse_query


def big_reply(q, count: int = 40) -> rp.Reply:
    msg = rp.response_message(q)
    rdatas = [f'"{i:03d}-' + "x" * 40 + '"' for i in range(count)]
    msg.answer.append(dns.rrset.from_text(q.name, 300, "IN", "TXT", *rdatas))
    return rp.Reply.from_message(msg, source="test")


def test_respond_echoes_id_question_case_and_flags():
    q = make_query("WWW.example.ORG", "A", edns=False)
    r = rp.respond(q, answers=[rp.rr(1, 60, bytes([192, 0, 2, 1]))], aa=True)
    out = dns.message.from_wire(rp.finalize(r, q, 1232))
    assert out.id == q.id
    assert out.question[0].name.to_text() == "WWW.example.ORG."
    assert out.flags & dns.flags.QR and out.flags & dns.flags.AA and out.flags & dns.flags.RA
    assert out.answer[0][0].address == "192.0.2.1"
    assert out.edns == -1  # no OPT in the reply to a query without one


def test_finalize_restores_client_case_in_a_cached_reply():
    stored = rp.respond(make_query("www.example.org"), answers=[rp.rr(1, 60, b"\xc0\x00\x02\x01")])
    q = make_query("wWw.ExAmPlE.oRg")
    out = rp.finalize(stored, q, 1232)
    assert out[12 : 12 + len(q.qname)] == q.qname
    assert struct.unpack_from("!H", out)[0] == q.id


def test_opt_echoes_do_and_carries_ede():
    q = make_query("example.org", do=True)
    r = rp.respond(q, wire.NXDOMAIN, ede=[(rp.EDE_BLOCKED, "ads list")])
    out = dns.message.from_wire(rp.finalize(r, q, 1232))
    assert out.edns == 0 and out.ednsflags & dns.flags.DO
    assert out.payload == 1232
    (ede,) = out.options
    assert isinstance(ede, dns.edns.EDEOption)
    assert (ede.code, ede.text) == (15, "ads list")


def test_ad_is_cleared_unless_client_asked():
    q = make_query("example.org")
    r = rp.respond(q)
    data = bytearray(r.wire)
    data[3] |= 0x20
    out = rp.finalize(rp.Reply(bytes(data)), q, 1232)
    assert not out[3] & 0x20
    out = rp.finalize(rp.Reply(bytes(data)), make_query("example.org", do=True), 1232)
    assert out[3] & 0x20


@pytest.mark.parametrize(
    ("edns", "payload", "transport", "limit"),
    [
        (False, 0, "udp", 512),
        (True, 512, "udp", 512),
        (True, 4096, "udp", 1232),
        (True, 800, "udp", 800),
        (False, 0, "tcp", 65535),
    ],
)
def test_size_limits(edns, payload, transport, limit):
    q = make_query(
        "big.example.org", "TXT", edns=edns, payload=payload or 1232, transport=transport
    )
    assert rp.limit_for(q, 1232) == limit
    out = rp.finalize(big_reply(q), q, 1232)
    assert len(out) <= limit
    msg = dns.message.from_wire(out)
    if len(big_reply(q).wire) > limit:
        assert msg.flags & dns.flags.TC and not msg.answer
    else:
        assert not msg.flags & dns.flags.TC and msg.answer


def test_error_wire_formerr_without_question():
    rej = Reject(wire.FORMERR, 0xBEEF, 0x0100)
    out = dns.message.from_wire(rp.error_wire(rej, 1232))
    assert out.id == 0xBEEF and out.rcode() == dns.rcode.FORMERR and not out.question


def test_error_wire_badvers_has_opt_version_0():
    data = dns.message.make_query("example.org", "A", use_edns=1).to_wire()
    with pytest.raises(Reject) as exc:
        parse_query(data, ("127.0.0.1", 1), "udp")
    out = dns.message.from_wire(rp.error_wire(exc.value, 1232))
    assert out.rcode() == dns.rcode.BADVERS
    assert out.edns == 0
    assert out.question[0].name.to_text() == "example.org."


def test_from_message_drops_opt():
    q = make_query("example.org")
    msg = rp.response_message(q)
    msg.use_edns(0, payload=4096)
    r = rp.Reply.from_message(msg)
    assert struct.unpack_from("!H", r.wire, 10)[0] == 0
    assert r.message().edns == -1


@pytest.mark.parametrize(
    ("ede", "blocked"),
    [
        ((), False),
        (((rp.EDE_BLOCKED, "ads.txt"),), True),
        (((rp.EDE_CENSORED, ""),), True),
        (((rp.EDE_FILTERED, "quiet hours"),), True),
        (((rp.EDE_PROHIBITED, "acl"),), False),  # an ACL's refusal is not a block
        (((rp.EDE_STALE, "stale answer"),), False),
        (((rp.EDE_SYNTHESIZED, "rewrite"), (rp.EDE_FILTERED, "")), True),
    ],
)
def test_a_reply_counts_as_blocked_by_its_extended_dns_errors(ede, blocked):
    q = make_query("games.example")
    assert rp.respond(q, wire.NXDOMAIN, ede=ede, source="a_plugin").blocked is blocked
    msg = rp.response_message(q, wire.NXDOMAIN)
    assert rp.Reply.from_message(msg, ede=ede).blocked is blocked


def test_a_step_says_blocked_without_an_ede_and_the_flag_is_kept():
    q = make_query("games.example")
    r = rp.respond(q, wire.REFUSED, source="policy", blocked=True)
    assert r.blocked and r.ede == () and "blocked" in repr(r)
    assert not rp.respond(q, ede=[(rp.EDE_BLOCKED, "")], blocked=False).blocked
    assert rp.Reply.from_message(rp.response_message(q), blocked=True).blocked
    assert r.evolve(wire_=r.wire[:], ede=[(rp.EDE_STALE, "")]).blocked  # a copy stays blocked
    assert not r.evolve(blocked=False).blocked
    plain = rp.respond(q)
    assert plain.evolve(ede=[(rp.EDE_FILTERED, "late")]).blocked  # a step filtering a reply
    assert not plain.evolve(ede=[(rp.EDE_SYNTHESIZED, "")]).blocked
    assert rp.truncate(r, q).blocked  # too big for UDP: still the block, retried over TCP
    assert not rp.truncate(r, q, [(rp.EDE_RATE_LIMITED, "")]).blocked  # a slip is not
