"""The guards step in the real process against nsd: bypass canaries and DNS rebinding."""

from __future__ import annotations

import dns.edns
import dns.rcode

ZONE = """\
$ORIGIN {origin}.
$TTL 300
@      IN SOA ns admin 1 3600 600 86400 60
@      IN NS  ns
ns     IN A   192.0.2.53
nas    IN A   192.168.1.1
loop   IN AAAA ::1
mapped IN AAAA ::ffff:10.1.2.3
www    IN A   192.0.2.10
"""

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]

[[chain]]
plugin = "guards"
{guards}

[[chain]]
plugin = "forward"
upstreams = ["{upstream}"]
"""


def start(make_nsd, make_proxy, guards: str = "", name: str = "nsd"):
    zones = {z: ZONE.replace("{origin}", z) for z in ("public.test", "home.test")}
    nsd = make_nsd(zones, name)
    return make_proxy(CONFIG.replace("{upstream}", nsd.addr).replace("{guards}", guards))


def test_rebinding_answers_are_dropped_except_under_allowed_zones(make_nsd, make_proxy):
    proxy = start(make_nsd, make_proxy, 'rebinding_allow = ["home.test"]')
    for name, rdtype in (("nas", "A"), ("loop", "AAAA"), ("mapped", "AAAA")):
        r = proxy.ask(f"{name}.public.test", rdtype)
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, name
        ede = [o for o in r.options if o.otype == dns.edns.EDE]
        assert ede and ede[0].code == 15 and ede[0].text == "rebinding"
    assert proxy.ask("www.public.test").answer[0][0].to_text() == "192.0.2.10"
    assert proxy.ask("nas.home.test").answer[0][0].to_text() == "192.168.1.1"


def test_rebinding_off_passes_private_answers(make_nsd, make_proxy):
    proxy = start(make_nsd, make_proxy, "rebinding = false")
    assert proxy.ask("nas.public.test").answer[0][0].to_text() == "192.168.1.1"


def test_canary_by_default_and_private_relay_when_asked(make_nsd, make_proxy):
    proxy = start(make_nsd, make_proxy)
    assert proxy.ask("use-application-dns.net").rcode() == dns.rcode.NXDOMAIN
    # not blocked by default: the query goes to nsd, which is not authoritative for it
    assert proxy.ask("mask.icloud.com").rcode() != dns.rcode.NXDOMAIN
    relay = start(make_nsd, make_proxy, "icloud_private_relay = true\ncanary = false", "nsd2")
    assert relay.ask("mask-h2.icloud.com").rcode() == dns.rcode.NXDOMAIN
    assert relay.ask("use-application-dns.net").rcode() != dns.rcode.NXDOMAIN
