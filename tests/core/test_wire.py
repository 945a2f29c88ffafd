"""The wire view: fast path, fallback, and the error policy of DESIGN.md / issue 2."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from dnsproxy import wire
from dnsproxy.wire import Drop, Reject, parse_query

CLIENT = ("127.0.0.1", 4000)


def q_wire(name: str = "www.Example.org", rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def header(
    msg_id: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!6H", msg_id, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x03org\x00\x00\x01\x00\x01"


def test_fast_path_reads_question_and_keeps_case():
    q = parse_query(q_wire(), CLIENT, "udp")
    assert q.qname == b"\x03www\x07Example\x03org\x00"
    assert q.key == b"\x03www\x07example\x03org\x00"
    assert (q.qtype, q.qclass, q.edns) == (1, 1, False)
    assert q.text == "www.example.org."
    assert q.question == b"\x03www\x07Example\x03org\x00\x00\x01\x00\x01"


def test_edns_fields():
    data = q_wire(
        use_edns=0, payload=4096, want_dnssec=True, options=[dns.edns.GenericOption(65001, b"xy")]
    )
    q = parse_query(data, CLIENT, "udp")
    assert q.edns and q.do and q.udp_size == 4096
    assert q.edns_options == ((65001, b"xy"),)


def test_small_payload_is_treated_as_512():
    q = parse_query(q_wire(use_edns=0, payload=100), CLIENT, "udp")
    assert q.udp_size == 512


@pytest.mark.parametrize("data", [b"", b"\x00" * 11])
def test_short_messages_are_dropped(data):
    with pytest.raises(Drop):
        parse_query(data, CLIENT, "udp")


def test_responses_are_dropped():
    with pytest.raises(Drop):
        parse_query(header(flags=0x8100) + QUESTION, CLIENT, "udp")


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (header(qd=0), wire.FORMERR),
        (header(qd=2) + QUESTION + QUESTION, wire.FORMERR),
        (header(an=1) + QUESTION, wire.FORMERR),
        (header() + QUESTION[:-2], wire.FORMERR),  # short question: no class
        (header() + b"\x03www", wire.FORMERR),  # name runs off the end
        (header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", wire.FORMERR),  # label type 01
        (
            header()
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x00\x00\x01\x00\x01",
            wire.FORMERR,
        ),
        (header(flags=0x7900) + QUESTION, wire.NOTIMP),  # opcode 15
        (header(flags=0x2900) + QUESTION, wire.NOTIMP),  # UPDATE is never forwarded
    ],
)
def test_rejects(data, rcode):
    with pytest.raises(Reject) as exc:
        parse_query(data, CLIENT, "udp")
    assert exc.value.rcode == rcode
    assert exc.value.msg_id == 0x1234


def opt(version: int = 0, rdata: bytes = b"", owner: bytes = b"\x00") -> bytes:
    return owner + struct.pack("!HHIH", 41, 1232, version << 16, len(rdata)) + rdata


def test_edns_version_1_is_badvers():
    with pytest.raises(Reject) as exc:
        parse_query(header(ar=1) + QUESTION + opt(version=1), CLIENT, "udp")
    assert exc.value.rcode == wire.BADVERS
    assert exc.value.query is not None  # the response echoes the question and OPT


def test_two_opt_records_are_formerr():
    with pytest.raises(Reject) as exc:
        parse_query(header(ar=2) + QUESTION + opt() + opt(), CLIENT, "udp")
    assert exc.value.rcode == wire.FORMERR


def test_opt_with_non_root_owner_is_formerr():
    with pytest.raises(Reject) as exc:
        parse_query(header(ar=1) + QUESTION + opt(owner=b"\x01a\x00"), CLIENT, "udp")
    assert exc.value.rcode == wire.FORMERR


def test_option_overrunning_rdata_is_formerr():
    with pytest.raises(Reject):
        parse_query(header(ar=1) + QUESTION + opt(rdata=b"\x00\x0a\x00\x08ab"), CLIENT, "udp")


@pytest.mark.parametrize("length", [0, 5, 7, 9, 15, 41, 64])
def test_malformed_cookie_is_formerr(length):
    """RFC 7873 §5.2.2: a COOKIE is 8 octets (client) or 16-40 (client + server)."""
    rdata = struct.pack("!HH", 10, length) + b"\x01" * length
    with pytest.raises(Reject) as exc:
        parse_query(header(ar=1) + QUESTION + opt(rdata=rdata), CLIENT, "udp")
    assert exc.value.rcode == wire.FORMERR
    assert exc.value.query is not None  # FORMERR echoes the question and carries an OPT


@pytest.mark.parametrize("length", [8, 16, 24, 40])
def test_wellformed_cookie_is_read(length):
    rdata = struct.pack("!HH", 10, length) + b"\x01" * length
    q = parse_query(header(ar=1) + QUESTION + opt(rdata=rdata), CLIENT, "udp")
    assert q.edns_options == ((10, b"\x01" * length),)


def test_hundreds_of_options_are_bounded():
    rdata = b"\xff\x00\x00\x00" * 500
    with pytest.raises(Reject):
        parse_query(header(ar=1) + QUESTION + opt(rdata=rdata), CLIENT, "udp")


def test_pointer_into_the_header_is_formerr():
    with pytest.raises(Reject):
        parse_query(header() + b"\x03www\xc0\x04\x00\x01\x00\x01", CLIENT, "udp")


@pytest.mark.parametrize("target", [12, 16])  # itself / forward of itself: loops
def test_self_and_forward_pointers_are_formerr(target):
    with pytest.raises(Reject):
        parse_query(
            header() + b"\x03www" + bytes([0xC0, target]) + b"\x00\x01\x00\x01", CLIENT, "udp"
        )


def test_trailing_garbage_is_ignored():
    q = parse_query(q_wire() + b"garbage", CLIENT, "tcp")
    assert q.key == b"\x03www\x07example\x03org\x00"


def test_additional_non_opt_record_uses_slow_path():
    msg = dns.message.make_query("example.org", "A", use_edns=0)
    extra = dns.rrset.from_text("x.example.org.", 60, "IN", "A", "192.0.2.1")
    msg.additional.append(extra)
    q = parse_query(msg.to_wire(), CLIENT, "udp")
    assert q.key == wire.name_to_key("example.org") and q.edns


def test_parents():
    key = wire.name_to_key("a.b.example.org")
    got = [wire.key_to_text(k) for k in wire.parents(key)]
    assert got == ["a.b.example.org", "b.example.org", "example.org", "org", "."]


def test_records_and_strip_opt():
    msg = dns.message.make_response(dns.message.make_query("example.org", "A", use_edns=0))
    msg.answer.append(dns.rrset.from_text("example.org.", 300, "IN", "A", "192.0.2.1", "192.0.2.2"))
    data = msg.to_wire()
    qend, recs = wire.records(data)
    assert qend == 12 + len(b"\x07example\x03org\x00") + 4
    assert [r.rtype for r in recs] == [1, 1, 41]
    stripped, recs2, rcode = wire.strip_opt(data)
    assert rcode == 0
    assert [r.rtype for r in recs2] == [1, 1]
    assert struct.unpack_from("!H", stripped, 10)[0] == 0
    assert dns.message.from_wire(stripped).edns == -1
    for r in recs2:
        assert struct.unpack_from("!I", stripped, r.ttl_off)[0] == 300


@pytest.mark.parametrize("cut", [13, 20, 40, 44])
def test_records_rejects_truncated_messages(cut):
    msg = dns.message.make_response(dns.message.make_query("example.org", "A"))
    msg.answer.append(dns.rrset.from_text("example.org.", 300, "IN", "A", "192.0.2.1"))
    with pytest.raises(ValueError):
        wire.records(msg.to_wire()[:cut])


def test_read_name_follows_pointers_and_rejects_loops():
    data = b"\x00" * 12 + b"\x07example\x03ORG\x00" + b"\x03www\xc0\x0c"
    assert wire.read_name(data, 25) == b"\x03www\x07example\x03org\x00"
    assert wire.read_name(data, 12) == b"\x07example\x03org\x00"
    two_hops = data + b"\x03CDN\xc0\x19"  # cdn -> www -> example.org
    assert wire.read_name(two_hops, 31) == b"\x03cdn\x03www\x07example\x03org\x00"
    for bad in (
        b"\x00" * 12 + b"\xc0\x0c",  # a pointer to itself
        b"\x00" * 12 + b"\x01a\xc0\x0e\x01b\xc0\x0c",  # forward, then back: a loop
        b"\x00" * 12 + b"\x05ab",  # runs off the end
        b"\x00" * 12 + b"\x40",  # reserved label type
        b"\x00" * 12 + b"\xc0",  # truncated pointer
        b"\x00" * 12 + b"\x3f" + b"a" * 63 + b"\xc0\x0c",  # a loop that grows the name
    ):
        with pytest.raises(ValueError):
            wire.read_name(bad, 12)
    long = b"\x00" * 12 + (b"\x3f" + b"a" * 63) * 4 + b"\x00"  # 257 octets
    with pytest.raises(ValueError, match="255"):
        wire.read_name(long, 12)


def test_key_to_text_is_the_inverse_of_name_to_key():
    assert wire.key_to_text(wire.name_to_key("WWW.Example.ORG")) == "www.example.org"
    assert wire.key_to_text(wire.name_to_key("www.example.org"), final_dot=True) == (
        "www.example.org."
    )
    assert wire.key_to_text(b"\x00") == wire.key_to_text(b"\x00", final_dot=True) == "."
    assert wire.key_to_text(b"\x03a b\x04test\x00", final_dot=True) == "a\\032b.test."
    for text in ("_sip._tcp.example.org", "a\\.b.example", "x\\255.test", "*.example"):
        assert wire.key_to_text(wire.name_to_key(text)) == text


def test_opt_record_and_edns_option_read_back():
    opt = wire.opt_record(1232, True, wire.edns_option(10, b"12345678"), ext_rcode=1)
    msg = dns.message.from_wire(wire.HEADER.pack(7, 0, 0, 0, 0, 1) + opt, ignore_trailing=False)
    assert msg.payload == 1232 and msg.ednsflags & wire.EDNS_DO
    assert msg.rcode() == 16  # BADVERS: the upper bits from the OPT
    assert [(o.otype, o.to_wire()) for o in msg.options] == [(10, b"12345678")]


def test_hostport_brackets_ipv6():
    assert wire.hostport("192.0.2.1", 53) == "192.0.2.1:53"
    assert wire.hostport("::1", 853, "tls") == "tls://[::1]:853"
    assert wire.hostport("dns.example", 443, "https") == "https://dns.example:443"


def test_record_types_are_dnspython_values():
    for name in ("A", "AAAA", "CNAME", "SOA", "NS", "PTR", "OPT", "RRSIG", "NSEC3", "ANY"):
        assert getattr(wire, name) == dns.rdatatype.from_text(name)
        assert type(getattr(wire, name)) is int  # plain ints on the hot path


def test_derive_asks_another_question_for_the_client():
    msg = dns.message.make_query("www.example.org", "A", use_edns=0, payload=4096, want_dnssec=True)
    msg.use_edns(0, dns.flags.DO, 4096, options=[dns.edns.GenericOption(65001, b"xy")])
    msg.flags |= dns.flags.CD
    q = parse_query(msg.to_wire(), CLIENT, "tcp")
    q.trace = []
    q.client_id, q.who, q.received = "kid", object(), 12.5
    sub = q.derive(wire.name_to_key("other.example"), wire.AAAA)
    assert (sub.client_id, sub.who, sub.received) == ("kid", q.who, 12.5)  # the same client
    assert (sub.id, sub.flags, sub.client, sub.transport) == (q.id, q.flags, CLIENT, "tcp")
    assert sub.key == wire.name_to_key("other.example") and sub.qtype == wire.AAAA
    assert (sub.udp_size, sub.do, sub.edns_options) == (4096, True, ((65001, b"xy"),))
    sub.note("seen", 1)
    sub.explain("line")
    assert q.notes == {"seen": 1} and q.trace == ["line"]
    same = q.derive()
    assert same.question == q.question


def test_derive_own_is_the_proxys_query():
    msg = dns.message.make_query("WWW.example.org", "A", use_edns=0, want_dnssec=True)
    msg.use_edns(0, dns.flags.DO, 1232, options=[dns.edns.GenericOption(65001, b"xy")])
    msg.flags = dns.flags.CD
    q = parse_query(msg.to_wire(), CLIENT, "udp")
    q.note("client", True)
    q.client_id, q.who = "kid", object()
    own = q.derive(own=True)
    assert (own.client_id, own.who) == ("kid", q.who)  # a refresh is scoped as the client
    assert own.id == 0 and own.flags == wire.RD | wire.CD and own.transport == "internal"
    assert own.qname == q.key and own.qtype == q.qtype and own.do and own.edns_options == ()
    assert own.notes is None and own.trace is None


def _with_authority(qtype: str, records: list[str]) -> bytes:
    msg = dns.message.make_query("example.org.", qtype)
    for text in records:
        msg.authority.append(dns.rrset.from_text("example.org.", 0, "IN", "SOA", text))
    return msg.to_wire()


SOA = "ns.example.org. admin.example.org. 1 3600 600 86400 300"


def test_ixfr_query_carries_its_soa():
    """RFC 1995 §3: an IXFR query has the client's SOA in the authority section."""
    q = parse_query(_with_authority("IXFR", [SOA]), CLIENT, "tcp")
    assert q.qtype == dns.rdatatype.IXFR and q.text == "example.org."


@pytest.mark.parametrize(
    ("qtype", "records"),
    [("A", [SOA]), ("AXFR", [SOA]), ("IXFR", [SOA, SOA.replace(" 1 ", " 2 ")])],
)
def test_other_authority_records_are_formerr(qtype, records):
    with pytest.raises(Reject) as exc:
        parse_query(_with_authority(qtype, records), CLIENT, "tcp")
    assert exc.value.rcode == wire.FORMERR
