"""The zone plugin against a real reference: the same zone file served by nsd and by the
real proxy process, a corpus of questions asked of both, the answers compared section by
section. Delegated names and CNAME targets outside the zone are resolved by a second nsd
(the child zone and another zone) that the proxy forwards to.

Deliberate differences from nsd, allowed here and documented in plugins/zone/README.md:

* positive answers carry no NS RRset of the apex in the authority section (minimal
  responses), so the additional section holds only A/AAAA of the MX/SRV/NS targets in the
  answer (nsd adds the apex NS glue as well);
* ANY gets every RRset of the name (nsd answers one, RFC 8482): nsd's must be among ours;
* a CNAME leaving the zone is followed (nsd returns the CNAME alone), and a delegated name
  is passed on to the chain instead of answered with a referral.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest

from tests.conftest import ZONE, need
from tests.integration.test_examples import EXAMPLES, swap
from tests.plugins.test_zone import DEV_ZONE

OTHER_ZONE = """\
$ORIGIN other.test.
$TTL 300
@    IN SOA ns.other.test. hostmaster.other.test. 1 3600 600 86400 60
@    IN NS  ns
ns   IN A   127.0.0.1
www  IN A   198.51.100.7
"""

CHILD_ZONE = """\
$ORIGIN sub.dev.test.
$TTL 300
@    IN SOA ns.sub.dev.test. hostmaster.sub.dev.test. 1 3600 600 86400 60
@    IN NS  ns
ns   IN A   192.0.2.53
host IN A   198.51.100.53
"""

CONFIG = """\
[server]
listen = ["127.0.0.1:{port}"]

[[chain]]
plugin = "zone"
files = ["%(zone)s"]
allow_transfer = %(allow)s

[[chain]]
plugin = "forward"
upstreams = ["%(other)s"]
"""

TYPES = ["A", "AAAA", "MX", "TXT", "SRV", "NS", "SOA", "CNAME", "ANY"]
EXTRA = [
    "a.apps.dev.test",  # below wildcards
    "z.x.apps.dev.test",
    "deep.q.cn.dev.test",  # a wildcard CNAME
    "zz.dev.test",
    "ent.dev.test",  # empty non-terminals
    "y.apps.dev.test",
    "_tcp.dev.test",
    "q.ent.dev.test",  # NXDOMAIN below an empty non-terminal
    "x.web.dev.test",
    "WeB.DeV.TeSt",  # case variants
    "A.ApPs.dev.TEST",
    "Api.Dev.Test",
]
DELEGATED = ["sub.dev.test", "ns.sub.dev.test", "host.sub.dev.test", "foo.sub.dev.test"]
LEAVING = ["ext.dev.test", "deleg.dev.test"]


def corpus() -> list[tuple[str, str]]:
    zone = dns.zone.from_text(DEV_ZONE, relativize=False)
    names = [n.to_text(omit_final_dot=True) for n in zone.nodes]
    names = [n for n in names if "*" not in n and n not in DELEGATED and n not in LEAVING]
    return [(n, t) for n in [*names, *EXTRA] for t in TYPES]


def ask(
    host_port: tuple[str, int], name: str, rdtype: str, tcp: bool = False
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=0)
    q.flags &= ~dns.flags.RD
    query = dns.query.tcp if tcp else dns.query.udp
    return query(q, host_port[0], port=host_port[1], timeout=5)


def rows(rrsets: list[dns.rrset.RRset]) -> set[str]:
    """A section as a set of records: case and order inside an RRset do not matter."""
    return {
        f"{r.name.to_text().lower()} {r.ttl} {dns.rdatatype.to_text(r.rdtype)} {rd.to_text()}"
        for r in rrsets
        for rd in r
    }


def targets(answer: list[dns.rrset.RRset]) -> set[dns.name.Name]:
    out = set()
    for r in answer:
        for rd in r:
            for attr in ("exchange", "target"):
                if r.rdtype in (2, 15, 33) and hasattr(rd, attr):
                    out.add(getattr(rd, attr))
    return out


@pytest.fixture
def servers(tmp_path, make_nsd, make_proxy):
    ref = make_nsd({"dev.test": DEV_ZONE}, name="ref")
    other = make_nsd({"other.test": OTHER_ZONE, "sub.dev.test": CHILD_ZONE}, name="other")
    zone_path = tmp_path / "dev.test.zone"
    zone_path.write_text(DEV_ZONE)
    proxy = make_proxy(
        CONFIG % {"zone": zone_path, "allow": '["127.0.0.2/32"]', "other": other.addr}
    )
    return (ref.host, ref.port), (other.host, other.port), proxy.addr


def test_zone_answers_match_nsd(servers):
    ref, _, proxy = servers
    mismatches = []
    for name, rdtype in corpus():
        want, got = ask(ref, name, rdtype), ask(proxy, name, rdtype)
        problems = []
        if got.rcode() != want.rcode() or not got.flags & dns.flags.AA:
            problems.append(f"rcode/AA {got.rcode()}/{got.flags} != {want.rcode()}")
        if rdtype == "ANY":
            if not rows(want.answer) <= rows(got.answer):
                problems.append(f"ANY {rows(got.answer)} lacks {rows(want.answer)}")
        elif rows(got.answer) != rows(want.answer):
            problems.append(f"answer {rows(got.answer)} != {rows(want.answer)}")
        apex_ns = [r for r in want.authority if r.rdtype == 2 and want.answer]
        authority = [r for r in want.authority if r not in apex_ns]
        if rows(got.authority) != rows(authority):
            problems.append(f"authority {rows(got.authority)} != {rows(authority)}")
        wanted_targets = targets(got.answer) if rdtype != "ANY" else targets(want.answer)
        additional = [r for r in want.additional if r.name in wanted_targets]
        if rdtype != "ANY" and rows(got.additional) != rows(additional):
            problems.append(f"additional {rows(got.additional)} != {rows(additional)}")
        if problems:
            mismatches.append(f"{name} {rdtype}: " + "; ".join(problems))
    assert not mismatches, "\n".join(mismatches)
    assert len(corpus()) > 150


def test_cname_leaving_the_zone_carries_the_whole_chain(servers):
    ref, other, proxy = servers
    for name in LEAVING:
        cname = ask(ref, name, "A")
        assert [r.rdtype for r in cname.answer] == [dns.rdatatype.CNAME]
        target = cname.answer[0][0].target.to_text()
        rest = ask(other, target, "A")
        got = ask(proxy, name, "A")
        assert got.rcode() == dns.rcode.NOERROR and got.flags & dns.flags.AA
        assert rows(got.answer) == rows(cname.answer) | rows(rest.answer)
        assert len(got.answer) == 2


@pytest.mark.parametrize("name", DELEGATED)
def test_delegated_names_are_answered_by_the_chain(servers, name):
    _, other, proxy = servers
    for rdtype in ("A", "NS"):
        want, got = ask(other, name, rdtype), ask(proxy, name, rdtype)
        assert got.rcode() == want.rcode()
        assert rows(got.answer) == rows(want.answer)


def kdig_axfr(addr: tuple[str, int], source: str = "127.0.0.1", qtype: str = "AXFR") -> str:
    out = subprocess.run(
        [need("kdig"), "-b", source, "-p", str(addr[1]), f"@{addr[0]}", "dev.test", qtype],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.stdout + out.stderr


def test_kdig_axfr_is_refused_and_allowed_for_the_acl(servers):
    _, _, proxy = servers
    assert "REFUSED" in kdig_axfr(proxy)
    udp = ask(proxy, "dev.test", "AXFR")
    assert udp.rcode() == dns.rcode.REFUSED
    tcp = ask(proxy, "dev.test", "AXFR", tcp=True)
    assert tcp.rcode() == dns.rcode.REFUSED and tcp.answer == []
    allowed = kdig_axfr(proxy, source="127.0.0.2")
    assert "REFUSED" not in allowed
    lines = [ln for ln in allowed.splitlines() if ln and not ln.startswith(";")]
    zone = dns.zone.from_text(DEV_ZONE, relativize=False)
    records = sum(len(rds) for _, node in zone.nodes.items() for rds in node)
    assert len(lines) == records + 1  # SOA first and last
    assert lines[0].split()[3] == lines[-1].split()[3] == "SOA"


def test_kdig_ixfr_with_its_soa_is_refused_and_allowed_for_the_acl(servers):
    """kdig's IXFR query carries the client's SOA in the authority section (RFC 1995 §3):
    it reaches the zone (REFUSED, or the whole zone for the ACL), not FORMERR."""
    _, _, proxy = servers
    refused = kdig_axfr(proxy, qtype="IXFR=1")
    assert "REFUSED" in refused and "FORMERR" not in refused
    allowed = kdig_axfr(proxy, source="127.0.0.2", qtype="IXFR=1")
    lines = [ln for ln in allowed.splitlines() if ln and not ln.startswith(";")]
    assert "FORMERR" not in allowed and "REFUSED" not in allowed
    assert lines[0].split()[3] == lines[-1].split()[3] == "SOA"


def test_check_names_the_broken_zone_file_and_line(tmp_path):
    zone = tmp_path / "dev.test.zone"
    zone.write_text(DEV_ZONE.replace("web        IN A   192.0.2.80", "web IN BOGUS 1"))
    config = tmp_path / "config.toml"
    config.write_text(f'[[chain]]\nplugin = "zone"\nfiles = ["{zone.name}"]\n')
    out = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"config.toml: chain[0] (zone): files: {zone}:10: unknown rdatatype" in out.stderr
    zone.write_text(DEV_ZONE)
    out = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "zone dev.test.: 22 records" in out.stdout


def test_dev_zone_example(make_nsd, make_proxy):
    """examples/dev-zone.toml as shipped, but for its listen address, upstream and path
    (the cache clamps TTLs to 300 s)."""
    internet = make_nsd({"example.org": ZONE.replace("example.test.", "example.org.")})
    text = swap(
        (EXAMPLES / "dev-zone.toml").read_text(),
        {
            'listen = ["127.0.0.1:5353", "[::1]:5353"]': 'listen = ["127.0.0.1:{port}"]',
            '"system"': f'"{internet.addr}"',
            'files = ["dev.test.zone"]': f'files = ["{EXAMPLES / "dev.test.zone"}"]',
        },
    )
    proxy = make_proxy(text)
    assert rows(proxy.ask("api.dev.test").answer) == {
        "api.dev.test. 300 CNAME web.dev.test.",
        "web.dev.test. 300 A 127.0.0.1",
    }
    srv = proxy.ask("_http._tcp.dev.test", "SRV")
    assert rows(srv.additional) == {"web.dev.test. 300 A 127.0.0.1", "web.dev.test. 300 AAAA ::1"}
    assert rows(proxy.ask("pr-42.preview.dev.test").answer) == {
        "pr-42.preview.dev.test. 300 CNAME web.dev.test.",
        "web.dev.test. 300 A 127.0.0.1",
    }
    docs = proxy.ask("docs.dev.test")
    assert rows(docs.answer) == {
        "docs.dev.test. 300 CNAME www.example.org.",
        "www.example.org. 300 A 192.0.2.10",
    }
    assert rows(proxy.ask("web.dev.test", "HTTPS").answer) == {
        'web.dev.test. 300 HTTPS 1 . alpn="h3,h2"'
    }
    assert rows(proxy.ask("_grpc._tcp.myapp.test", "SRV").answer) == {
        "_grpc._tcp.myapp.test. 300 SRV 0 5 50051 lb.myapp.test."
    }
    gone = proxy.ask("nope.myapp.test")
    assert gone.rcode() == dns.rcode.NXDOMAIN
    assert rows(gone.authority) == {
        "myapp.test. 60 SOA myapp.test. hostmaster.myapp.test. 1 3600 600 86400 60"
    }
    www = proxy.ask("www.example.org")  # cached by the CNAME above: its TTL counts down
    assert [rd.to_text() for rd in www.answer[0]] == ["192.0.2.10"]
    assert proxy.ask("dev.test", "AXFR", tcp=True).rcode() == dns.rcode.NOERROR


def test_running_proxy_follows_the_zone_file(tmp_path, make_proxy):
    """Edits are picked up by the running process; a broken edit keeps the old zone and is
    logged once, naming the file and line."""
    zone = tmp_path / "dev.test.zone"
    zone.write_text(DEV_ZONE)
    proxy = make_proxy(
        f'[server]\nlisten = ["127.0.0.1:{{port}}"]\n'
        f'[[chain]]\nplugin = "zone"\nfiles = ["{zone}"]\nwatch = "0.1s"\n'
    )
    zone.write_text(DEV_ZONE.replace("192.0.2.80", "192.0.2.81"))
    os.utime(zone, ns=(1, 10**18))
    deadline = time.monotonic() + 10
    while rows(proxy.ask("web.dev.test").answer) != {"web.dev.test. 300 A 192.0.2.81"}:
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    zone.write_text(DEV_ZONE + "broken IN A not-an-address\n")
    os.utime(zone, ns=(2, 2 * 10**18))
    while "keeping the zones loaded before" not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    time.sleep(0.5)  # several polls later: still one line
    assert proxy.log().count("keeping the zones loaded before") == 1
    assert f"{zone}:" in proxy.log()
    assert rows(proxy.ask("web.dev.test").answer) == {"web.dev.test. 300 A 192.0.2.81"}
