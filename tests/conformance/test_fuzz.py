"""Property-based fuzzing (hypothesis) of the query path, in-process and over sockets.

Properties: any bytes in → no exception, no hang, and either no reply or a well-formed
one with the query's ID and QR set that fits the transport. The upstream side too: any
bytes an upstream sends are either rejected with ValueError or fitted to the client
without an exception. ``DNSPROXY_FUZZ_EXAMPLES`` raises the example count (default 300).
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsproxy import wire
from dnsproxy.reply import Reply, finalize
from dnsproxy.server import Server
from dnsproxy.testing import Answer, chain_of, make_query
from dnsproxy.upstream import Request, matches
from tests.conformance.confkit import alive, frame, message, opt_rr, qname_wire

EXAMPLES = int(os.environ.get("DNSPROXY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SEEDS = [
    message(),
    message(opt=opt_rr(do=True, options=((10, b"\x01" * 8),))),
    message(qname_wire("a.b.c.example.test") + b"\x00\x10\x00\x01", opt=opt_rr(payload=512)),
    message(b"\x01a\xc0\x0c\x00\x01\x00\x01"),
    dns.message.make_query("x.example.test", "TXT", use_edns=0).to_wire(),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real query with random byte flips, insertions and a random cut: the inputs that
    get past a parser's first checks, where random bytes mostly do not."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif pos < len(data):
            del data[pos]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


INPUTS = st.one_of(mutated(), st.binary(max_size=600))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """An in-process Server whose chain answers from memory (no I/O, no Trio needed)."""
    path: Path = tmp_path_factory.mktemp("fuzz") / "config.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\n[[chain]]\nplugin = "forward"\n'
        'upstreams = ["127.0.0.1:9"]\n'
    )
    srv = Server(path, handle_signals=False)
    srv.chain = chain_of([Answer({"www.example.test": "192.0.2.1"})])
    return srv


def _check_reply(data: bytes, out: bytes | None, transport: str) -> None:
    if out is None:
        return
    assert len(data) >= 12, "a reply to something shorter than a header"
    assert out[:2] == data[:2], "reply ID differs from the query's"
    assert out[2] & 0x80, "QR not set"
    _, recs = wire.records(out)  # every count and length consistent
    if (out[2] >> 3) & 0xF == 0:  # dnspython reads other opcodes as UPDATE etc.
        dns.message.from_wire(out)
    if transport == "udp":
        q_edns = any(r.rtype == wire.OPT for r in recs)
        assert len(out) <= (1232 if q_edns else 512)


@FUZZ
@given(data=INPUTS, transport=st.sampled_from(["udp", "tcp"]))
def test_handle_never_raises(server, data, transport):
    """Server.handle on any bytes: ``send`` called exactly once, reply well-formed."""
    sent: list[bytes | None] = []
    server.handle(data, ("127.0.0.1", 5000), transport, sent.append)
    assert len(sent) == 1
    _check_reply(data, sent[0], transport)


@FUZZ
@given(data=INPUTS)
def test_parse_query_only_drops_or_rejects(data):
    """The wire view raises only its own Drop/Reject, and a Query it returns is sane."""
    try:
        q = wire.parse_query(data, ("127.0.0.1", 5000), "udp")
    except (wire.Drop, wire.Reject):
        return
    assert 1 <= len(q.qname) <= 255 and q.qname.endswith(b"\x00")
    assert q.key == q.qname.lower()
    assert 512 <= q.udp_size <= 65535
    list(wire.parents(q.key))  # walks the labels without running off the end


def _upstream_reply(question: bytes, body: bytes, flags: int, counts: tuple[int, ...]) -> bytes:
    return struct.pack("!HHHHHH", 7, flags, 1, *counts) + question + body


@FUZZ
@given(
    body=st.binary(max_size=300),
    flags=st.integers(0, 0xFFFF).map(lambda f: f | 0x8000),
    counts=st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)),
    transport=st.sampled_from(["udp", "tcp"]),
)
def test_upstream_bytes_rejected_or_fitted(body, flags, counts, transport):
    """Whatever an upstream sends that matches the question: strip_opt raises only
    ValueError, and what it accepts is fitted to the client without an exception."""
    q = make_query("wWw.Example.test", transport=transport)
    data = _upstream_reply(q.question, body, flags & ~0x7800, counts)
    req = Request(q.question, q.key, q.qtype, q.qclass)
    assert matches(data, 7, req)
    try:
        stripped, _, _ = wire.strip_opt(data)
    except ValueError:
        return
    out = finalize(Reply(stripped), q, 1232)
    _check_reply(q.data, out, transport)
    assert out[12 : 12 + len(q.qname)] == q.qname  # the client's case
    if transport == "udp":
        assert len(out) <= 1232


@settings(
    max_examples=max(50, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=INPUTS)
def test_real_proxy_survives_fuzz_over_sockets(fwd, data):
    """The same inputs at the real proxy over UDP and TCP: never a crash, a reply (if
    any) carries the query's ID."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        s.sendto(data, fwd.addr)
        try:
            out = s.recv(65535)
        except TimeoutError:
            out = None
    if out is not None:
        assert len(data) >= 12 and out[:2] == data[:2]
    with socket.create_connection(fwd.addr, timeout=2) as t:
        t.sendall(frame(data))
        t.shutdown(socket.SHUT_WR)
        t.settimeout(2)
        while t.recv(65535):
            pass
    assert fwd.proc.poll() is None


def test_alive_after_fuzz(fwd):
    """Run last in this module: the proxy that was fuzzed still answers normally."""
    assert alive(fwd.addr)
