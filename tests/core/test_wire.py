"""The wire view: fast path, fallback, and the error policy of DESIGN.md / issue 2."""

from __future__ import annotations

import struct

import dns.edns
import dns.message
import dns.name
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
