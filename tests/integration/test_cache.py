"""The cache in the real proxy process, in front of a real nsd whose zone changes and stops."""

from __future__ import annotations

import signal
import time

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

ZONE = """\
$ORIGIN example.test.
$TTL {ttl}
@      IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 {ttl}
@      IN NS  ns
ns     IN A   127.0.0.1
www    IN A   {addr}
"""

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
[[chain]]
plugin = "cache"
%s
[[chain]]
plugin = "forward"
upstreams = ["%s"]
timeout = 0.5
"""


def zone(addr: str = "192.0.2.10", ttl: int = 300) -> dict[str, str]:
    return {"example.test": ZONE.format(addr=addr, ttl=ttl)}


def address(msg: dns.message.Message) -> str:
    return msg.answer[0][0].address


@pytest.fixture
def upstream(make_nsd):
    return make_nsd(zone(ttl=300))


def test_ttl_counts_down_and_case_is_echoed(upstream, make_proxy):
    proxy = make_proxy(CONFIG % ("", upstream.addr))
    first = proxy.ask()
    assert first.answer[0].ttl == 300
    time.sleep(2.1)
    q = dns.message.make_query("WWW.example.TEST", "A", use_edns=0)
    hit = dns.query.udp(q, "127.0.0.1", port=proxy.port, timeout=5)
    assert hit.answer[0].ttl in (297, 298)
    assert hit.question[0].name.to_text() == "WWW.example.TEST."
    assert hit.id == q.id


def test_negative_answers_are_cached_with_the_soa(upstream, make_proxy):
    proxy = make_proxy(CONFIG % ("max_negative_ttl = 100", upstream.addr))
    first = proxy.ask("nope.example.test")
    assert first.rcode() == dns.rcode.NXDOMAIN and first.authority[0].ttl == 100
    upstream.stop()  # the second answer can only come from the cache
    again = proxy.ask("nope.example.test")
    assert again.rcode() == dns.rcode.NXDOMAIN and again.authority[0].ttl <= 100
    assert not again.options


def test_zone_change_visible_after_expiry(make_nsd, make_proxy):
    server = make_nsd(zone(ttl=2))
    proxy = make_proxy(CONFIG % ("", server.addr))
    assert address(proxy.ask()) == "192.0.2.10"
    server.reload_zones(zone("192.0.2.99", ttl=2))
    assert address(proxy.ask()) == "192.0.2.10"  # still cached
    time.sleep(2.2)
    fresh = proxy.ask()
    assert address(fresh) == "192.0.2.99" and not fresh.options


def test_serve_stale_when_upstream_is_down(make_nsd, make_proxy):
    server = make_nsd(zone(ttl=1))
    proxy = make_proxy(CONFIG % ("prefetch = false", server.addr))
    assert address(proxy.ask()) == "192.0.2.10"
    server.stop()
    time.sleep(1.2)
    start = time.monotonic()
    stale = proxy.ask()
    assert time.monotonic() - start < 2.5  # within the 1.8 s client timer (plus slack)
    assert address(stale) == "192.0.2.10" and stale.answer[0].ttl == 30
    ede = [o for o in stale.options if o.otype == dns.edns.EDE]
    assert [o.code for o in ede] == [dns.edns.EDECode.STALE_ANSWER]


def test_sigusr1_flushes(upstream, make_proxy):
    proxy = make_proxy(CONFIG % ("", upstream.addr))
    assert address(proxy.ask()) == "192.0.2.10"
    upstream.reload_zones(zone("192.0.2.99"))
    assert address(proxy.ask()) == "192.0.2.10"
    proxy.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while "caches flushed" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert address(proxy.ask()) == "192.0.2.99"
