"""localnames: RFC 6761 names, RFC 6303 reverse zones and single-label names stay local."""

from __future__ import annotations

import dns.message
import pytest
import trio

from dnsproxy import wire
from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_SYNTHESIZED, Reply, finalize
from dnsproxy.testing import Answer, build_step, make_query, run_chain
from tests.conftest import ZONE


def parsed(reply: Reply, q) -> dns.message.Message:
    return dns.message.from_wire(finalize(reply, q, 1232))


def local(**table):
    return build_step("localnames", table)


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "answer"),
    [
        ("localhost", "A", 0, "127.0.0.1"),
        ("app.localhost", "AAAA", 0, "::1"),
        ("localhost", "MX", 0, None),
        ("foo.invalid", "A", 3, None),
        ("invalid", "A", 3, None),
        ("myapp.test", "AAAA", 3, None),
        ("printer.local", "A", 3, None),
        ("x.onion", "A", 3, None),
        ("5.1.168.192.in-addr.arpa", "PTR", 3, None),
        ("1.0.0.10.in-addr.arpa", "PTR", 3, None),
        ("9.9.20.172.in-addr.arpa", "PTR", 3, None),
        ("1.1.64.100.in-addr.arpa", "PTR", 3, None),
        ("1.0.0.127.in-addr.arpa", "PTR", 0, "localhost."),
        ("168.192.in-addr.arpa", "NS", 0, None),
        ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa", "PTR", 0, "localhost."),
        ("0.0.d.f.ip6.arpa", "PTR", 3, None),
    ],
)  # fmt: skip
async def test_special_names_are_answered_locally(name, rdtype, rcode, answer):
    nxt = Answer({})
    q = make_query(name, rdtype)
    reply = await run_chain([local(), nxt], q)
    assert nxt.seen == []
    msg = parsed(reply, q)
    assert msg.rcode() == rcode
    assert [rd.to_text() for rrset in msg.answer for rd in rrset] == ([answer] if answer else [])
    assert reply.ede[0][0] == EDE_SYNTHESIZED
    if not answer:  # negative answers carry the zone's SOA, so caches keep them (RFC 2308)
        soa = msg.authority[0]
        assert soa.rdtype == 6 and msg.question[0].name.is_subdomain(soa.name)
        assert soa[0].minimum == 10800


async def test_soa_at_a_reverse_zone_apex():
    q = make_query("10.in-addr.arpa", "SOA")
    msg = parsed(await run_chain([local(ttl=600), Answer({})], q), q)
    assert msg.answer[0][0].to_text() == "localhost. nobody.invalid. 1 3600 1200 604800 600"


@pytest.mark.parametrize("name", ["example.org", "8.8.8.8.in-addr.arpa", "example.test.org"])
async def test_other_names_pass_on(name):
    nxt = Answer({name: ["TXT ok"]})
    reply = await run_chain([local(), nxt], make_query(name, "TXT"))
    assert reply.ancount == 1 and len(nxt.seen) == 1


async def test_single_label_names_get_nxdomain_but_tld_lookups_pass():
    nxt = Answer({"org": ["NS a.org-servers.example."]})
    reply = await run_chain([local(), nxt], make_query("printer", "A"))
    assert reply.rcode == wire.NXDOMAIN and nxt.seen == []
    reply = await run_chain([local(), nxt], make_query("org", "NS"))
    assert reply.ancount == 1
    reply = await run_chain([local(single_label="pass"), nxt], make_query("printer"))
    assert len(nxt.seen) == 2 and reply.rcode == wire.NXDOMAIN


async def test_a_zone_scoped_later_in_the_chain_wins():
    corp = Answer({"5.1.168.192.in-addr.arpa": ["PTR printer.lan."], "api.myapp.test": "127.0.0.1"})
    chain = [
        local(),
        (corp, {"zones": ["1.168.192.in-addr.arpa", "myapp.test"]}),
        Answer({}),
    ]
    reply = await run_chain(chain, make_query("5.1.168.192.in-addr.arpa", "PTR"))
    assert reply.ancount == 1
    assert (await run_chain(chain, make_query("api.myapp.test"))).ancount == 1
    # Outside the scoped zones the local answers still apply.
    q = make_query("5.2.168.192.in-addr.arpa", "PTR")
    assert (await run_chain(chain, q)).rcode == wire.NXDOMAIN
    assert (await run_chain(chain, make_query("other.test"))).rcode == wire.NXDOMAIN
    assert len(corp.seen) == 2


async def test_options_switch_groups_off():
    nxt = Answer({"app.localhost": "127.0.0.2", "1.1.168.192.in-addr.arpa": ["PTR x.lan."]})
    step = local(localhost=False, reverse=False, nxdomain_zones=["invalid"])
    assert (await run_chain([step, nxt], make_query("app.localhost"))).ancount == 1
    assert (await run_chain([step, nxt], make_query("1.1.168.192.in-addr.arpa", "PTR"))).ancount
    assert (await run_chain([step, nxt], make_query("a.test"))).rcode == wire.NXDOMAIN
    assert len(nxt.seen) == 3
    assert {m.labels: m.value for m in step.metrics() if m.name == "answered"}[
        (("kind", "localhost"),)
    ] == 0


async def test_single_label_forward_to_the_router(nsd_lan):
    step = local(single_label="forward", upstreams=[nsd_lan.addr])
    nxt = Answer({})
    with trio.fail_after(5):
        reply = await run_chain([step, nxt], make_query("printer"))
    assert reply.rcode == 0 and reply.ancount == 1 and nxt.seen == []
    assert step.metrics()[-1].value == 1
    step.close()


@pytest.fixture
def nsd_lan(make_nsd):
    zone = ZONE.replace("example.test.", "printer.").replace("www ", "@ ", 1)
    return make_nsd({"printer": zone}, name="lan")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"single_label": "forward"}, "needs 'upstreams'"),
        ({"upstreams": ["127.0.0.1:53"]}, "only used with single_label = 'forward'"),
        ({"single_label": "forward", "upstreams": ["not an address:x"]}, "upstreams"),
        ({"nxdomain_zones": ["a..b"]}, "is not a domain name"),
        ({"ttl": -1}, "ttl"),
        ({"single_label": "drop"}, "single_label"),
    ],
)
def test_bad_options(table, message):
    with pytest.raises(ConfigError) as info:
        local(**table)
    assert info.value.lines[0].startswith("test.toml: chain[0] (localnames): ")
    assert message in info.value.lines[0]
