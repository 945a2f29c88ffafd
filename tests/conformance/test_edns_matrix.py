"""The EDNS compliance matrix of ISC's genreport (RFC 8906 §8), run against the proxy.

genreport itself is not packaged (CONFORMANCE.md B2), so each of its probes is rebuilt
here as raw bytes with the expected result written next to it. The proxy forwards to a
fake upstream that answers every name, so the checks are about the proxy's own EDNS
handling: what it answers, which OPT it returns, and what it refuses to echo.
"""

from __future__ import annotations

import struct

import attrs
import dns.flags
import dns.message
import dns.rcode
import pytest

from tests.conformance.confkit import frame, message, opt_rr, qname_wire, tcp_raw, udp_raw

SOA = qname_wire("example.test") + struct.pack("!HH", 6, 1)
TYPE1000 = qname_wire("example.test") + struct.pack("!HH", 1000, 1)


@attrs.frozen
class Probe:
    """One genreport test: what is sent and what must come back."""

    name: str
    data: bytes
    rcode: int = dns.rcode.NOERROR
    edns: bool = True  # an OPT in the reply
    version: int = 0
    tcp: bool = False
    do: bool = False
    no_option: int | None = None  # an option code that must not be echoed
    no_flags: int = 0  # EDNS flag bits that must not be echoed
    header_z: bool = False  # the header Z bit must be clear
    max_size: int = 65535


PROBES = [
    Probe("dns", message(SOA), edns=False),
    Probe("edns", message(SOA, opt=opt_rr())),
    Probe("edns1", message(SOA, opt=opt_rr(version=1)), rcode=dns.rcode.BADVERS),
    Probe("edns@512", message(SOA, opt=opt_rr(payload=512, do=True)), do=True, max_size=512),
    Probe("ednsopt", message(SOA, opt=opt_rr(options=((100, b""),))), no_option=100),
    Probe(
        "edns1opt",
        message(SOA, opt=opt_rr(version=1, options=((100, b""),))),
        rcode=dns.rcode.BADVERS,
        no_option=100,
    ),
    Probe("do", message(SOA, opt=opt_rr(do=True)), do=True),
    Probe("ednsflags", message(SOA, opt=opt_rr(flags=0x80)), no_flags=0x7FFF),
    Probe(
        "optlist",
        message(
            SOA,
            opt=opt_rr(
                options=(
                    (3, b""),  # NSID
                    (8, b"\x00\x01\x00\x00"),  # ECS 0.0.0.0/0
                    (9, b""),  # EXPIRE
                    (10, b"\x01\x02\x03\x04\x05\x06\x07\x08"),  # COOKIE
                )
            ),
        ),
        no_option=8,
    ),
    Probe("ednstcp", message(SOA, opt=opt_rr()), tcp=True),
    Probe("type1000", message(TYPE1000, opt=opt_rr())),
    Probe("opcode", message(SOA, flags=(15 << 11) | 0x0100, opt=opt_rr()), rcode=4),
    Probe("tcp", message(SOA), tcp=True, edns=False),
    Probe("zflag", message(SOA, flags=0x0140, opt=opt_rr()), header_z=True),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_genreport_probe(fwd, probe):
    out = tcp_raw(fwd.addr, frame(probe.data)) if probe.tcp else udp_raw(fwd.addr, probe.data)
    assert out is not None, f"{probe.name}: no reply"
    assert len(out) <= probe.max_size
    msg_id, flags, qd = struct.unpack_from("!HHH", out)
    assert msg_id == 0x1234 and flags & 0x8000
    assert qd == 1  # the question is echoed, also in errors
    if probe.header_z:
        assert not flags & 0x0040
    if probe.rcode == 4:  # an opcode dnspython will not parse as a query
        assert flags & 0xF == 4 and struct.unpack_from("!H", out, 10)[0] == 1
        return
    msg = dns.message.from_wire(out)
    assert msg.rcode() == probe.rcode
    assert (msg.edns >= 0) == probe.edns
    if not probe.edns:
        return
    assert msg.edns == probe.version  # BADVERS names the highest version we speak: 0
    assert bool(msg.ednsflags & dns.flags.DO) == probe.do
    assert not msg.ednsflags & probe.no_flags & ~dns.flags.DO
    if probe.no_option is not None:
        assert all(o.otype != probe.no_option for o in msg.options)
    if probe.rcode == dns.rcode.BADVERS:
        assert not msg.answer


def test_small_payload_treated_as_512(fwd, shared_upstream):
    """RFC 6891 §6.2.3: a requestor payload under 512 means 512, not less."""
    big = [f'{{qname}} 60 IN TXT "{i:02d}{"y" * 100}"' for i in range(3)]  # ~350 bytes
    shared_upstream.set_rules([{"answer": big}])
    out = udp_raw(
        fwd.addr,
        message(qname_wire("t.example.test") + b"\x00\x10\x00\x01", opt=opt_rr(payload=100)),
    )
    msg = dns.message.from_wire(out)
    assert not msg.flags & dns.flags.TC and len(msg.answer[0]) == 3


def test_no_edns_response_limited_to_512(fwd, shared_upstream):
    """RFC 1035 §4.2.1: without EDNS an answer over 512 octets is truncated with TC."""
    big = [f'{{qname}} 60 IN TXT "{i:02d}{"z" * 100}"' for i in range(8)]  # ~900 bytes
    shared_upstream.set_rules([{"answer": big}])
    out = udp_raw(fwd.addr, message(qname_wire("t.example.test") + b"\x00\x10\x00\x01"))
    assert out is not None and len(out) <= 512
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.TC and msg.edns < 0
    full = dns.message.from_wire(
        tcp_raw(fwd.addr, frame(message(qname_wire("t.example.test") + b"\x00\x10\x00\x01")))
    )
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 8


def test_edns_response_limited_to_min_of_sizes(fwd, shared_upstream):
    """min(client's advertised size, edns_udp_size 1232): TC over it, no fragmentation."""
    big = [f'{{qname}} 60 IN TXT "{i:02d}{"w" * 200}"' for i in range(8)]  # ~1.7 kB
    shared_upstream.set_rules([{"answer": big}])
    q = message(qname_wire("t.example.test") + b"\x00\x10\x00\x01", opt=opt_rr(payload=4096))
    out = udp_raw(fwd.addr, q)
    assert out is not None and len(out) <= 1232
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.TC and msg.edns == 0 and msg.payload == 1232
