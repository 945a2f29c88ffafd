"""`dnsproxy check` and `dnsproxy query` as a user runs them, and what the proxy says about
blocks: the matched rule in the trace, the query log and /api/query (issue 21: 6, 10, 11, 13)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import BLOCKLISTS, ZONE, free_port
from tests.integration.test_observability import run_query, wait_rows

CNAME_ZONE = """\
$ORIGIN cname.test.
$TTL 300
@      IN SOA ns.cname.test. admin.cname.test. 1 3600 600 86400 60
@      IN NS  ns.example.test.
track  IN CNAME 0cf.io.
"""

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"

[http]
listen = "127.0.0.1:%(http)s"

[[chain]]
plugin = "querylog"
database = "log/queries.sqlite"
flush_interval = "50ms"

[[chain]]
plugin = "hosts"
entries = ["192.168.1.10 nas.lan"]

[[chain]]
plugin = "blocklist"
lists = ["%(lists)s/basic.hosts", "%(lists)s/tracking.adblock", "%(tmp)s/local.txt"]
allow = ["%(tmp)s/allow.txt"]

[[chain]]
plugin = "forward"
upstreams = ["%(upstream)s"]
"""


def check(tmp_path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.toml"
    path.write_text(text + '[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:9"]\n')
    return subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("table", "error"),
    [
        (
            '[server]\nlisten = ["::1:{p}"]\n',
            "config.toml: server: option 'listen': '::1:{p}': an IPv6 address with a port "
            "needs brackets: write [::1]:{p}",
        ),
        (
            '[server]\nlisten = ["127.0.0.1:{p}", "0.0.0.0:{p}"]\n',
            "config.toml: server: option 'listen': 127.0.0.1:{p} and 0.0.0.0:{p} overlap",
        ),
        (
            '[server]\nlisten = ["127.0.0.1:{p}", "127.0.0.1:{p}"]\n',
            "config.toml: server: option 'listen': 127.0.0.1:{p} is listed twice",
        ),
        (
            '[server]\nlisten = ["127.0.0.1:{p}"]\n[http]\nlisten = "0.0.0.0:{p}"\n'
            'password_hash = "scrypt$15$8$1$PQAGWDHUARXEWJA9mutGyw$AF_Wf7-aXMrykDowKvA2D8L6AbBdOgYh7mZhFhs7km0-K6OYQde-g04mCJZ3Wz2Ybfe-Tg-q2rnQBe4wonLNsA"\n',  # off loopback
            "config.toml: http: option 'listen': 0.0.0.0:{p} clashes with the DNS listener",
        ),
    ],
)
def test_check_rejects_listen_mistakes(tmp_path, table, error):
    port = str(free_port())
    result = check(tmp_path, table.replace("{p}", port))
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(error.replace("{p}", port)), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def adblock(make_nsd, make_proxy, tmp_path):
    """The LAN ad-blocker with a query log and [http], its lists loaded."""
    nsd = make_nsd({"example.test": ZONE, "cname.test": CNAME_ZONE})
    (tmp_path / "local.txt").write_text("||example.test^\n")
    (tmp_path / "allow.txt").write_text("www.example.test\n")
    http = free_port()
    config = CONFIG % {"lists": BLOCKLISTS, "upstream": nsd.addr, "tmp": tmp_path, "http": http}
    proxy = make_proxy(config, wait_for="listening on http")
    deadline = time.monotonic() + 30
    while "4/4 lists ready" not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    proxy.http = f"http://127.0.0.1:{http}"
    return proxy


def test_query_log_and_api_name_the_rule(adblock):
    assert adblock.ask("x.y.doubleclick.net").answer[0][0].address == "0.0.0.0"
    assert adblock.ask("www.example.test").answer[0][0].address == "192.0.2.10"
    assert adblock.ask("track.cname.test").answer[0][0].address == "0.0.0.0"
    assert adblock.ask("mail.example.test").answer[0][0].address == "0.0.0.0"
    rows = wait_rows(adblock.dir / "log" / "queries.sqlite", 4)
    assert [(r["list"], r["rule"]) for r in rows] == [
        ("basic.hosts", "doubleclick.net"),
        (None, "allowed by allow.txt: www.example.test"),
        ("tracking.adblock", "||0cf.io^ (CNAME target 0cf.io)"),
        ("local.txt", "||example.test^"),
    ]
    with httpx.Client(base_url=adblock.http, timeout=10) as http:
        doc = http.get("/api/query", params={"name": "x.y.doubleclick.net"}).json()
    assert doc["answered_by"] == "blocklist"
    assert doc["notes"] == {"list": "basic.hosts", "rule": "doubleclick.net"}
    assert (
        "config.toml: chain[2] (blocklist): blocked by basic.hosts: x.y.doubleclick.net matched"
        " 'doubleclick.net'; also matched: tracking.adblock '||doubleclick.net^'"
    ) in doc["trace"]


def test_query_trace_names_the_rule_the_allow_and_the_cname(adblock):
    out = run_query(adblock.config_path, "x.y.doubleclick.net")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert (
        "blocked by basic.hosts: x.y.doubleclick.net matched 'doubleclick.net'; "
        "also matched: tracking.adblock '||doubleclick.net^'"
    ) in text
    assert ";; matched list: basic.hosts\n;; matched rule: doubleclick.net\n" in text

    out = run_query(adblock.config_path, "www.example.test")
    assert out.returncode == 0, out.stderr
    assert (
        "config.toml: chain[2] (blocklist): allowed by allow.txt: www.example.test matched "
        "'www.example.test'; also matched: local.txt '||example.test^'"
    ) in out.stdout
    assert ";; matched rule: allowed by allow.txt: www.example.test" in out.stdout
    assert ";; answered by: forward (config.toml: chain[3] (forward))" in out.stdout

    out = run_query(adblock.config_path, "track.cname.test")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert (
        "config.toml: chain[2] (blocklist): blocked by tracking.adblock: CNAME target 0cf.io "
        "matched '||0cf.io^'"
    ) in text
    assert ";; answered by: blocklist (config.toml: chain[2] (blocklist))" in text


@pytest.mark.parametrize(
    "args",
    [
        ("-x", "192.168.1.10"),
        ("192.168.1.10", "PTR"),
        ("192.168.1.10",),
        ("-x", "192.168.1.10", "PTR"),
    ],
)
def test_query_reverse_lookup(tmp_path, args):
    path = tmp_path / "config.toml"
    path.write_text('[[chain]]\nplugin = "hosts"\nentries = ["192.168.1.10 nas.lan"]\n')
    out = run_query(path, *args)
    assert out.returncode == 0, out.stderr
    assert ";; query: 10.1.168.192.in-addr.arpa. PTR from 127.0.0.1 (udp)" in out.stdout
    assert "10.1.168.192.in-addr.arpa. 3600 IN PTR nas.lan." in out.stdout


def test_query_reverse_lookup_errors(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[[chain]]\nplugin = "hosts"\nentries = ["192.168.1.10 nas.lan"]\n')
    out = run_query(path, "-x", "nas.lan")
    assert out.returncode == 1 and "-x nas.lan: not an IP address" in out.stderr
    out = run_query(path, "192.168.1.10", "A")  # an explicit other type: the name as given
    assert out.returncode == 0 and ";; query: 192.168.1.10. A" in out.stdout
