"""Forgery resilience (CONFORMANCE.md A4, C3, C7): what the upstream side of the proxy
must never accept, and how unpredictable its queries are.

The fake upstream records every query, so the RFC 5452 §9.2 statistics are computed on
what actually left the proxy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import pytest

from dnsproxy import wire
from tests.conformance.confkit import (
    Proxy,
    alive,
    ask,
    blast,
    forward_config,
    frame,
    message,
    opt_rr,
    parse,
    qname_wire,
    tcp_raw,
    udp_raw,
    wait_until,
)
from tests.fakeupstream import FakeUpstream

RFC5452_QUERIES = int(os.environ.get("DNSPROXY_RFC5452_QUERIES", "10000"))
SPOOFS = int(os.environ.get("DNSPROXY_SPOOFS", "3000"))


def _chi2(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


def _local_port_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = f.read().split()
    return int(low), int(high)


def test_rfc5452_id_and_port_statistics(fwd, shared_upstream):
    """RFC 5452 §9.2 over 10,000 upstream queries: IDs uniform over 0-65535, ports spread
    over the ephemeral range, concurrent queries on different ports."""
    names = [f"r{i}.rand.example.test" for i in range(RFC5452_QUERIES)]
    replies = blast(fwd.addr, names, window=200, timeout=80)
    assert len(replies) >= 0.99 * len(names)
    seen = [s for s in shared_upstream.seen if s.transport == "udp"]
    assert len(seen) >= 0.99 * len(names)
    ids = [s.id for s in seen]
    n = len(ids)

    # Uniform: 64 buckets of 1024 IDs; chi-square with 63 dof, p < 1e-6 is about 140.
    buckets = collections.Counter(i >> 10 for i in ids)
    assert _chi2([buckets.get(b, 0) for b in range(64)]) < 140
    # Every bit fair: sd of the fraction is 0.5/sqrt(n); allow 6 sd.
    for bit in range(16):
        frac = sum((i >> bit) & 1 for i in ids) / n
        assert abs(frac - 0.5) < 3 / n**0.5, f"ID bit {bit} set in {frac:.3f}"
    # Not sequential or a fixed step: successive differences are uniform too.
    diffs = collections.Counter(((b - a) % 65536) >> 10 for a, b in itertools.pairwise(ids))
    assert _chi2([diffs.get(b, 0) for b in range(64)]) < 140
    # Birthday bound: 10,000 draws from 65,536 repeat about 730 times; a small pool won't.
    assert len(set(ids)) > n - 2 * n * (n - 1) / 2 / 65536

    ports = [s.port for s in seen]
    low, high = _local_port_range()
    assert all(p >= 1024 for p in ports)
    assert len(set(ports)) > 0.5 * n  # a new port per query, not a small pool
    assert max(ports) - min(ports) > 0.8 * (high - low)
    port_buckets = collections.Counter((p - low) * 32 // (high - low + 1) for p in ports)
    assert _chi2([port_buckets.get(b, 0) for b in range(32)]) < 100

    # Different ports for concurrent queries (§9.2): queries overlapping in time.
    by_time = sorted(seen, key=lambda s: s.at)
    for a, b in itertools.pairwise(by_time):
        if b.at - a.at < 0.005:
            assert a.port != b.port


def test_blind_spoofing_flood_accepts_nothing(fwd, shared_upstream):
    """C3: thousands of wrong-ID replies from the upstream's own address and port while
    the query is pending: none accepted, the real answer is."""
    shared_upstream.set_rules(
        [{"spoof": SPOOFS, "spoof_answer": "{qname} 300 IN A 6.6.6.6", "delay": 0.05}]
    )
    results: list[dns.message.Message] = []

    def one(i: int) -> None:
        results.append(ask(fwd.addr, f"spoof{i}.example.test"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 4
    # A flood can cost the real answer (the socket buffer overflows: SERVFAIL, a denial of
    # service), but a forged answer must never be accepted.
    good = 0
    for msg in results:
        if msg.rcode() == 2 and not msg.answer:
            continue
        assert [rd.address for rd in msg.answer[0]] == ["192.0.2.1"]
        good += 1
    assert good >= 1  # the wait went on past thousands of wrong IDs


def test_same_question_from_many_clients_one_upstream_query(fwd, shared_upstream):
    """C3 birthday defence (DNSpooq CVE-2020-25686): 50 clients asking the same question
    at once cause exactly one upstream query."""
    shared_upstream.set_rules([{"delay": 0.4}])
    data = dns.message.make_query("birthday.example.test", "A").to_wire()
    socks = []
    for i in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.{1 + i % 5}.{1 + i}", 0))
        s.settimeout(3)
        s.sendto(data, fwd.addr)
        socks.append(s)
    try:
        answers = [dns.message.from_wire(s.recv(65535)) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(a.rcode() == 0 and a.answer for a in answers)
    assert len([s for s in shared_upstream.seen if s.qname == "birthday.example.test."]) == 1


def test_upstream_is_own_listener_rejected(tmp_path):
    """C7: forwarding to our own listen address is a config error, not a runtime loop."""
    proxy = Proxy(tmp_path, forward_config("127.0.0.1:{port}"))
    with pytest.raises(RuntimeError, match="own listener"):
        proxy.start()
    proxy.stop()


@pytest.fixture
def loop_pair(tmp_path, upstream):
    """Two proxies: A sends loop.test to B, B sends everything back to A."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a = Proxy(a_dir, "")
    b = Proxy(b_dir, "")
    a.config_path.write_text(
        forward_config(
            upstream.addr,
            before=(
                '[[chain]]\nplugin = "forward"\nzones = ["loop.test"]\n'
                f'upstreams = ["127.0.0.1:{b.port}"]\ntimeout = 1.0\nbudget = 2.0\n'
            ),
        ).replace("{port}", str(a.port))
    )
    b.config_path.write_text(forward_config(f"127.0.0.1:{a.port}").replace("{port}", str(b.port)))
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def test_forwarding_loop_ends_in_servfail_and_both_survive(loop_pair):
    """C7: A→B→A: the query ends (SERVFAIL within the budget, coalescing must not hang
    it), no socket exhaustion, and both instances keep serving."""
    a, b = loop_pair
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        msgs = list(pool.map(lambda i: ask(a.addr, f"x{i % 5}.loop.test"), range(20)))
    assert all(m.rcode() == 2 for m in msgs)  # SERVFAIL
    assert time.monotonic() - start < 2.6
    assert alive(a.addr)
    assert wait_until(lambda: ask(b.addr, "y.example.test").rcode() == 0)
    assert len(os.listdir(f"/proc/{a.proc.pid}/fd")) < 100
    assert len(os.listdir(f"/proc/{b.proc.pid}/fd")) < 100


def test_forwarding_loop_detected(loop_pair):
    """C7: a loop is detected (probe or hop marker), logged, and answered SERVFAIL fast."""
    a, b = loop_pair
    start = time.monotonic()
    msg = ask(a.addr, "probe.loop.test")
    took = time.monotonic() - start
    assert msg.rcode() == 2
    assert took < 0.5
    assert "loop" in (a.log() + b.log()).lower()


def test_response_from_unexpected_source_port_ignored(fwd, shared_upstream):
    """C2: a reply from the upstream's address but another port is never accepted."""
    shared_upstream.set_rules([{"from_other_port": True}])
    msg = ask(fwd.addr, "wrongport.example.test")
    assert msg.rcode() == 2 and not msg.answer


# --- what a hostile or sloppy upstream's answer may not carry to clients ----------------


@pytest.fixture(scope="module")
def cached_proxy(shared_upstream, tmp_path_factory):
    """cache → forward to the shared fake upstream: what reaches clients and the cache."""
    proxy = Proxy(
        tmp_path_factory.mktemp("cached-proxy"),
        forward_config(shared_upstream.addr, before='[[chain]]\nplugin = "cache"\n'),
    ).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def cached(cached_proxy, shared_upstream):
    shared_upstream.set_rules([])
    return cached_proxy


def _raw_answer(name: str, records: list[tuple[int, int, int, bytes]]) -> str:
    """Hex of an answer to ``name`` A with these (type, class, TTL, rdata) records, all
    owned by the question name (for the fake upstream's ``raw`` rule, ID patched in)."""
    question = qname_wire(name) + struct.pack("!HH", 1, 1)
    body = b"".join(
        b"\xc0\x0c" + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata
        for rtype, rclass, ttl, rdata in records
    )
    header = struct.pack("!HHHHHH", 0, 0x8180, 1, len(records), 0, 0)
    return (header + question + body).hex()


def test_records_of_another_class_dropped(cached, shared_upstream):
    """C2: an IN A question answered with CH A and ANY A records besides the IN one: only
    the IN record reaches the client, on the first answer and from the cache."""
    name = "classes.example.test"
    records = [
        (1, 3, 300, bytes([6, 6, 6, 6])),  # CH A (4 bytes: not even a Chaos address)
        (1, 1, 300, bytes([192, 0, 2, 10])),
        (1, 255, 300, bytes([6, 6, 6, 7])),  # class ANY
    ]
    shared_upstream.set_rules(
        [{"match": {"qname": name}, "raw": _raw_answer(name, records), "raw_id": True}]
    )
    for _ in range(2):
        msg = ask(cached.addr, name)
        assert msg.rcode() == 0
        assert [(r.rdclass, r.rdtype) for r in msg.answer] == [(1, 1)]
        assert [rd.address for rd in msg.answer[0]] == ["192.0.2.10"]
    assert len([s for s in shared_upstream.seen if s.qname == name + "."]) == 1  # cached


def _raw_ttls(addr: tuple[str, int], name: str) -> list[int]:
    """The answer TTLs exactly as on the wire (dnspython reads a top-bit TTL as 0)."""
    data = udp_raw(addr, message(qname_wire(name) + struct.pack("!HH", 1, 1)))
    assert data is not None
    return [
        struct.unpack_from("!I", data, r.ttl_off)[0]
        for r in wire.records(data)[1]
        if r.section == 1
    ]


@pytest.mark.parametrize("ttl", [0xFFFFFFFF, 0x80000000])
def test_ttl_with_top_bit_is_zero(cached, shared_upstream, ttl):
    """C2, RFC 2181 §8: a TTL with the top bit set reaches the client as 0 (and, being 0,
    is not cached), over the one-pass path and the general one."""
    shared_upstream.set_rules(
        [
            {
                "match": {"qname": "msb.example.test"},
                "answer": [f"{{qname}} {ttl} IN A 192.0.2.73"],
            },
            {
                "match": {"qname": "msb-chain.example.test"},
                "answer": [
                    f"{{qname}} {ttl} IN CNAME msb.example.test.",
                    "msb.example.test. 300 IN A 192.0.2.73",
                ],
            },
        ]
    )
    for _ in range(2):
        assert _raw_ttls(cached.addr, "msb.example.test") == [0]
    assert _raw_ttls(cached.addr, "msb-chain.example.test") == [0, 300]
    assert len([s for s in shared_upstream.seen if s.qname == "msb.example.test."]) == 2


def test_relayed_answer_not_authoritative_and_offers_recursion(fwd, shared_upstream):
    """A proxy is not the authority: AA from an authoritative upstream is cleared; and it
    offers recursion, so RA is set though that upstream's RA was 0 (dig's "recursion
    requested but not available")."""
    shared_upstream.set_rules([{"flags": ["AA"], "noflags": ["RA"]}])
    for tcp in (False, True):
        msg = ask(fwd.addr, "auth.example.test", tcp=tcp)
        assert msg.rcode() == 0 and msg.answer
        assert not msg.flags & dns.flags.AA
        assert msg.flags & dns.flags.RA and msg.flags & dns.flags.RD
    chained = [
        {"answer": ["{qname} 300 IN CNAME x.example.test.", "x.example.test. 9 IN A 1.2.3.4"]}
    ]
    shared_upstream.set_rules([{**chained[0], "flags": ["AA"], "noflags": ["RA"]}])
    msg = ask(fwd.addr, "auth2.example.test")
    assert len(msg.answer) == 2 and not msg.flags & dns.flags.AA and msg.flags & dns.flags.RA


@pytest.mark.parametrize(
    ("length", "rcode"),
    [(0, 1), (5, 1), (7, 1), (9, 1), (15, 1), (41, 1), (8, 0), (16, 0), (40, 0)],
)
def test_malformed_cookie_is_formerr(fwd, length, rcode):
    """RFC 7873 §5.2.2: a COOKIE option that is neither a client cookie (8 octets) nor a
    client plus server cookie (16-40) is FORMERR, with the question and an OPT."""
    q = message(opt=opt_rr(options=((10, b"\x01" * length),)))
    for reply in (udp_raw(fwd.addr, q), tcp_raw(fwd.addr, frame(q))):
        msg = parse(reply)
        assert msg.rcode() == rcode
        assert msg.question and msg.edns == 0


def test_client_supplied_loop_marker_is_not_a_loop(cached):
    """C7: a client's loop option (full, bogus or empty) is not trusted: no SERVFAIL, no
    warning, nothing cached for the clients after it; only our own token is a loop."""
    for data in (b"\x01" * 64, b"\x01" * 5, b"", b"\x02" * 800):
        q = message(
            qname_wire("marked.example.test") + struct.pack("!HH", 1, 1),
            opt=opt_rr(options=((65053, data),)),
        )
        assert parse(udp_raw(cached.addr, q)).rcode() == 0
        assert ask(cached.addr, "marked.example.test").rcode() == 0  # another client
    assert "loop" not in cached.log().lower()


@pytest.fixture
def scoped(tmp_path, upstream):
    """A proxy routing example.test to ``upstream`` (honest), evil.test to a second fake
    (the hostile one, returned), everything else to ``upstream``. The example.test step
    comes first, so only a walk from the chain's start can reach it."""
    evil = FakeUpstream().start_thread()
    steps = (
        '[[chain]]\nplugin = "cache"\n'
        f'[[chain]]\nplugin = "forward"\nzones = ["example.test"]\nupstreams = ["{upstream.addr}"]\n'
        f'[[chain]]\nplugin = "forward"\nzones = ["evil.test"]\nupstreams = ["{evil.addr}"]\n'
    )
    proxy = Proxy(tmp_path, forward_config(upstream.addr, before=steps)).start()
    yield proxy, evil
    proxy.stop()
    evil.stop()


def test_scoped_upstream_cannot_answer_outside_its_zones(scoped, upstream):
    """C2 bailiwick: the evil.test upstream's CNAME chain is cut where it leaves evil.test;
    the target is resolved by the step that owns it, so the forged 6.6.6.6 never reaches
    the client (nor the cache: asked again, the target comes from the honest upstream)."""
    proxy, evil = scoped
    evil.set_rules(
        [
            {
                "match": {"qname": "cname2.evil.test"},
                "answer": [
                    "cname2.evil.test. 300 IN CNAME cname1.evil.test.",
                    "cname1.evil.test. 300 IN CNAME www.example.test.",
                    "www.example.test. 300 IN A 6.6.6.6",
                ],
            },
            {
                "match": {"qname": "gone.evil.test"},
                "answer": ["gone.evil.test. 300 IN CNAME nx.example.test."],
            },
            {
                "match": {"qname": "in.evil.test"},
                "answer": [
                    "in.evil.test. 300 IN CNAME a.evil.test.",
                    "a.evil.test. 300 IN A 6.6.6.8",
                ],
            },
        ]
    )
    upstream.set_rules(
        [
            {
                "match": {"qname": "nx.example.test"},
                "rcode": "NXDOMAIN",
                "authority": [
                    "example.test. 300 IN SOA ns.example.test. h.example.test. 1 2 3 4 60"
                ],
            }
        ]
    )
    for _ in range(2):
        msg = ask(proxy.addr, "cname2.evil.test")
        assert msg.rcode() == 0
        got = sorted((r.name.to_text(), r.rdtype, r[0].to_text()) for r in msg.answer)
        assert got == [
            ("cname1.evil.test.", 5, "www.example.test."),
            ("cname2.evil.test.", 5, "cname1.evil.test."),
            ("www.example.test.", 1, "192.0.2.1"),
        ]
    assert ask(proxy.addr, "www.example.test").answer[0][0].address == "192.0.2.1"
    msg = ask(proxy.addr, "gone.evil.test")  # the target's rcode and proof are the answer's
    assert msg.rcode() == 3 and len(msg.answer) == 1 and msg.authority[0].rdtype == 6
    msg = ask(proxy.addr, "in.evil.test")  # a chain inside the zone is the upstream's to give
    assert [rd.to_text() for r in msg.answer for rd in r] == ["a.evil.test.", "6.6.6.8"]
    assert [s.qname for s in upstream.seen] == ["www.example.test.", "nx.example.test."]


def test_cname_ping_pong_between_scoped_upstreams_ends(scoped, upstream):
    """A8: scoped upstreams whose CNAMEs point into each other's zones end in SERVFAIL
    within the budget, and the proxy keeps serving."""
    proxy, evil = scoped
    evil.set_rules([{"answer": ["{qname} 300 IN CNAME b.example.test."]}])
    upstream.set_rules(
        [{"match": {"qname": "*.example.test"}, "answer": ["{qname} 300 IN CNAME a.evil.test."]}]
    )
    start = time.monotonic()
    assert ask(proxy.addr, "a.evil.test").rcode() == 2
    assert time.monotonic() - start < 2.5
    upstream.set_rules([])
    assert ask(proxy.addr, "fine.other.test").rcode() == 0
