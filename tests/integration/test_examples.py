"""The example configs in examples/, run as shipped except for addresses and paths.

Each test reads the example, swaps its listen address, upstreams and list paths for test
fixtures (nsd on loopback, a small blocklist file), asserting every swap happened so a
changed example breaks the test instead of silently testing something else, then starts
the real proxy on it and checks the answers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.conftest import ROOT, ZONE
from tests.integration.test_splitdns import CORP_REVERSE, CORP_ZONE

EXAMPLES = ROOT / "examples"


def swap(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"example changed: {old!r} expected exactly once"
        text = text.replace(old, new)
    return text


def ask(proxy, name: str, rdtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=0)
    return dns.query.udp(q, proxy.addr[0], port=proxy.port, timeout=3)


def rdatas(msg: dns.message.Message, rdtype: str = "A") -> list[str]:
    code = dns.rdatatype.from_text(rdtype)
    return sorted(rd.to_text() for rrset in msg.answer if rrset.rdtype == code for rd in rrset)


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_split_dns_dev(make_nsd, make_proxy):
    corp = make_nsd({"corp.example": CORP_ZONE, "10.in-addr.arpa": CORP_REVERSE}, name="corp")
    internet = make_nsd({"example.org": ZONE.replace("example.test.", "example.org.")}, name="net")
    text = swap(
        (EXAMPLES / "split-dns-dev.toml").read_text(),
        {
            'listen = ["127.0.0.1:5353", "[::1]:5353"]': 'listen = ["127.0.0.1:{port}"]',
            '"10.8.0.1"': f'"{corp.addr}"',
            '"system"': f'"{internet.addr}"',
        },
    )
    proxy = make_proxy(text)
    done = check(proxy.config_path)
    assert done.returncode == 0 and "warning" not in done.stdout, done.stdout + done.stderr

    # *.myapp.test is this machine, under the name asked.
    msg = ask(proxy, "api.myapp.test")
    assert rdatas(msg) == ["127.0.0.1"] and msg.answer[0].name.to_text() == "api.myapp.test."
    assert rdatas(ask(proxy, "myapp.test", "AAAA"), "AAAA") == ["::1"]
    # corp.example through the "VPN": A with TTL at most 60, AAAA NODATA.
    msg = ask(proxy, "db.corp.example")
    assert rdatas(msg) == ["10.0.0.6"] and msg.answer[0].ttl <= 60
    msg = ask(proxy, "db.corp.example", "AAAA")
    assert (msg.rcode(), msg.answer) == (dns.rcode.NOERROR, [])
    assert rdatas(ask(proxy, "5.0.0.10.in-addr.arpa", "PTR"), "PTR") == ["app.corp.example."]
    # Staging served from production, rewritten back.
    msg = ask(proxy, "www.staging.example.org")
    assert rdatas(msg) == ["192.0.2.10"]
    assert msg.answer[0].name.to_text() == "www.staging.example.org."
    assert rdatas(ask(proxy, "www.example.org")) == ["192.0.2.10"]
    # Nothing private leaks.
    for name, rdtype in (("printer", "A"), ("1.1.168.192.in-addr.arpa", "PTR"), ("x.test", "A")):
        assert ask(proxy, name, rdtype).rcode() == dns.rcode.NXDOMAIN, name
