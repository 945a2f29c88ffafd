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
import threading
import time

import dns.message
import pytest

from tests.conformance.confkit import (
    Proxy,
    alive,
    ask,
    blast,
    forward_config,
    wait_until,
)

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
