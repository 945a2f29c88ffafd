"""The LAN ad-blocker: hosts + blocklist + forward in the real proxy, real lists, real clients."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.conftest import BLOCKLISTS, ZONE, need

CNAME_ZONE = """\
$ORIGIN cname.test.
$TTL 300
@      IN SOA ns.cname.test. admin.cname.test. 1 3600 600 86400 60
@      IN NS  ns.example.test.
track  IN CNAME 0cf.io.
ok     IN CNAME www.example.test.
"""

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"

[[chain]]
plugin = "hosts"
entries = ["192.0.2.50 printer.lan", "2001:db8::50 printer.lan"]

[[chain]]
plugin = "blocklist"
lists = ["%(lists)s/basic.hosts", "%(lists)s/tracking.adblock", "%(tmp)s/local.txt"]
allow = ["%(tmp)s/allow.txt"]
ttl = 42

[[chain]]
plugin = "forward"
upstreams = ["%(upstream)s"]
"""


def addrs(msg):
    return sorted(rd.to_text() for rrset in msg.answer for rd in rrset if rrset.rdtype in (1, 28))


def edes(msg):
    return [(o.code, o.text) for o in msg.options if isinstance(o, dns.edns.EDEOption)]


def sample(path, every):
    names = []
    for line in path.read_text().splitlines()[::every]:
        if line and line[0] not in "#!":
            names.append(line.split()[-1].strip("|^"))
    return names


@pytest.fixture
def proxy(make_nsd, make_proxy, tmp_path):
    nsd = make_nsd({"example.test": ZONE, "cname.test": CNAME_ZONE})
    (tmp_path / "local.txt").write_text("||example.test^\n")
    (tmp_path / "allow.txt").write_text("www.example.test\n")
    config = CONFIG % {"lists": BLOCKLISTS, "upstream": nsd.addr, "tmp": tmp_path}
    return make_proxy(config, wait_for="listening")


def test_lan_adblocker(proxy):
    # Answers from the first second, blocking or not, while the lists load.
    assert proxy.ask("printer.lan").rcode() == dns.rcode.NOERROR
    deadline = time.monotonic() + 30
    while "4/4 lists ready" not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)

    # Every sampled domain of each real list is blocked, with its subdomains, EDE and TTL.
    for list_name, every in (("basic.hosts", 761), ("tracking.adblock", 1439)):
        for name in sample(BLOCKLISTS / list_name, every):
            for qname in (name, f"sub.{name}"):
                msg = proxy.ask(qname)
                assert addrs(msg) == ["0.0.0.0"], qname
                assert msg.answer[0].ttl == 42
                # a name on both lists is reported by the first in config order
                assert edes(msg) in ([(15, list_name)], [(15, "basic.hosts")]), qname
    assert addrs(proxy.ask("0cf.io", "AAAA")) == ["::"]
    mx = proxy.ask("0cf.io", "MX")
    assert mx.rcode() == dns.rcode.NOERROR and mx.answer == []

    # Names outside the lists go upstream; an allow entry beats the zone-wide block.
    assert addrs(proxy.ask("www.example.test")) == ["192.0.2.10"]
    assert edes(proxy.ask("mail.example.test")) == [(15, "local.txt")]
    # CNAME inspection: the upstream's answer points at a blocked name.
    track = proxy.ask("track.cname.test")
    assert addrs(track) == ["0.0.0.0"] and edes(track) == [(15, "tracking.adblock")]
    assert addrs(proxy.ask("ok.cname.test")) == ["192.0.2.10"]

    # hosts: authoritative answers, NODATA for other types, PTR synthesised.
    msg = proxy.ask("printer.lan")
    assert addrs(msg) == ["192.0.2.50"] and msg.flags & dns.flags.AA
    assert addrs(proxy.ask("printer.lan", "AAAA")) == ["2001:db8::50"]
    mx = proxy.ask("printer.lan", "MX")
    assert mx.rcode() == dns.rcode.NOERROR and mx.answer == []
    ptr = proxy.ask("50.2.0.192.in-addr.arpa", "PTR")
    assert [rd.to_text() for rd in ptr.answer[0]] == ["printer.lan."]


def test_dig_shows_ede_and_ttl(proxy):
    dig = need("dig")
    deadline = time.monotonic() + 30
    while "4/4 lists ready" not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    out = subprocess.run(
        [dig, "@127.0.0.1", "-p", str(proxy.port), "+tries=1", "+time=3", "0-app.com", "A"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    assert "EDE: 15 (Blocked): (basic.hosts)" in out
    assert "0-app.com.\t\t42\tIN\tA\t0.0.0.0" in out


def test_check_prints_per_list_counts(proxy):
    result = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(proxy.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(blocklist): list basic.hosts: 76036 rules, 76036 names, 0 skipped, 0 errors" in out
    assert "list tracking.adblock: 143876 rules" in out
    assert "list local.txt: 1 rules" in out and "list allow.txt: 1 rules" in out
    assert "(hosts): 1 names, 0 wildcards, 2 reverse names, 0 bad lines" in out


def test_sighup_reload_keeps_blocking(proxy):
    deadline = time.monotonic() + 30
    while "4/4 lists ready" not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "reloaded" not in proxy.log():
        # every answer during and right after the swap is still the blocked one
        assert addrs(proxy.ask("0cf.io")) == ["0.0.0.0"]
        assert time.monotonic() < deadline, proxy.log()
    for _ in range(20):
        assert addrs(proxy.ask("0cf.io")) == ["0.0.0.0"]
        assert edes(proxy.ask("mail.example.test")) == [(15, "local.txt")]
