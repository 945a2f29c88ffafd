"""Clients by name in the real process: names from lease files (dnsmasq, ISC, Kea), the
neighbour table and PTR answers of an nsd reverse zone show in the query log and
/api/stats; a blocklist scoped to groups blocks for them only; a group's pause pauses it
only. Queries come from different 127.x source addresses."""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
import sys

import httpx
import pytest

from dnsproxy import cli
from tests.conftest import IN_CI, ROOT, ZONE, free_port, need, until
from tests.core.test_clients import ARP, DNSMASQ, ISC, KEA

REVERSE = """\
$ORIGIN 0.0.127.in-addr.arpa.
$TTL 300
@   IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60
@   IN NS  ns.example.test.
99  IN PTR office-pc.lan.
"""

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
[http]
listen = "127.0.0.1:{http}"
[clients]
leases = ["dnsmasq.leases", "dhcpd.leases", "kea-leases4.csv"]
neighbours = "arp"
ptr_resolver = "{nsd}"
refresh = "0.2s"
kids-tablet = []
grandpa = ["aa:bb:cc:dd:ee:90"]
[groups]
kids = ["kids-tablet", "127.0.0.32/28"]
guests = ["127.0.0.80"]
[[chain]]
plugin = "querylog"
flush_interval = "50ms"
[[chain]]
plugin = "blocklist"
lists = ["ads.txt"]
clients = ["kids", "guests"]
[[chain]]
plugin = "forward"
upstreams = ["{nsd}"]
"""


def local(text: str) -> str:
    """The sample lease files, on 127.0.0.x instead of 192.168.1.x (loopback only here)."""
    return text.replace("192.168.1.", "127.0.0.")


@pytest.fixture
def household(make_proxy, make_nsd, tmp_path):
    nsd = make_nsd({"example.test": ZONE, "0.0.127.in-addr.arpa": REVERSE})
    http_port = free_port()
    text = CONFIG.replace("{http}", str(http_port)).replace("{nsd}", nsd.addr)
    workdir = tmp_path / "proxy0"  # make_proxy's first directory: the files sit beside it
    workdir.mkdir()
    (workdir / "dnsmasq.leases").write_text(local(DNSMASQ))
    (workdir / "dhcpd.leases").write_text(local(ISC))
    (workdir / "kea-leases4.csv").write_text(local(KEA))
    (workdir / "arp").write_text(local(ARP))
    (workdir / "ads.txt").write_text("www.example.test\n")
    (tmp_path / "proxy0").rename(tmp_path / "files")
    files = tmp_path / "files"
    text = text.replace('"dnsmasq.leases"', f'"{files}/dnsmasq.leases"')
    text = text.replace('"dhcpd.leases"', f'"{files}/dhcpd.leases"')
    text = text.replace('"kea-leases4.csv"', f'"{files}/kea-leases4.csv"')
    text = text.replace('"arp"', f'"{files}/arp"').replace('"ads.txt"', f'"{files}/ads.txt"')
    proxy = make_proxy(text, wait_for=f"listening on http 127.0.0.1:{http_port}")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as http:
        until(lambda: http.get("/ready").status_code == 200, message=proxy.log())
        yield proxy, http


def answer(proxy, source: str) -> str:
    return proxy.ask(source=source).answer[0][0].address


def test_groups_block_names_show_and_a_group_pause_pauses_only_that_group(household):
    proxy, http = household
    assert answer(proxy, "127.0.0.57") == "0.0.0.0"  # kids-tablet, by its dnsmasq lease
    assert answer(proxy, "127.0.0.40") == "0.0.0.0"  # in kids' network
    assert answer(proxy, "127.0.0.80") == "0.0.0.0"  # guests
    for other in ("127.0.0.70", "127.0.0.90", "127.0.0.99", "127.0.0.1"):
        assert answer(proxy, other) == "192.0.2.10", other

    status = http.post("/api/blocking/disable", params={"group": "kids", "duration": "15m"})
    assert status.status_code == 200, status.text
    doc = status.json()
    assert doc["enabled"] and 0 < doc["groups"]["kids"]["seconds_left"] <= 900
    assert answer(proxy, "127.0.0.57") == "192.0.2.10"  # kids: paused
    assert answer(proxy, "127.0.0.40") == "192.0.2.10"
    assert answer(proxy, "127.0.0.80") == "0.0.0.0"  # guests: still blocked
    bad = http.post("/api/blocking/disable", params={"group": "nobody"})
    assert bad.status_code == 400 and "unknown group 'nobody'" in bad.text
    http.post("/api/blocking/enable", params={"group": "kids"})
    assert answer(proxy, "127.0.0.57") == "0.0.0.0"

    expected = {
        "127.0.0.57": "kids-tablet",  # dnsmasq lease
        "127.0.0.70": "living-room-tv",  # ISC dhcpd lease
        "127.0.0.80": "printer.lan",  # Kea CSV lease
        "127.0.0.90": "grandpa",  # MAC from the neighbour table, named in [clients]
        "127.0.0.99": "office-pc.lan",  # PTR from nsd, learnt in the background
    }

    def named() -> dict[str, str]:
        for host in expected:
            proxy.ask(source=host)
        tops = _top_clients(http.get("/api/stats").json())
        return {e["client"]: e["name"] for e in tops if e.get("name")}

    until(lambda: expected.items() <= named().items(), 15, str(named()))
    db = sqlite3.connect(proxy.dir / ".dnsproxy-state" / "querylog.sqlite")
    rows = dict(db.execute("SELECT client, max(client_name) FROM queries GROUP BY client"))
    db.close()
    assert expected.items() <= rows.items() and rows["127.0.0.40"] is None


def _top_clients(doc: object) -> list[dict]:
    """Every ``top_clients`` entry anywhere in an /api/stats document."""
    found: list[dict] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "top_clients" and isinstance(value, list):
                found.extend(value)
            else:
                found.extend(_top_clients(value))
    elif isinstance(doc, list):
        for value in doc:
            found.extend(_top_clients(value))
    return found


def test_query_as_a_named_client_from_the_command_line(tmp_path, make_nsd, capsys):
    nsd = make_nsd({"example.test": ZONE})
    (tmp_path / "ads.txt").write_text("www.example.test\n")
    (tmp_path / "config.toml").write_text(
        '[clients]\nkids-tablet = ["192.168.1.57"]\n[groups]\nkids = ["kids-tablet"]\n'
        '[[chain]]\nplugin = "blocklist"\nlists = ["ads.txt"]\nclients = ["kids"]\n'
        f'[[chain]]\nplugin = "forward"\nupstreams = ["{nsd.addr}"]\n'
    )
    config = str(tmp_path / "config.toml")
    assert cli.main(["query", "-c", config, "--client", "kids-tablet", "www.example.test"]) == 0
    out = capsys.readouterr().out
    assert "from 192.168.1.57 (kids-tablet; groups: kids)" in out and "0.0.0.0" in out
    assert cli.main(["query", "-c", config, "--client", "10.0.0.1", "www.example.test"]) == 0
    assert "192.0.2.10" in capsys.readouterr().out
    assert cli.main(["query", "-c", config, "--client", "nobody", "www.example.test"]) == 1


NEIGHBOURS = """\
neigh add 2001:db8::5 lladdr 02:00:00:00:00:05 dev lo nud permanent
neigh add 2001:db8::6 lladdr 02:00:00:00:00:06 dev lo nud stale
neigh add 2001:db8::7 dev lo nud failed
""" + "".join(
    f"neigh add 2001:db8::1:{i:x} lladdr 02:00:00:00:01:00 dev lo nud stale\n" for i in range(40)
)


def test_ipv6_clients_are_named_by_mac_from_the_real_kernel_table(tmp_path):
    """`dnsproxy query --client` in a network namespace of its own (``unshare -n``: the
    machine's table is left alone) whose IPv6 neighbour table ``ip`` filled: a client at
    an IPv6 address is named by the MAC the kernel has for it (read over rtnetlink, the
    default ``neighbours = "kernel"``), a FAILED entry names no one, and a dump keeps at
    most max_clients entries."""
    unshare, ip = need("unshare"), need("ip")
    if subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        if IN_CI:
            pytest.fail("unshare -n must work under CI=true (root: CAP_SYS_ADMIN, CAP_NET_ADMIN)")
        pytest.skip("unshare -n and ip neigh add need CAP_SYS_ADMIN and CAP_NET_ADMIN")
    (tmp_path / "neighbours").write_text(NEIGHBOURS)
    (tmp_path / "ads.txt").write_text("www.example.test\n")
    (tmp_path / "config.toml").write_text(
        '[server]\nallow = ["2001:db8::/32"]\n'
        '[clients]\nkid = ["02:00:00:00:00:05", "02:00:00:00:00:06"]\n[groups]\nkids = ["kid"]\n'
        '[[chain]]\nplugin = "blocklist"\nlists = ["ads.txt"]\nclients = ["kids"]\n'
    )
    python = shlex.quote(sys.executable)
    query = f"{python} -m dnsproxy query -c {shlex.quote(str(tmp_path / 'config.toml'))} --client"
    script = (
        f"set -e; {ip} link set lo up; {ip} -6 -batch {shlex.quote(str(tmp_path / 'neighbours'))}\n"
        f"{query} 2001:db8::5 www.example.test\n"
        f"{query} 2001:db8:0:0::6 www.example.test\n"
        f"{query} 2001:db8::7 www.example.test || true\n"
        f"{python} -c 'from dnsproxy.clients import netlink_neighbours as n; print(len(n(16)))'\n"
    )
    run = subprocess.run(
        [unshare, "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "from 2001:db8::5 (kid; groups: kids)" in out  # PERMANENT
    assert "from 2001:db8:0:0::6 (kid; groups: kids)" in out  # STALE, any spelling
    assert "from 2001:db8::7 (no name; groups: none)" in out  # FAILED
    assert out.count("0.0.0.0") == 2 and out.splitlines()[-1] == "16"
