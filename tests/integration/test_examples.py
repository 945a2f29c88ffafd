"""The example configs in examples/, run as shipped except for addresses and paths.

Each test reads the example, swaps its listen address, upstreams and list paths for test
fixtures (nsd on loopback, a small blocklist file), asserting every swap happened so a
changed example breaks the test instead of silently testing something else, then starts
the real proxy on it and checks the answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
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
        assert old in text, f"example changed: {old!r} is gone"
        text = text.replace(old, new)
    return text


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
    msg = proxy.ask("api.myapp.test")
    assert rdatas(msg) == ["127.0.0.1"] and msg.answer[0].name.to_text() == "api.myapp.test."
    assert rdatas(proxy.ask("myapp.test", "AAAA"), "AAAA") == ["::1"]
    # corp.example through the "VPN": A with TTL at most 60, AAAA NODATA.
    msg = proxy.ask("db.corp.example")
    assert rdatas(msg) == ["10.0.0.6"] and msg.answer[0].ttl <= 60
    msg = proxy.ask("db.corp.example", "AAAA")
    assert (msg.rcode(), msg.answer) == (dns.rcode.NOERROR, [])
    assert rdatas(proxy.ask("5.0.0.10.in-addr.arpa", "PTR"), "PTR") == ["app.corp.example."]
    # Staging served from production, rewritten back.
    msg = proxy.ask("www.staging.example.org")
    assert rdatas(msg) == ["192.0.2.10"]
    assert msg.answer[0].name.to_text() == "www.staging.example.org."
    assert rdatas(proxy.ask("www.example.org")) == ["192.0.2.10"]
    # Nothing private leaks.
    for name, rdtype in (("printer", "A"), ("1.1.168.192.in-addr.arpa", "PTR"), ("x.test", "A")):
        assert proxy.ask(name, rdtype).rcode() == dns.rcode.NXDOMAIN, name


LAN_ZONE = """\
$ORIGIN lan.
$TTL 300
@       IN SOA router.lan. admin.lan. 1 3600 600 86400 60
@       IN NS  router
router  IN A   192.168.1.1
laptop  IN A   192.168.1.20
"""

LAN_REVERSE = """\
$ORIGIN 1.168.192.in-addr.arpa.
$TTL 300
@       IN SOA router.lan. admin.lan. 1 3600 600 86400 60
@       IN NS  router.lan.
20      IN PTR laptop.lan.
"""

PRINTER = """\
$ORIGIN printer.
$TTL 300
@       IN SOA router.lan. admin.lan. 1 3600 600 86400 60
@       IN NS  router.lan.
@       IN A   192.168.1.30
"""


def test_adblock_lan(make_nsd, make_proxy, tmp_path):
    router = make_nsd(
        {"lan": LAN_ZONE, "1.168.192.in-addr.arpa": LAN_REVERSE, "printer": PRINTER},
        name="router",
    )
    internet_zone = ZONE.replace("example.test.", "example.org.") + "ads IN A 192.0.2.66\n"
    internet = make_nsd({"example.org": internet_zone}, name="net")
    blocklist = tmp_path / "ads.hosts"
    blocklist.write_text("# test list\n0.0.0.0 ads.example.org\n0.0.0.0 tracker.example.net\n")
    text = swap(
        (EXAMPLES / "adblock-lan.toml").read_text(),
        {
            'listen = ["0.0.0.0:53", "[::]:53"]': 'listen = ["127.0.0.1:{port}"]',
            '"https://raw.githubusercontent.com/StevenBlack/hosts/master/hosts"': f'"{blocklist}"',
            '"192.168.1.1"': f'"{router.addr}"',
            '["9.9.9.9", "149.112.112.112"]': f'["{internet.addr}"]',
        },
    )
    proxy = make_proxy(text)
    done = check(proxy.config_path)
    assert done.returncode == 0 and "warning" not in done.stdout, done.stdout + done.stderr

    deadline = time.monotonic() + 10  # the list attaches in the background
    while rdatas(msg := proxy.ask("ads.example.org")) != ["0.0.0.0"]:
        assert time.monotonic() < deadline, msg.to_text()
        time.sleep(0.1)
    assert any(opt.otype == 15 for opt in proxy.ask("www.ads.example.org").options)
    assert rdatas(proxy.ask("ads.example.org", "AAAA"), "AAAA") == ["::"]
    # The house's names from the hosts table, the rest of the LAN from the router.
    assert rdatas(proxy.ask("nas.lan")) == ["192.168.1.10"]
    assert rdatas(proxy.ask("10.1.168.192.in-addr.arpa", "PTR"), "PTR") == ["nas.lan."]
    assert rdatas(proxy.ask("laptop.lan")) == ["192.168.1.20"]
    assert rdatas(proxy.ask("20.1.168.192.in-addr.arpa", "PTR"), "PTR") == ["laptop.lan."]
    assert rdatas(proxy.ask("printer")) == ["192.168.1.30"]
    # Other private reverse zones never leave; the internet through the cache.
    assert proxy.ask("5.0.0.10.in-addr.arpa", "PTR").rcode() == dns.rcode.NXDOMAIN
    assert rdatas(proxy.ask("www.example.org")) == ["192.0.2.10"]
    internet.stop()
    assert rdatas(proxy.ask("www.example.org")) == ["192.0.2.10"]  # from the cache
