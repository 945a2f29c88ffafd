"""Malformed client queries over UDP and TCP (CONFORMANCE.md C1) against the real proxy.

Each case sends hand-built bytes and checks the documented policy: silent drop for what
cannot be answered (short, QR=1), FORMERR/NOTIMP/BADVERS for what can, and in every case
that the proxy is still serving afterwards.
"""

from __future__ import annotations

import struct
import time

import dns.edns
import dns.flags
import dns.rcode
import dns.rdatatype
import pytest

from tests.conformance.confkit import (
    alive,
    ask,
    frame,
    message,
    opt_rr,
    parse,
    qname_wire,
    tcp_raw,
    udp_raw,
    wait_until,
)

Q = qname_wire("www.example.test") + struct.pack("!HH", 1, 1)
A_IN = struct.pack("!HH", 1, 1)
RR_A = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + b"\xc0\x00\x02\x01"

# (id, bytes, expected rcode or None for "no reply")
DROPPED = [
    ("empty", b""),
    ("one-byte", b"\x12"),
    ("short-header", message()[:11]),
    ("qr-set", message(flags=0x8100)),
    ("reflected-response", message(flags=0x8180, an=1, body=RR_A)),
]

FORMERR = [
    ("qdcount-0", message(b"", qd=0)),
    ("qdcount-0-cookie-only", message(b"", qd=0, opt=opt_rr(options=((10, b"\x01" * 8),)))),
    ("qdcount-2", message(Q + qname_wire("mail.example.test") + A_IN, qd=2)),
    ("dup-question", message(Q + Q, qd=2)),
    ("qdcount-65535", message(Q, qd=65535)),
    ("ancount-overrun", message(an=1)),
    ("nscount-overrun", message(ns=3)),
    ("arcount-overrun", message(ar=2)),
    ("arcount-overrun-one", message(ar=1)),
    ("short-question-no-class", message(qname_wire("www.example.test") + b"\x00\x01")),
    ("short-question-no-type", message(qname_wire("www.example.test"))),
    ("name-runs-off", message(b"\x03www\x07exam")),
    ("opt-rdlength-past-end", message(opt=opt_rr()[:-2] + b"\x00\x10")),
    ("short-opt", message(opt=opt_rr()[:7])),
    ("pointer-to-self", message(b"\xc0\x0c" + A_IN)),
    ("pointer-loop-a-b-a", message(b"\x01a\xc0\x10\x01b\xc0\x0c" + A_IN)),
    ("forward-pointer", message(b"\xc0\x10" + A_IN + b"\x01a\x00")),
    ("pointer-past-end", message(b"\xc3\xff" + A_IN)),
    ("pointer-into-header", message(b"\x01a\xc0\x02" + A_IN)),
    ("label-type-01", message(b"\x41" + b"a" * 1 + b"\x00" + A_IN)),
    ("label-type-10", message(b"\x81a\x00" + A_IN)),
    ("label-64", message(b"\x40" + b"a" * 64 + b"\x00" + A_IN)),
    ("name-256", message(b"\x3f" + b"a" * 63 + (b"\x3f" + b"b" * 63) * 3 + b"\x01c\x00" + A_IN)),
    ("128-one-byte-labels", message(b"\x01a" * 128 + b"\x00" + A_IN)),
    (
        "name-over-255-after-decompression",
        # A legal 193-octet question, then a record whose owner adds a 63-octet label in
        # front of a pointer to it: 257 octets once decompressed.
        message(
            b"\x3f" + b"q" * 63 + b"\x3f" + b"r" * 63 + b"\x3f" + b"s" * 63 + b"\x00" + A_IN,
            ar=1,
            body=b"\x3f" + b"x" * 63 + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 0),
        ),
    ),
    ("two-opt", message(ar=2, opt=opt_rr() + opt_rr())),
    ("opt-owner-not-root", message(opt=opt_rr(owner=b"\x01x\x00"))),
    ("opt-in-answer", message(an=1, body=opt_rr())),
    ("hundreds-of-options", message(opt=opt_rr(options=((65001, b""),) * 300))),
    ("rr-in-authority", message(ns=1, body=RR_A)),
]


@pytest.mark.parametrize(("data"), [d for _, d in DROPPED], ids=[i for i, _ in DROPPED])
def test_dropped_silently(fwd, data):
    """Too short to answer, or a response (never answer one: loops and reflection)."""
    assert udp_raw(fwd.addr, data, timeout=0.5) is None
    assert ask(fwd.addr, "next.example.test").rcode() == 0  # fwd_zero: still serving


@pytest.mark.parametrize(("data"), [d for _, d in FORMERR], ids=[i for i, _ in FORMERR])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_formerr(fwd, shared_upstream, data, transport):
    """Unreadable or ambiguous queries get FORMERR with their ID; nothing goes upstream."""
    out = udp_raw(fwd.addr, data) if transport == "udp" else tcp_raw(fwd.addr, frame(data))
    assert out is not None
    msg_id, flags = struct.unpack_from("!HH", out)
    assert msg_id == 0x1234
    assert flags & 0x8000 and flags & 0xF == dns.rcode.FORMERR
    assert not shared_upstream.seen


def test_bounded_cpu_on_hostile_counts(fwd):
    """A 65 kB TCP message of pointers and a 65535 QDCOUNT are rejected quickly."""
    pointers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 0)
    body = pointers * ((65535 - 12 - len(Q)) // len(pointers))
    start = time.monotonic()
    for data in (
        message(ar=len(body) // len(pointers), body=body),
        message(Q + b"\xc0\x0c" * 30000, qd=65535),
        message(an=65535, ns=65535, ar=65535, body=body),
    ):
        out = parse(tcp_raw(fwd.addr, frame(data[:65535])))
        assert out.rcode() == dns.rcode.FORMERR
    assert time.monotonic() - start < 2.0
    assert alive(fwd.addr)


def test_longest_legal_name_is_answered(fwd, shared_upstream):
    """127 one-byte labels make a 255-octet name: legal, forwarded, echoed."""
    name = "a." * 127
    out = ask(fwd.addr, name)
    assert out.rcode() == 0
    assert shared_upstream.seen[-1].qname == name


@pytest.mark.parametrize(
    ("opcode", "edns"), [(15, False), (15, True), (4, False), (5, False), (5, True)]
)
def test_opcodes_not_implemented(fwd, shared_upstream, opcode, edns):
    """Opcode 15, NOTIFY and UPDATE get NOTIMP (never forwarded); OPT echoed if sent."""
    data = message(flags=(opcode << 11) | 0x0100, opt=opt_rr() if edns else b"")
    out = udp_raw(fwd.addr, data)
    assert out is not None
    _, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", out)
    assert flags & 0xF == dns.rcode.NOTIMP
    assert (flags >> 11) & 0xF == opcode
    assert qd == 1 and out[12 : 12 + len(Q)] == Q  # the question echoed
    assert (an, ns) == (0, 0)
    assert ar == int(edns)  # RFC 6891 §6.1.1: OPT in, OPT out
    assert not shared_upstream.seen


def test_update_with_sections_is_notimp(fwd, shared_upstream):
    """An UPDATE carries prerequisite/update sections: still NOTIMP, not FORMERR."""
    out = udp_raw(fwd.addr, message(flags=5 << 11, ns=1, body=RR_A))
    assert out is not None and out[3] & 0xF == dns.rcode.NOTIMP
    assert not shared_upstream.seen


@pytest.mark.parametrize("rdtype", [0, 666, 1000, 65400])
def test_unknown_types_forwarded_transparently(fwd, shared_upstream, rdtype):
    """RFC 3597 / RFC 5625: unknown types are forwarded and answered, not refused."""
    shared_upstream.set_rules([{"answer": [f"{{qname}} 60 IN TYPE{rdtype} \\# 2 abcd"]}])
    out = ask(fwd.addr, "odd.example.test", dns.rdatatype.to_text(rdtype))
    assert out.rcode() == 0
    assert shared_upstream.seen[-1].qtype == rdtype
    assert out.answer and out.answer[0][0].to_wire() == b"\xab\xcd"


@pytest.mark.parametrize("rdclass", ["CH", "ANY", "CLASS999"])
def test_other_classes_forwarded(fwd, shared_upstream, rdclass):
    """Classes other than IN are passed through; the upstream decides."""
    shared_upstream.set_rules([{"rcode": "REFUSED"}])
    q = message(qname_wire("version.bind") + struct.pack("!HH", 16, _cls(rdclass)))
    out = parse(udp_raw(fwd.addr, q))
    assert out.rcode() == dns.rcode.REFUSED
    assert out.question[0].rdclass == _cls(rdclass)


def _cls(text: str) -> int:
    import dns.rdataclass

    return int(dns.rdataclass.from_text(text))


def test_trailing_garbage_after_question_is_ignored(fwd):
    """Bytes after the counted sections are ignored (kresd test_prefix, dnspython
    ignore_trailing): the question is answered."""
    out = parse(udp_raw(fwd.addr, message() + b"\xde\xad\xbe\xef"))
    assert out.rcode() == 0 and out.id == 0x1234


@pytest.mark.parametrize(
    ("code", "data"),
    [(10, b"\x01" * 8), (12, b"\x00" * 40), (8, b"\x00\x01\x18\x00\xc0\x00\x02"), (11, b"")],
    ids=["cookie", "padding", "ecs", "keepalive"],
)
def test_hop_by_hop_options_not_forwarded(fwd, shared_upstream, code, data):
    """Client COOKIE, PADDING, ECS and KEEPALIVE never reach the upstream verbatim."""
    q = message(opt=opt_rr(options=((code, data),)))
    assert parse(udp_raw(fwd.addr, q)).rcode() == 0
    seen = shared_upstream.seen[-1]
    assert seen.edns == 0  # the proxy builds its own OPT
    assert all(c != code for c, _ in seen.options)


def test_case_echoed_byte_for_byte(fwd, shared_upstream):
    """RFC 4343 / 0x20: the reply's question is the client's bytes, case included."""
    name = "wWw.ExAmPlE.tEsT"
    out = parse(udp_raw(fwd.addr, message(qname_wire(name) + A_IN)))
    assert out.question[0].name.to_text() == name + "."
    assert out.answer[0].name.to_text() == name + "."


def test_drop_then_serve_under_garbage_burst(fwd):
    """A burst of random garbage datagrams leaves the listener serving."""
    import os
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(500):
            s.sendto(os.urandom(i % 80), fwd.addr)
    assert wait_until(lambda: alive(fwd.addr))
