"""DNSSEC validation end to end: the real proxy (``cache``, ``dnssec``, ``forward``) in front
of a non-validating unbound, on a hierarchy signed at test time (tests/dnssec_hierarchy.py),
compared case by case with unbound validating the same hierarchy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import trio

from dnsproxy import wire
from dnsproxy.testing import build_step, chain_of, make_query, run_chain
from tests.conftest import Proxy
from tests.dnssec_hierarchy import Hierarchy

EDE = dns.edns.EDE

# (name, type) -> (rcode, classification, EDE code or None)
CASES = {
    ("www.example.test", "A"): ("NOERROR", "secure", None),
    ("www.example.test", "MX"): ("NOERROR", "secure", None),  # NODATA, NSEC
    ("nx.example.test", "A"): ("NXDOMAIN", "secure", None),  # NSEC
    ("a.wild.example.test", "A"): ("NOERROR", "secure", None),  # wildcard, NSEC
    ("tampered.example.test", "A"): ("SERVFAIL", "bogus", 6),
    ("www.unsigned.example.test", "A"): ("NOERROR", "insecure", None),
    ("www.nsec3.test", "A"): ("NOERROR", "secure", None),
    ("www.nsec3.test", "MX"): ("NOERROR", "secure", None),  # NODATA, NSEC3
    ("nx.nsec3.test", "A"): ("NXDOMAIN", "secure", None),  # NSEC3
    ("a.wild.nsec3.test", "A"): ("NOERROR", "secure", None),  # wildcard, NSEC3
    ("www.insecure.nsec3.test", "A"): ("NOERROR", "insecure", None),
    ("www.optout.test", "A"): ("NOERROR", "secure", None),
    ("www.child.optout.test", "A"): ("NOERROR", "insecure", None),  # opt-out
    ("www.expired.test", "A"): ("SERVFAIL", "bogus", 7),
    ("www.nokey.test", "A"): ("SERVFAIL", "bogus", 9),
    ("www.stripped.test", "A"): ("SERVFAIL", "bogus", 9),
    ("www.nods.test", "A"): ("NOERROR", "insecure", None),  # signed, but no DS
    ("www.nta.test", "A"): ("NOERROR", "insecure", None),  # a negative trust anchor
}


@pytest.fixture(scope="module")
def hierarchy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hierarchy]:
    h = Hierarchy(tmp_path_factory.mktemp("dnssec")).start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def proxy(hierarchy: Hierarchy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    assert hierarchy.resolver is not None
    workdir = tmp_path_factory.mktemp("proxy")
    config = f"""
[server]
listen = ["127.0.0.1:{{port}}"]

[[chain]]
plugin = "cache"

[[chain]]
plugin = "dnssec"
trust_anchors = ["{hierarchy.anchor}"]
insecure_zones = ["nta.test"]

[[chain]]
plugin = "forward"
upstreams = ["{hierarchy.resolver.addr}"]
"""
    p = Proxy(workdir, config).start()
    yield p
    p.stop()


def ask(addr: str, name: str, rdtype: str, *, cd: bool = False) -> dns.message.Message:
    host, port = addr.rsplit(":", 1)
    q = dns.message.make_query(name, rdtype, want_dnssec=True)
    if cd:
        q.flags |= dns.flags.CD
    return dns.query.udp(q, host, port=int(port), timeout=8)


def classify(r: dns.message.Message) -> tuple[str, str, int | None]:
    rcode = dns.rcode.to_text(r.rcode())
    ede = next((o.code for o in r.options if o.otype == EDE), None)
    if rcode == "SERVFAIL":
        return rcode, "bogus", ede
    return rcode, "secure" if r.flags & dns.flags.AD else "insecure", None


def proxy_addr(proxy: Proxy) -> str:
    return f"{proxy.addr[0]}:{proxy.addr[1]}"


@pytest.mark.parametrize(("name", "rdtype"), list(CASES))
def test_classification(proxy: Proxy, hierarchy: Hierarchy, name: str, rdtype: str) -> None:
    got = classify(ask(proxy_addr(proxy), name, rdtype))
    assert got == CASES[name, rdtype], proxy.log()[-2000:]


@pytest.mark.parametrize(("name", "rdtype"), list(CASES))
def test_agrees_with_unbound(proxy: Proxy, hierarchy: Hierarchy, name: str, rdtype: str) -> None:
    """unbound, validating with the same anchor (and nta.test as domain-insecure), gives the
    same rcode and secure/insecure/bogus answer (EDE codes aside: unbound 1.17 sends none)."""
    assert hierarchy.validator is not None
    theirs = classify(ask(hierarchy.validator.addr, name, rdtype))[:2]
    ours = classify(ask(proxy_addr(proxy), name, rdtype))[:2]
    assert ours == theirs


def test_cd_passes_bogus_data_through(proxy: Proxy) -> None:
    r = ask(proxy_addr(proxy), "tampered.example.test", "A", cd=True)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rd.to_text() for rrset in r.answer if rrset.rdtype == 1 for rd in rrset] == [
        "192.0.2.67"
    ]
    assert any(rrset.rdtype == dns.rdatatype.RRSIG for rrset in r.answer)  # DO passed on


def test_plain_client_gets_no_dnssec_records(proxy: Proxy) -> None:
    host, port = proxy.addr
    q = dns.message.make_query("www.example.test", "A")
    r = dns.query.udp(q, host, port=port, timeout=8)
    assert r.rcode() == dns.rcode.NOERROR
    assert not r.flags & dns.flags.AD
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.A]


def test_trace_names_keys_and_reason(proxy: Proxy) -> None:
    def trace(name: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "dnsproxy", "query", "-c", str(proxy.config_path), name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout + out.stderr

    ok = trace("www.example.test")
    assert "secure" in ok and "example.test. DNSKEY validated by key" in ok, ok
    bad = trace("tampered.example.test")
    assert "signature does not verify" in bad, bad


async def test_cache_before_dnssec_keeps_the_validated_answer(hierarchy: Hierarchy) -> None:
    """``cache`` before ``dnssec``: the second query is a cache hit with AD, not validated
    again; the bogus answer is counted once per validation and never served as good."""
    assert hierarchy.resolver is not None
    cache = build_step("cache", {})
    dnssec = build_step("dnssec", {"trust_anchors": [str(hierarchy.anchor)]})
    forward = build_step("forward", {"upstreams": [hierarchy.resolver.addr]})
    chain = chain_of([cache, dnssec, forward])
    with trio.fail_after(20):
        for _ in range(2):
            reply = await run_chain(chain, make_query("www.example.test", do=True))
            assert reply is not None and reply.flags & wire.AD
        bad = await run_chain(chain, make_query("tampered.example.test", do=True))
    assert bad is not None and bad.rcode == wire.SERVFAIL and bad.ede[0][0] == 6
    assert dnssec.counts == {"secure": 1, "insecure": 0, "bogus": 1}
    assert dnssec.validator.fetches > 0 and len(dnssec.validator.store) >= 3
    chain.close()
