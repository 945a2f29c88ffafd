"""Development split-DNS end to end: two nsd upstreams ("corp" and "internet") and the proxy.

The proxy runs with loadbalance, cache, rewrite, localnames and three forward steps (one
scoped by zones, one by client, one general); queries go over real sockets with dnspython
and dig.
"""

from __future__ import annotations

import subprocess

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import ZONE, need

CORP_ZONE = """\
$ORIGIN corp.example.
$TTL 300
@      IN SOA ns.corp.example. admin.corp.example. 1 3600 600 86400 60
@      IN NS  ns
ns     IN A   127.0.0.1
www    IN CNAME app
app    IN A   10.0.0.5
db     IN A   10.0.0.6
"""

CORP_REVERSE = """\
$ORIGIN 10.in-addr.arpa.
$TTL 300
@        IN SOA ns.corp.example. admin.corp.example. 1 3600 600 86400 60
@        IN NS  ns.corp.example.
5.0.0    IN PTR app.corp.example.
"""

# The corp network's own view of example.test (what a VPN's resolver might serve).
CORP_VIEW = ZONE.replace("192.0.2.10", "10.0.0.10")

INTERNET_ZONE = ZONE + "".join(f"pool   IN A   192.0.2.{100 + i}\n" for i in range(1, 5))

CONFIG = """\
[server]
listen = ["127.0.0.1:{port}"]

[[chain]]
plugin = "loadbalance"

[[chain]]
plugin = "cache"

[[chain]]
plugin = "rewrite"
rules = [
  { match = "zone", from = "staging.corp.example", to = "corp.example" },
  { match = "zone", from = "example.test", ttl = [60, 120] },
]

[[chain]]
plugin = "localnames"
nxdomain_zones = ["invalid", "local", "onion"]  # the "internet" here is example.test

[[chain]]
plugin = "forward"
zones = ["corp.example", "10.in-addr.arpa"]
upstreams = ["CORP"]

[[chain]]
plugin = "forward"
clients = ["127.0.0.2/32"]
upstreams = ["CORP"]

[[chain]]
plugin = "forward"
upstreams = ["INTERNET"]
"""


@pytest.fixture
def split(make_nsd, make_proxy):
    corp = make_nsd(
        {"corp.example": CORP_ZONE, "10.in-addr.arpa": CORP_REVERSE, "example.test": CORP_VIEW},
        name="corp",
    )
    internet = make_nsd({"example.test": INTERNET_ZONE}, name="internet")
    proxy = make_proxy(CONFIG.replace("CORP", corp.addr).replace("INTERNET", internet.addr))
    return proxy, corp, internet


def rdatas(msg: dns.message.Message, rdtype: int = dns.rdatatype.A) -> list[str]:
    return [rd.to_text() for rrset in msg.answer if rrset.rdtype == rdtype for rd in rrset]


def test_each_zone_goes_to_its_upstream(split):
    proxy, _, _ = split
    assert rdatas(proxy.ask("db.corp.example")) == ["10.0.0.6"]
    assert rdatas(proxy.ask("www.example.test")) == ["192.0.2.10"]
    ptr = proxy.ask("5.0.0.10.in-addr.arpa", "PTR")  # scoped reverse zone: not answered locally
    assert rdatas(ptr, dns.rdatatype.PTR) == ["app.corp.example."]
    dig = need("dig")
    out = subprocess.run(
        [
            dig,
            "@127.0.0.1",
            "-p",
            str(proxy.port),
            "+short",
            "+time=3",
            "+tries=1",
            "app.corp.example",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.stdout.split() == ["10.0.0.5"]


SPECIAL = [
    ("5.1.168.192.in-addr.arpa", "PTR", dns.rcode.NXDOMAIN, []),
    ("9.9.9.10.in-addr.arpa", "PTR", dns.rcode.NXDOMAIN, []),  # from corp's zone: no such PTR
    ("printer", "A", dns.rcode.NXDOMAIN, []),
    ("anything.invalid", "A", dns.rcode.NXDOMAIN, []),
    ("localhost", "A", dns.rcode.NOERROR, ["127.0.0.1"]),
]


def test_special_names_are_answered_without_leaking(split):
    proxy, _, _ = split
    for name, rdtype, rcode, answer in SPECIAL:
        msg = proxy.ask(name, rdtype)
        assert (msg.rcode(), rdatas(msg)) == (rcode, answer), name
    # The corp zone's own SOA proves 9.9.9.10.in-addr.arpa went to corp, not localnames.
    soa = proxy.ask("9.9.9.10.in-addr.arpa", "PTR").authority[0]
    assert soa[0].mname.to_text() == "ns.corp.example."


def test_rewritten_names_come_back_under_the_asked_name(split):
    proxy, _, _ = split
    msg = proxy.ask("WWW.Staging.Corp.Example")
    assert msg.question[0].name.to_text() == "WWW.Staging.Corp.Example."
    assert sorted(rrset.to_text().lower() for rrset in msg.answer) == [
        "app.staging.corp.example. 300 in a 10.0.0.5",
        "www.staging.corp.example. 300 in cname app.staging.corp.example.",
    ]
    assert proxy.ask("nope.staging.corp.example").rcode() == dns.rcode.NXDOMAIN


def test_ttl_clamp_holds(split):
    proxy, _, _ = split
    for name in ("www.example.test", "mail.example.test"):
        msg = proxy.ask(name)
        assert msg.answer and all(60 <= rrset.ttl <= 120 for rrset in msg.answer)
    assert proxy.ask("db.corp.example").answer[0].ttl > 120  # outside the rule: untouched


def test_rotation_changes_the_order_across_queries(split):
    proxy, _, _ = split
    orders = [tuple(rdatas(proxy.ask("pool.example.test"))) for _ in range(4)]
    assert all(sorted(o) == [f"192.0.2.{100 + i}" for i in range(1, 5)] for o in orders)
    assert len({o[0] for o in orders}) == 4  # every address comes first once


def test_cache_keeps_client_views_apart(split):
    proxy, corp, internet = split
    for _ in range(2):  # the second round is answered by the cache
        assert rdatas(proxy.ask("www.example.test")) == ["192.0.2.10"]
        assert rdatas(proxy.ask("www.example.test", source="127.0.0.2")) == ["10.0.0.10"]
        corp.stop()
        internet.stop()
